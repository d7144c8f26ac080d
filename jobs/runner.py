"""Runs one job attempt: the tool with its context, timeout, retries, and the finish event.

Ordering that makes a crash at any point safe (docs/architecture.md, the durability protocol, step 5):
the "job finished" inbox event is appended *before* the job record is marked finished. A
crash in between re-runs the job on recovery (at-least-once; the tool dedupes on its job id)
and the re-run's event is a no-op because its id (``job:<id>``) already exists, so the
completion is announced exactly once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

from pydantic import ValidationError

from jobs import approval
from jobs.context import JobCancelledError, JobContext
from jobs.registry import JobRegistry, PermanentJobError
from runtime import logs, metrics, tracing
from runtime.crashpoints import crash_point
from runtime.protocol import EventKind, EveryConversation, JobResult, NotOwner, Owner, finished_event_id
from runtime.untrusted import DEFAULT_MAX_TOOL_RESULT_CHARS, clip
from storage.abc import ConversationStore, InboxEvent, ItemTooLargeError, JobRecord, StoreUnavailableError
from storage.inbox import Inbox, Wake

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The job fields the runner writes; others belong to other writers (cancel flag, card id).
RUNNER_FIELDS = ("status", "attempt", "interruptions", "progress", "progress_text", "result", "error",
                 "next_retry_at", "started_at", "finished_at")

#: How many times a job may be cut short by the process dying before it is failed.
MAX_INTERRUPTIONS = 20


#: Longest progress text kept (an MCP server's progress message is untrusted and unbounded).
MAX_PROGRESS_TEXT_CHARS = 500
#: Result fields kept beside the clipped message of an oversized result: short scalars only.
_KEPT_FIELD_CHARS = 200


def clip_result(result: Any, limit: int) -> Any:
    """A job's result within ``limit`` characters of JSON: as it is if it fits, else its ``message``
    (or its whole JSON) clipped with a note, beside its short scalar fields (e.g. ``status``)."""
    encoded = json.dumps(result, default=str)
    if len(encoded) <= limit:
        return result
    fields = result if isinstance(result, dict) else {}
    kept = {k: v for k, v in fields.items() if k != "message" and (
        isinstance(v, bool | int | float) or (isinstance(v, str) and len(v) <= _KEPT_FIELD_CHARS))}
    message = fields.get("message")
    text = message if isinstance(message, str) else encoded
    return {**kept, "message": clip(text, limit), "clipped": True}


def bounded_job(job: JobRecord, limit: int) -> JobRecord:
    """The job with its tool-written fields (result, error, progress text) clipped before storing."""
    changes: dict[str, Any] = {}
    if job.result is not None and (clipped := clip_result(job.result, limit)) is not job.result:
        changes["result"] = clipped
    if job.error and len(job.error) > limit:
        changes["error"] = clip(job.error, limit)
    if job.progress_text and len(job.progress_text) > MAX_PROGRESS_TEXT_CHARS:
        changes["progress_text"] = clip(job.progress_text, MAX_PROGRESS_TEXT_CHARS)
    return replace(job, **changes) if changes else job


class Scheduling(Protocol):
    """Timers for job attempts (jobs/scheduler.py's JobScheduler)."""

    async def schedule(self, job: JobRecord, run_at: float | None = None) -> None: ...

    async def unschedule(self, job_id: str) -> None: ...

    async def scheduled_ids(self) -> set[str]: ...


def finished_event(job: JobRecord) -> InboxEvent:
    """The inbox event announcing a finished job; its id makes appending it idempotent."""
    if job.status == "succeeded":
        content = json.dumps(job.result)
    elif job.status == "cancelled":
        what = job.tool.replace("_", " ")
        withdrawn = (" while it awaited approval: it never ran"
                     if job.approval is not None and approval.decision(job) is None else "")
        content = json.dumps({"message": f"Job `{job.id}` ({what}) was cancelled{withdrawn}.", "job_id": job.id})
    elif job.status in (approval.REJECTED, approval.EXPIRED):  # issue 16: the tool did not run
        content = json.dumps({"message": approval.outcome_message(job), "job_id": job.id})
    else:
        content = job.error or "unknown error"
    result = JobResult(
        job_id=job.id,
        call_id=job.call_id,
        tool=job.tool,
        status=job.status,
        content=content,
        is_error=job.status == "failed",
        arguments=job.arguments,
    )
    return InboxEvent(id=finished_event_id(job.id), kind=EventKind.JOB_FINISHED, payload=result.to_json())


@dataclass(frozen=True)
class CancelResult:
    job: JobRecord
    already_finished: bool  # it had succeeded, failed or been cancelled before this request

    def message(self) -> str:
        """What to tell the person who asked."""
        job = self.job
        if not self.already_finished:
            return f"Cancelling job `{job.id}`…"
        if job.status == "cancelled":
            return f"Job `{job.id}` was already cancelled."
        return f"Job `{job.id}` already finished ({job.status}); nothing to cancel."


def job_from_finished_event(job: JobRecord, event: InboxEvent) -> JobRecord:
    """The job as its finished event tells it (the event was stored, the record not yet updated)."""
    outcome = JobResult.from_json(event.payload)
    if outcome.status == "succeeded":
        return job.evolve(status="succeeded", result=json.loads(outcome.content), progress=1.0, error=None,
                          finished_at=event.created_at)
    return job.evolve(status=outcome.status, error=outcome.content if outcome.is_error else None,
                      finished_at=event.created_at)


class JobRunner:
    def __init__(
        self,
        store: ConversationStore,
        registry: JobRegistry,
        wake: Wake,
        progress_listener: Callable[[JobRecord], Awaitable[None]] | None = None,
        *,
        scheduler: Scheduling | None = None,
        max_result_chars: int = DEFAULT_MAX_TOOL_RESULT_CHARS,
        owner: Owner | None = None,
    ) -> None:
        """``wake(key)``: a finished job's conversation has its outcome to announce (the worker's
        wake-ups); ``scheduler``: the timers for retries (None: jobs are not retried later, unit tests);
        ``max_result_chars``: a job's result and error are clipped to this before they are stored;
        ``owner``: which conversations this worker owns (a cluster): a job of another's is not started,
        and every write of a running one first checks that its conversation is still owned."""
        self._owner = owner or EveryConversation()
        self._max_result_chars = max_result_chars
        self._store = store
        self._registry = registry
        self._inbox = Inbox(store, wake)
        self._scheduler = scheduler
        self._progress_listener = progress_listener
        self._live: dict[str, JobContext] = {}
        self._tasks: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._runs: set[asyncio.Task[Any]] = set()
        self._run_of: dict[str, asyncio.Task[Any]] = {}  # job id -> the task running its attempt
        self._claimed: set[str] = set()
        self._recovered: set[asyncio.Task[None]] = set()  # recovered jobs started directly

    def is_live(self, job_id: str) -> bool:
        return job_id in self._claimed

    async def run(self, conversation_key: str, job_id: str) -> None:
        """Run the next attempt of a job (the APScheduler entry point lands here)."""
        if job_id in self._claimed:
            log.info("job %s is already running in this process; ignoring the duplicate start", job_id)
            return
        self._claimed.add(job_id)  # before any await: a duplicate start sees it
        log_context = logs.set_context(conversation_key=conversation_key, job_id=job_id)
        try:
            self._owner.fence(conversation_key)  # issue 18: only the owner of its partition starts a job
            await self._run(conversation_key, job_id)
        except NotOwner as exc:  # the partition moved: stop without a word, the new owner runs it
            metrics.FENCED_WRITES.labels(exc.by).inc()
            log.warning("job %s: stopped, this worker no longer owns its conversation (%s)", job_id, exc)
        finally:
            self._claimed.discard(job_id)
            logs.reset_context(log_context)

    async def _run(self, conversation_key: str, job_id: str) -> None:
        job = await self._store.get_job(conversation_key, job_id)
        if job.finished:
            await self._announce(job)
            return
        if (event := await self._store.get_event(conversation_key, finished_event_id(job_id))) is not None:
            # It finished and was announced just before a crash: restore the record, don't re-run.
            await self._save(job_from_finished_event(job, event))
            return
        if job.status == approval.AWAITING:  # its expiry timer fired (or recovery found it)
            await self._expire_if_due(job)
            return
        if job.cancel_requested:
            await self._finish(job.evolve(status="cancelled", finished_at=time.time()))
            return
        if (decided := approval.decision(job)) in (approval.REJECTED, approval.EXPIRED):
            await self._finish(job.evolve(status=decided, finished_at=time.time()))  # the tool never runs
            return
        if decided == approval.APPROVED:  # the event a crash after the claim may have lost (else a no-op)
            self._owner.fence(conversation_key)
            await self._until_stored(lambda: self._inbox.post(conversation_key, approval.approval_event(job)), job_id)
        try:
            tool = self._registry.get(job.tool)
        except LookupError as exc:
            await self._finish(job.evolve(status="failed", error=str(exc), finished_at=time.time()))
            return

        attempt = job.attempt + 1
        interruptions = job.interruptions
        if job.status == "running":
            # Found running: the process died during that attempt (a graceful stop hands it back
            # as queued). Run the same attempt again; a crash is not the tool's failure. Only a
            # job that keeps dying with the process (a poison job) is given up.
            attempt, interruptions = job.attempt, job.interruptions + 1
            if interruptions > MAX_INTERRUPTIONS:
                await self._finish(job.evolve(status="failed", finished_at=time.time(), interruptions=interruptions,
                                              error=f"the bot stopped during this job {interruptions} times; "
                                                    "giving up so it cannot keep crashing the bot"))
                return

        job = await self._save(job.evolve(status="running", attempt=attempt, interruptions=interruptions,
                                          next_retry_at=None, started_at=job.started_at or time.time()))
        current = job

        async def on_progress(fraction: float | None, text: str | None) -> bool:
            nonlocal current
            current = current.evolve(progress=fraction, progress_text=text)
            try:
                current = await self._save(current)
            except StoreUnavailableError as exc:  # progress is a nicety: never fail the job for it
                log.warning("job %s: could not record progress (%s); carrying on", job_id, exc)
                return current.cancel_requested
            crash_point("job_progress")
            if self._progress_listener:
                await self._progress_listener(current)
            return current.cancel_requested

        context = JobContext(job_id=job.id, conversation_key=conversation_key, attempt=job.attempt,
                             _progress_sink=on_progress)
        self._live[job.id] = context
        if (me := asyncio.current_task()) is not None:
            self._runs.add(me)
            me.add_done_callback(self._runs.discard)
            self._run_of[job.id] = me
        log.info("job %s (%s) attempt %d/%d started", job.id, job.tool, job.attempt, tool.retry.max_attempts)
        metrics.JOB_ATTEMPTS.labels(job.tool).inc()
        span = tracing.tracer.start_span("job attempt", attributes={
            "conversation.key": conversation_key, "job.id": job.id, "job.tool": job.tool, "job.attempt": job.attempt})
        try:
            args = tool.args_model.model_validate(job.arguments)
            with tracing.trace.use_span(span, end_on_exit=False):
                attempt_task = asyncio.ensure_future(tool.run(context, args))
            self._tasks[job.id] = attempt_task
            result: dict[str, Any] = await asyncio.wait_for(attempt_task, timeout=tool.timeout)
        except JobCancelledError:
            await self._finish(current.evolve(status="cancelled", finished_at=time.time()))
        except TimeoutError:
            await self._retry_or_fail(current, f"timed out after {tool.timeout:g} s", tool.retry.max_attempts,
                                      tool.retry.delay(current.attempt))
        except (PermanentJobError, ValidationError) as exc:
            await self._finish(current.evolve(status="failed", error=str(exc), finished_at=time.time()))
        except NotOwner:  # a progress report found the partition gone: not the tool's failure
            raise
        except asyncio.CancelledError:
            if context.cancelled:
                await self._finish(current.evolve(status="cancelled", finished_at=time.time()))
            else:
                # Graceful shutdown: hand the attempt back so the restart runs it again, uncounted.
                log.info("job %s interrupted by shutdown; it will run again after the restart", job.id)
                await asyncio.shield(self._save(current.evolve(status="queued", attempt=current.attempt - 1)))
                raise
        except Exception as exc:  # a tool's failure must never escape the runner
            log.warning("job %s attempt %d failed: %s", job.id, current.attempt, exc)
            await self._retry_or_fail(current, f"{type(exc).__name__}: {exc}", tool.retry.max_attempts,
                                      tool.retry.delay(current.attempt))
        else:
            await self._finish(current.evolve(status="succeeded", result=result, progress=1.0,
                                              error=None, finished_at=time.time()))
        finally:
            self._live.pop(job.id, None)
            self._tasks.pop(job.id, None)
            self._run_of.pop(job.id, None)
            span.end()

    async def _expire_if_due(self, job: JobRecord) -> None:
        """An awaiting job past its expiry: claim ``expired`` (unless a decision wins first) and announce it;
        one not yet due gets its timer back."""
        now = time.time()
        if now < approval.expires_at(job):
            if self._scheduler is not None:
                await self._scheduler.schedule(job)
            return
        expired = await self._store.transition_job(job.conversation_key, job.id, approval.AWAITING, {
            "status": "queued", "approval": {**(job.approval or {}), "decision": approval.EXPIRED, "at": now}})
        if expired is None:
            return  # decided (or withdrawn) a moment ago: that path carries it on
        log.info("job %s: its approval request expired", job.id)
        await self._finish(expired.evolve(status=approval.EXPIRED, finished_at=now))

    async def _retry_or_fail(self, job: JobRecord, error: str, max_attempts: int, delay: float) -> None:
        if job.attempt >= max_attempts:
            await self._finish(job.evolve(status="failed", error=f"{error} (after {job.attempt} attempts)",
                                          finished_at=time.time()))
            return
        retry_at = time.time() + delay
        metrics.JOB_RETRIES.labels(job.tool).inc()
        job = await self._save(job.evolve(status="queued", error=error, next_retry_at=retry_at))
        log.info("job %s will retry (attempt %d of %d) in %.1f s", job.id, job.attempt + 1, max_attempts, delay)
        if self._progress_listener:
            await self._progress_listener(job)
        if self._scheduler is not None:
            await self._scheduler.schedule(job, run_at=retry_at)

    async def _save(self, job: JobRecord) -> JobRecord:
        """Write the fields the runner owns; what others set meanwhile (cancel, card id) stays."""
        job = bounded_job(job, self._max_result_chars)
        self._owner.fence(job.conversation_key)  # a worker that lost the partition writes nothing more
        changes = {name: getattr(job, name) for name in RUNNER_FIELDS}
        return await self._store.patch_job(job.conversation_key, job.id, changes)

    async def _finish(self, job: JobRecord) -> None:
        job = bounded_job(job, self._max_result_chars)  # the record and the inbox event alike
        # The outcome must reach the store: wait out a store outage rather than lose it.
        await self._until_stored(lambda: self._announce(job), job.id)
        crash_point("job_event_appended")
        job = await self._until_stored(lambda: self._save(job), job.id)
        log.info("job %s (%s) %s", job.id, job.tool, job.status)
        metrics.job_finished(job.tool, job.status, job.started_at, job.finished_at)
        if self._progress_listener:
            await self._progress_listener(job)

    async def _until_stored(self, write: Callable[[], Awaitable[T]], job_id: str, patience: float = 300.0) -> T:
        delay, deadline = 0.5, time.monotonic() + patience
        while True:
            try:
                return await write()
            except StoreUnavailableError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("job %s: store unavailable (%s); retrying in %.1f s", job_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)

    async def _announce(self, job: JobRecord) -> None:
        self._owner.fence(job.conversation_key)  # never announce a job of a partition this worker lost
        try:
            await self._inbox.post(job.conversation_key, finished_event(job))
        except ItemTooLargeError as exc:  # e.g. huge arguments: announce the outcome without them
            log.error("job %s: its finished event is too large to store (%s); announcing it without the "
                      "arguments and output", job.id, exc)
            event = finished_event(job.evolve(arguments={}, result={"message": "(too large to store)"},
                                              error="the job's outcome was too large to store"))
            await self._inbox.post(job.conversation_key, event)

    async def recover(self, only: Callable[[str], bool] | None = None) -> int:
        """Restart queued/running jobs that have no live schedule (after a crash, or of partitions this
        worker just took: ``only(conversation_key)``).

        Jobs due now start at once, straight on this runner: the store is the source of truth,
        so going through the persisted schedule first would only cost a job-store write each
        (about 13 ms per job on SQLite: 13 s for 1,000 jobs). Jobs waiting for a retry are
        scheduled for their time.
        """
        count = 0
        scheduled = await self._scheduler.scheduled_ids() if self._scheduler is not None else set()
        for job in await self._store.unfinished_jobs():
            if self.is_live(job.id) or job.id in scheduled or not self._owner.owns(job.conversation_key):
                continue
            if only is not None and not only(job.conversation_key):
                continue
            if job.status == approval.AWAITING:  # waits for a person: only its expiry timer must exist
                if approval.expiry_timer_id(job.id) in scheduled:
                    continue
                if self._scheduler is not None and time.time() < approval.expires_at(job):
                    await self._scheduler.schedule(job)
                    count += 1
                    continue
            if job.next_retry_at and job.next_retry_at > time.time() and self._scheduler is not None:
                await self._scheduler.schedule(job, run_at=job.next_retry_at)
            else:
                task = asyncio.create_task(self.run(job.conversation_key, job.id), name=f"job:{job.id}")
                self._recovered.add(task)
                task.add_done_callback(self._recovered.discard)
            count += 1
        if count:
            log.info("recovered %d unfinished job(s) and scheduled them again", count)
        return count

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Graceful stop: interrupt running attempts and wait until each has handed itself back."""
        for task in list(self._tasks.values()):
            task.cancel()
        if self._runs:
            await asyncio.wait(list(self._runs), timeout=timeout)

    async def abandon(self, lost: Callable[[str], bool], *, timeout: float = 5.0) -> int:
        """Stop the running attempts of the conversations ``lost(key)`` names (their partition moves to
        another worker) and wait until they have stopped. While the partition is still held (a graceful
        hand-back) each hands itself back as queued, as on shutdown; once its lease is gone it writes
        and announces nothing (every write checks the owner first). Returns how many were stopped."""
        stopping = [job_id for job_id, context in self._live.items() if lost(context.conversation_key)]
        for job_id in stopping:
            if (task := self._tasks.get(job_id)) is not None:
                task.cancel()
        if runs := [run for job_id in stopping if (run := self._run_of.get(job_id)) is not None and not run.done()]:
            await asyncio.wait(runs, timeout=timeout)
        if stopping:
            log.info("stopped %d running job(s) of partitions this worker gave up", len(stopping))
        return len(stopping)

    async def request_cancel(self, conversation_key: str, job_id: str) -> CancelResult:
        """Record a cancel request on the job (any instance may); returns the job as it stands.
        Raises JobNotFoundError. The process that runs jobs acts on it in :meth:`apply_cancel`."""
        job = await self._store.get_job(conversation_key, job_id)
        if job.finished:
            return CancelResult(job, already_finished=True)
        job = await self._store.patch_job(conversation_key, job_id, {"cancel_requested": True})
        return CancelResult(job, already_finished=False)

    async def apply_cancel(self, conversation_key: str, job_id: str) -> None:
        """Stop a job whose cancel was requested: interrupt its attempt here, or end it if queued."""
        if not self._owner.owns(conversation_key):
            return  # issue 18: another worker owns it now; the request in the store reaches that one
        if (live := self._live.get(job_id)) is not None:
            live.cancel()
            # A tool that never checks its context is still stopped at its next await.
            if (task := self._tasks.get(job_id)) is not None:
                task.cancel()
            return
        job = await self._store.get_job(conversation_key, job_id)
        if job.status == approval.AWAITING and job.cancel_requested:
            # Withdrawn: claimed like a decision, so an approval at the same moment wins or loses cleanly.
            withdrawn = await self._store.transition_job(conversation_key, job_id, approval.AWAITING,
                                                         {"status": "queued"})
            if withdrawn is None:
                return  # decided a moment ago: the run sees the cancel request and ends it cancelled
            job = withdrawn
        if job.status == "queued" and job.cancel_requested and job_id not in self._claimed:
            if self._scheduler is not None:
                await self._scheduler.unschedule(job_id)
            await self._finish(job.evolve(status="cancelled", finished_at=time.time()))

    async def cancel(self, conversation_key: str, job_id: str) -> CancelResult:
        """Request and apply a cancellation in this process. Raises JobNotFoundError."""
        result = await self.request_cancel(conversation_key, job_id)
        if not result.already_finished:
            await self.apply_cancel(conversation_key, job_id)
            result = CancelResult(await self._store.get_job(conversation_key, job_id), already_finished=False)
        return result
