"""The conversation processor: folds inbox events into agent state, one conversation at a time.

The durability protocol's steps 2 to 4 (docs/architecture.md). For each conversation at most
one drain task runs in this process; ``wake`` from ingest or a finished job either starts it or
asks the running one to look again. A turn is committed in one conditional write (state + processed events +
outbox + new jobs); only then are messages sent and jobs scheduled. Sending removes each
message from the outbox after the connector accepted it, so a crash can repeat at most the
one message that was in flight.

The durability runtime imports no AutoGen (tests/test_layers.py checks it): a turn runs behind
:class:`agent.turns.TurnRunner` (AutoGen's is :class:`agent.runner.AgentTurnRunner`), the events,
ids and the channel are the protocol's (:mod:`runtime.protocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from agent.citations import with_markers
from agent.events import APPROVAL_PROMPT, JOB_FINISHED_PROMPT, JOB_RESULT_SOURCE
from agent.forgetting import Forgetter, reset_confirmation
from agent.outgoing import TEAMS_MESSAGE_BYTES, activity_bytes, ai_message, closing_message, split_text
from agent.turns import AgentError, AgentInput, TurnOutcome, TurnRunner
from runtime import logs, metrics, tracing
from runtime.crashpoints import crash_point
from runtime.protocol import (
    AGENT_KINDS,
    STREAM_NOTE,
    DeliveryError,
    EventKind,
    EveryConversation,
    JobResult,
    MessageSender,
    NotOwner,
    Owner,
    ReplyStream,
    ReplyStreams,
    Requester,
    StreamOutcome,
    card_job_id,
    card_message_id,
    reply_id,
)
from runtime.untrusted import escape_markdown, inline_code
from storage.abc import (
    JSON,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    ItemTooLargeError,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
)

log = logging.getLogger(__name__)

TYPING_INTERVAL = 3.0  # Teams shows a typing indicator for about 3 s
#: A turn still running after this long shows progress (typing, or a stream): a faster one sends nothing extra.
FIRST_INDICATOR_DELAY = 0.5


def text_activity(text: str) -> JSON:
    return {"type": "message", "text": text, "textFormat": "markdown"}


def text_activities(text: str) -> list[JSON]:
    """A reply as messages Teams accepts (a long one split, a runaway one clipped: agent.outgoing)."""
    return [text_activity(part) for part in split_text(text)]


def model_replies(outcome: TurnOutcome, streamed: StreamOutcome) -> list[JSON]:
    """The model's replies as AI-labelled messages with feedback buttons: the first closes the turn's
    stream (if one is open), its sources become citations; after a stream closed early only the
    rest of the answer is sent."""
    activities: list[JSON] = []
    for n, text in enumerate(outcome.replies):
        if n == 0 and streamed.shown and text.startswith(streamed.shown):
            text = "…" + text[len(streamed.shown):]
        citations = None
        if n == len(outcome.replies) - 1 and outcome.citations:
            text, citations = with_markers(text, outcome.citations)
        parts = split_text(text)
        for i, part in enumerate(parts):
            activity = ai_message(part, stream_id=streamed.stream_id if not activities else None,
                                  citations=citations if i == len(parts) - 1 else None)
            while citations and activity_bytes(activity) > TEAMS_MESSAGE_BYTES:  # the last ones go first
                citations = citations[:-1]
                activity = ai_message(part, stream_id=streamed.stream_id if not activities else None,
                                      citations=citations)
            activities.append(activity)
    return activities


def plain_job_outcome(result: JobResult) -> str:
    """A finished job told without the model (when the model is unavailable); its data escaped."""
    detail = result.content
    try:
        parsed = json.loads(result.content)
        if isinstance(parsed, dict) and parsed.get("message"):
            detail = str(parsed["message"])
    except ValueError:
        pass
    return (f"Background job {inline_code(result.job_id)} ({inline_code(result.tool)}) {result.status}: "
            f"{escape_markdown(detail)}")


TOO_LARGE_TO_STORE = ("Sorry, that was more than I can store for this conversation, so I had to drop it. "
                      "Nothing else is lost and we can carry on: please try again with something smaller.")


ScheduleJob = Callable[[JobRecord], Awaitable[None]]
CardSent = Callable[[str, str, str | None], Awaitable[None]]


class ConversationProcessor:
    def __init__(
        self,
        store: ConversationStore,
        runner: TurnRunner,
        sender: MessageSender,
        *,
        welcome: Callable[[], JSON],
        schedule_job: ScheduleJob | None = None,
        job_card: Callable[[JobRecord], JSON] | None = None,
        on_card_sent: CardSent | None = None,
        max_backoff: float = 30.0,
        max_delivery_failures: int = 30,
        streams: ReplyStreams | None = None,
        stream_seconds: float = 110.0,
        owner: Owner | None = None,
    ) -> None:
        """``job_card`` renders the live card posted (through the outbox) for each new job;
        ``on_card_sent(conversation_key, job_id, activity_id)`` records where it landed; ``streams``
        shows a turn's answer as it is written where the conversation supports it (None: never), a
        stream lasting at most ``stream_seconds`` (a re-run turn closes a stream only younger than that);
        ``owner`` (a cluster): the conversations this worker owns. It processes only those, and checks
        before every commit and send that it still does (the commit also carries the lease epoch)."""
        self._streams = streams
        self._stream_seconds = stream_seconds
        self._owner = owner or EveryConversation()
        self._store = store
        self._runner = runner
        self._sender = sender
        self._welcome = welcome
        self._schedule_job = schedule_job
        self._job_card = job_card
        self._on_card_sent = on_card_sent
        self._max_backoff = max_backoff
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._delivery_failures: dict[str, int] = {}  # outbox message id -> failed rounds (this process)
        self._max_delivery_failures = max_delivery_failures
        self._again: set[str] = set()
        self._closing = False
        self._forgetter = Forgetter(store)  # a reset forgets the old texts before it is confirmed

    # --- waking ---
    def wake(self, key: str) -> None:
        """Make sure the conversation's pending work gets processed (cheap, idempotent)."""
        if self._closing or not self._owner.owns(key):
            return  # another worker's conversation: its owner was woken too
        task = self._tasks.get(key)
        if task is not None and not task.done():
            self._again.add(key)
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._drain(key), name=f"conversation:{key}")

    async def recover(self, *, sweep: bool = False, only: Callable[[str], bool] | None = None) -> int:
        """Start-up (and the periodic sweep): process pending inboxes, re-send unsent messages.

        ``sweep``: wake only conversations no drain is running for (what a lost wake-up left);
        ``only(key)``: only those (the partitions this worker just took). Only conversations this
        worker owns. Returns how many were woken.
        """
        keys = [key for key in await self._store.conversations_with_work()
                if self._owner.owns(key) and (only is None or only(key))]
        if sweep:
            keys = [key for key in keys if key not in self._tasks]
        for key in keys:
            self.wake(key)
        if keys:
            log.info("%s %d conversation(s) with pending events or unsent messages",
                     "found work left behind in" if sweep else "recovering", len(keys))
        return len(keys)

    async def idle(self) -> None:
        """Wait until no conversation is being processed (tests and graceful shutdown)."""
        while tasks := [t for t in self._tasks.values() if not t.done()]:
            await asyncio.wait(tasks)

    async def release(self, lost: Callable[[str], bool], *, timeout: float) -> None:
        """Stop processing the conversations ``lost(key)`` names (their partition moves to another
        worker): wait up to ``timeout`` for their drains to finish the round they are in (0: at once,
        the lease is gone and they could not write anyway), then cancel what is left."""
        tasks = [task for key, task in self._tasks.items() if lost(key) and not task.done()]
        if not tasks:
            return
        pending: set[asyncio.Task[None]] = set(tasks)
        if timeout > 0:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def close(self, timeout: float = 10.0) -> None:
        self._closing = True
        tasks = [t for t in self._tasks.values() if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # --- the drain loop ---
    async def _drain(self, key: str) -> None:
        logs.set_context(conversation_key=key)  # this task's log lines name the conversation
        try:
            await self._drain_loop(key)
        finally:
            # Forget finished drains: the map holds only conversations being processed.
            if self._tasks.get(key) is asyncio.current_task():
                del self._tasks[key]

    async def _drain_loop(self, key: str) -> None:
        delay = 0.5
        while not self._closing:
            self._again.discard(key)
            try:
                retry_in = await self._process_once(key)
            except NotOwner as exc:  # issue 18: the partition moved; its new owner carries on from the store
                metrics.FENCED_WRITES.labels(exc.by).inc()
                log.warning("conversation %s: stopped, this worker no longer owns it (%s)", key, exc)
                break
            except Exception:
                log.exception("processing conversation %s failed; retrying in %.1f s", key, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                self._again.add(key)
                continue
            if retry_in is not None:
                await asyncio.sleep(retry_in)
                self._again.add(key)
            if key not in self._again:
                break
            delay = 0.5

    async def _process_once(self, key: str) -> float | None:
        """One round: commit a turn for the pending events, then flush the outbox.

        Returns seconds to wait before another round when delivery must be retried.
        """
        start = await self._store.load_turn(key)  # record, pending events, reference: one request on Cosmos
        record, events, reference = start.record, start.events, start.reference
        if events:
            needs_thought = any(e.kind in AGENT_KINDS for e in events)
            streaming = self._streams is not None and reference is not None and self._streams.streams_to(reference)
            typing = (asyncio.create_task(self._keep_typing(reference))
                      if reference and needs_thought and not streaming else None)
            try:
                committed = await self._commit_turn(record, events, reference if streaming else None)
            finally:
                if typing is not None:
                    typing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await typing
            if committed is None:  # someone else moved first: reload and redo
                self._again.add(key)
                return None
            record = committed
        return await self._flush(record, reference)

    async def _commit_turn(self, record: ConversationRecord, events: Sequence[InboxEvent],
                           stream_to: JSON | None = None) -> ConversationRecord | None:
        """``stream_to``: the reference of a conversation where each agent turn streams its answer."""
        state = record.agent_state
        outbox = list(record.outbox)
        new_jobs: list[JobRecord] = []
        for event in events:
            replies: list[JSON] = []
            if event.kind == EventKind.WELCOME:
                replies.append(self._welcome())
            elif event.kind == EventKind.RESET:
                state = None
                replies.append(text_activity(reset_confirmation(event.payload)))
            elif event.kind == EventKind.COMMAND:
                pass  # answered inline by a dialog; recorded only so a redelivery is ignored
            elif event.kind == EventKind.APPROVAL and event.payload.get("decision") != "approved":
                pass  # rejected: the job runner ends the job, and its job:<id> result tells the agent
            elif (item := self._agent_input(event)) is not None:
                started = time.perf_counter()
                stream, streamed = self._stream_for(record.key, event, stream_to)
                try:
                    ingested = tracing.links(event.payload.get(tracing.CARRIER_KEY))
                    with tracing.tracer.start_as_current_span("agent turn", kind=tracing.CONSUMER, links=ingested,
                                                              attributes={"conversation.key": record.key,
                                                                          "event.kind": event.kind,
                                                                          "event.id": event.id}):
                        progress = {"progress": stream} if stream is not None else {}  # fakes need not take it
                        outcome = await self._runner.run(record.key, state, [item], earlier_jobs=new_jobs, **progress)
                except AgentError as exc:  # the state stays as it was; the user is told why, briefly
                    metrics.turn_done("failed", time.perf_counter() - started)
                    log.log(exc.log_level, "agent turn failed in %s for event %s (%s): %s", record.key, event.id,
                            exc.cause, exc, exc_info=exc if exc.cause == "unknown" else None)
                    if stream is not None:
                        streamed = await stream.finish()
                    # An open stream is closed by the fixed text (no AI label: the model did not write it).
                    replies.append(closing_message(exc.user_message, streamed.stream_id) if streamed.stream_id
                                   else text_activity(exc.user_message))
                    if item.job_result is not None:  # the model could not relay it: say it plainly
                        replies.extend(text_activities(plain_job_outcome(item.job_result)))
                else:
                    metrics.turn_done("ok", time.perf_counter() - started)
                    state = outcome.state
                    new_jobs.extend(outcome.new_jobs)
                    if stream is not None:
                        streamed = await stream.finish()
                    replies.extend(model_replies(outcome, streamed))
                finally:
                    if stream is not None:  # a cancelled turn (shutdown) stops its stream too
                        await stream.finish()
            else:
                log.warning("ignoring inbox event %s of unknown kind %r", event.id, event.kind)
            outbox.extend(OutboxMessage(id=reply_id(event.id, n), activity=a) for n, a in enumerate(replies))
        if self._job_card is not None:
            outbox.extend(OutboxMessage(id=card_message_id(job.id), activity=self._job_card(job)) for job in new_jobs)
        updated = record.evolve(agent_state=state, outbox=tuple(outbox), turns=record.turns + len(events))
        try:
            committed = await self._store.commit(updated, processed=[e.id for e in events], new_jobs=new_jobs,
                                                 fence=self._owner.fence(record.key))
        except ConcurrencyError:
            metrics.TURN_CONFLICTS.inc()
            log.info("conversation %s changed while its turn ran; redoing the turn", record.key)
            return None
        except ItemTooLargeError as exc:
            return await self._commit_too_large(record, events, exc)
        crash_point("turn_committed")
        log.info("turn committed in %s: %d event(s), %d message(s) to send, %d new job(s)", record.key, len(events),
                 len(committed.outbox), len(new_jobs))
        for job in new_jobs:
            await self._start_job(job)
        for event in events:  # issue 16: a decided job is scheduled once its decision is committed
            if event.kind == EventKind.APPROVAL:
                try:
                    await self._start_job(await self._store.get_job(record.key, str(event.payload.get("job_id"))))
                except JobNotFoundError:
                    log.warning("approval event %s names no job of %s", event.id, record.key)
        return committed

    async def _commit_too_large(self, record: ConversationRecord, events: Sequence[InboxEvent],
                                exc: ItemTooLargeError) -> ConversationRecord | None:
        """The turn's result cannot be stored: a permanent failure of its events, not a reason to retry
        them forever. They are marked processed, the state stays as it was, the user is told."""
        log.error("conversation %s: the turn for event(s) %s is too large to store (%s); dropping its result",
                  record.key, ", ".join(e.id for e in events), exc)
        notice = OutboxMessage(id=reply_id(events[-1].id, "too-large"), activity=text_activity(TOO_LARGE_TO_STORE))
        turns = record.turns + len(events)
        attempts = (record.evolve(outbox=(*record.outbox, notice), turns=turns),
                    # The stored record itself is too large now (a lowered limit): start afresh.
                    record.evolve(agent_state=None, outbox=(notice,), turns=turns))
        for attempt in attempts:
            try:
                return await self._store.commit(attempt, processed=[e.id for e in events],
                                                fence=self._owner.fence(record.key))
            except ConcurrencyError:
                return None
            except ItemTooLargeError:
                continue
        raise exc

    def _stream_for(self, key: str, event: InboxEvent,
                    stream_to: JSON | None) -> tuple[ReplyStream | None, StreamOutcome]:
        """The stream for this event's turn, or how an earlier run's stream must be closed.

        A turn re-run after a crash finds its stream on the event (STREAM_NOTE): it streams no
        second one, and its final message closes the first one, if still young enough to be open.
        """
        if stream_to is None or self._streams is None:
            return None, StreamOutcome()
        note = event.payload.get(STREAM_NOTE)
        if isinstance(note, dict) and isinstance(note.get("id"), str):
            opened = note.get("at")
            young = isinstance(opened, int | float) and time.time() - opened < self._stream_seconds
            log.info("re-running the turn of event %s: its final message %s stream %s", event.id,
                     "closes" if young else "replaces the expired", note["id"])
            return None, StreamOutcome(stream_id=note["id"] if young else None)

        async def started(stream_id: str) -> None:
            await self._store.annotate_event(key, event.id, STREAM_NOTE, {"id": stream_id, "at": time.time()})

        return self._streams.open(stream_to, started), StreamOutcome()

    @staticmethod
    def _agent_input(event: InboxEvent) -> AgentInput | None:
        if event.kind == EventKind.MESSAGE:
            text = str(event.payload.get("text") or "").strip()
            return AgentInput(text=text or "(an empty message)",
                              requester=Requester.from_json(event.payload.get("from")))
        if event.kind == EventKind.JOB_FINISHED:
            # The outcome goes in as a tool result (untrusted data); the prompt is ours.
            return AgentInput(text=JOB_FINISHED_PROMPT, source=JOB_RESULT_SOURCE,
                              job_result=JobResult.from_json(event.payload))
        if event.kind == EventKind.APPROVAL:  # approved: the decision is the tool's interim result
            return AgentInput(text=APPROVAL_PROMPT, source=JOB_RESULT_SOURCE,
                              job_result=JobResult.from_json(event.payload))
        return None

    async def _start_job(self, job: JobRecord) -> None:
        if self._schedule_job is None:
            return
        try:
            await self._schedule_job(job)
        except Exception:  # the job stays queued in the store; start-up recovery schedules it
            log.exception("could not schedule job %s now; it will be scheduled at the next start-up", job.id)

    async def _keep_typing(self, reference: JSON) -> None:
        await asyncio.sleep(FIRST_INDICATOR_DELAY)
        while True:
            with contextlib.suppress(Exception):
                await self._sender.typing(reference)
            await asyncio.sleep(TYPING_INTERVAL)

    # --- sending ---
    async def _flush(self, record: ConversationRecord, reference: JSON | None) -> float | None:
        """Send the outbox to ``reference`` (read with the record; a failed round reads both again)."""
        metrics.outbox_backlog(record.key, len(record.outbox))
        if not record.outbox:
            return None
        await self._forgetter.before_sending(record)
        if reference is None:
            log.error("conversation %s has %d unsent message(s) but no conversation reference; dropping them",
                      record.key, len(record.outbox))
            metrics.OUTBOX_DROPPED.labels("no_reference").inc(len(record.outbox))
            await self._remove_from_outbox(record, {m.id for m in record.outbox})
            return None
        for message in record.outbox:
            self._owner.fence(record.key)  # issue 18: a worker that lost the conversation sends nothing
            try:
                with tracing.tracer.start_as_current_span("deliver message", attributes={
                        "conversation.key": record.key, "message.id": message.id}):
                    activity_id = await self._sender.send(reference, message.activity)
                crash_point("message_sent")
                metrics.OUTBOX_SENT.inc()
                if (job_id := card_job_id(message.id)) is not None and self._on_card_sent is not None:
                    try:
                        await self._on_card_sent(record.key, job_id, activity_id)
                    except Exception:  # the card is out; losing live updates must not resend it
                        log.exception("could not record the card of job %s", message.id)
            except DeliveryError as exc:
                failures = self._delivery_failures.get(message.id, 0) + 1
                if not exc.permanent and failures < self._max_delivery_failures:
                    self._delivery_failures[message.id] = failures
                    metrics.DELIVERY_RETRIES.inc()
                    # Back off from 5 s to 5 min: a channel outage can last, it must not be hammered.
                    wait = exc.retry_after or min(300.0, 5.0 * 2 ** min(failures - 1, 6))
                    log.warning("sending to %s failed %d time(s) (%s); retrying in %.0f s", record.key, failures,
                                exc, wait)
                    return wait
                self._delivery_failures.pop(message.id, None)
                metrics.OUTBOX_DROPPED.labels("permanent" if exc.permanent else "gave_up").inc()
                if not exc.permanent:
                    log.error("giving up on message %s to %s after %d failed deliveries: %s", message.id,
                              record.key, failures, exc)
                    record = await self._remove_from_outbox(record, {message.id})
                    continue
                log.error("dropping message %s to %s, not retrying: %s (a 403/404 means the bot was removed "
                          "from the conversation or it no longer exists)", message.id, record.key, exc)
            record = await self._remove_from_outbox(record, {message.id})
        return None

    async def _remove_from_outbox(self, record: ConversationRecord, ids: set[str]) -> ConversationRecord:
        # The store removes just those messages (on Cosmos a patch, not a rewrite of the item).
        while True:
            try:
                committed = await self._store.remove_from_outbox(record, ids, fence=self._owner.fence(record.key))
                metrics.outbox_backlog(record.key, len(committed.outbox))
                return committed
            except ConcurrencyError:
                record = await self._store.load(record.key)
