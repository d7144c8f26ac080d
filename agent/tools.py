"""The tools offered to the agent in one turn.

Declared tools (``@tool``, jobs/registry.py) come in two kinds. A plain one runs here, in the turn
(:class:`PlainTool`, with its timeout and retries), and answers the model directly. A long-running
one does not run here: calling one records a job in the turn's scope (it is
committed atomically with the turn) and answers the model at once with the job id. The job
helper tools read and cancel jobs through the store and the job runner.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from autogen_core import CancellationToken
from autogen_core._function_utils import args_base_model_from_signature, get_typed_signature
from autogen_core.tools import BaseTool, ToolSchema
from pydantic import BaseModel, ValidationError

from jobs.access import JobAccess, public_view, shows_arguments, started_by_label
from jobs.approval import ApprovalPolicy, decision_line, when
from jobs.caps import JobCaps
from jobs.registry import DeclaredTool, JobRegistry, LongRunningTool, PermanentJobError
from jobs.runner import JobRunner
from runtime import metrics
from runtime.protocol import Requester
from runtime.untrusted import escape_markdown, inline_code
from storage.abc import ConversationStore, JobNotFoundError, JobRecord


@dataclass
class TurnScope:
    """What one turn's tool calls produced, to be committed with the turn."""

    conversation_key: str
    #: Who sent the message this turn answers (None: a job result, which nobody sent).
    requester: Requester | None = None
    new_jobs: list[JobRecord] = field(default_factory=list)
    #: Jobs recorded earlier in the same commit (other events of the batch): not in the store yet.
    earlier_jobs: Sequence[JobRecord] = ()


LIST_JOBS_LIMIT = 10


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def validation_message(error: ValidationError) -> str:
    """A pydantic error as one readable sentence (no URLs or type codes for the user)."""
    parts = []
    for item in error.errors():
        message = str(item.get("msg", "invalid value")).removeprefix("Value error, ")
        where = ".".join(str(p) for p in item.get("loc", ()))
        parts.append(message if item.get("type") == "value_error" else f"{where}: {message}")
    return "; ".join(parts)


NO_REQUESTER = ("A background job's result cannot start another job on its own. Nothing was started: tell the "
                "user the outcome and let them ask again.")


def refused(reason: str, message: str) -> str:
    metrics.TOOL_CALLS_REFUSED.labels(reason).inc()
    return json.dumps({"error": "not_started", "reason": reason, "message": message})


# --- built once, not per turn (issue 17): the turn's tools are rebuilt every turn for its scope, but their
# argument models and JSON schemas depend only on the tool, and pydantic takes a millisecond or more to
# build them (bench/profiling.md).
_SCHEMAS: dict[tuple[type[BaseModel], str, str], ToolSchema] = {}


class CachedSchema:
    """Mixin for a :class:`BaseTool`: its schema computed once per (arguments, name, description)."""

    @property
    def schema(self) -> ToolSchema:
        tool: Any = self
        key = (tool.args_type(), tool.name, tool.description)
        if (schema := _SCHEMAS.get(key)) is None:
            schema = _SCHEMAS[key] = BaseTool.schema.fget(tool)  # type: ignore[attr-defined]
        copied: ToolSchema = _copy_json(schema)  # a caller may change its copy
        return copied


def _copy_json(value: Any) -> Any:
    """A copy of JSON-shaped data (dicts, lists, scalars): what ``copy.deepcopy`` gives, several times faster.
    AutoGen reads every tool's schema on every model call; deepcopy was a quarter of the event loop's
    busy time in the turn benchmark (bench/profiling.md)."""
    if isinstance(value, dict):
        return {k: _copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_json(v) for v in value]
    return value


_ARGS_MODELS: dict[str, type[BaseModel]] = {}


def _args_model(function: Callable[..., Any]) -> type[BaseModel]:
    """The arguments model of a helper function, by its qualified name (the same closure every turn)."""
    if (model := _ARGS_MODELS.get(function.__qualname__)) is None:
        model = _ARGS_MODELS[function.__qualname__] = args_base_model_from_signature(
            function.__name__ + "args", get_typed_signature(function))
    return model


class HelperTool(CachedSchema, BaseTool[BaseModel, Any]):
    """What ``FunctionTool(function)`` offers for a turn's helper closure, with the model and schema built
    once: the arguments validated by the signature's model, the function awaited with them."""

    def __init__(self, function: Callable[..., Awaitable[str]]) -> None:
        model = _args_model(function)
        super().__init__(model, str, function.__name__, function.__doc__ or "")
        self._function = function

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> str:
        return await self._function(**{name: getattr(args, name) for name in type(args).model_fields})


class ScheduleJobTool(CachedSchema, BaseTool[BaseModel, Any]):
    """Presents a long-running tool to the model; a call records a job and returns its id.

    A job is recorded only on behalf of the person who asked (a job-result turn, with no
    requester, starts none) and only within the active-job caps (``jobs/caps.py``)."""

    def __init__(self, spec: LongRunningTool, scope: TurnScope, store: ConversationStore | None = None,
                 caps: JobCaps | None = None, approval: ApprovalPolicy | None = None) -> None:
        super().__init__(spec.args_model, str, spec.name, spec.description)
        self._spec = spec
        self._scope = scope
        self._store = store
        self._caps = caps
        #: Issue 16: a call of a tool behind approval records a job that waits (nothing runs).
        self._awaits = approval is not None and approval.requires(spec)
        self._approval = approval

    async def run_json(self, args: Any, cancellation_token: CancellationToken, call_id: str | None = None) -> Any:
        try:
            validated = self._spec.args_model.model_validate(args)
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from None
        return await self._record(validated, call_id)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> str:
        return await self._record(args, None)

    async def _record(self, args: BaseModel, call_id: str | None) -> str:
        requester = self._scope.requester
        if requester is None:
            return refused("no_requester", NO_REQUESTER)
        if self._caps is not None and self._store is not None:
            earlier = [*self._scope.earlier_jobs, *self._scope.new_jobs]
            if (cap := await self._caps.refusal(self._store, self._scope.conversation_key, requester, earlier)):
                return refused(*cap)
        job = JobRecord(
            call_id=call_id,
            id=new_job_id(),
            conversation_key=self._scope.conversation_key,
            tool=self._spec.name,
            arguments=args.model_dump(exclude_unset=True),
            max_attempts=self._spec.retry.max_attempts,
            started_by=requester.to_json(),
        )
        if self._awaits and self._approval is not None:  # caps count it: requests cannot pile up unbounded
            job = job.evolve(**self._approval.awaiting())
            self._scope.new_jobs.append(job)
            deciders = f"{requester.label}{' or an approver' if self._approval.approvers else ''}"
            until = when(job.approval["expires_at"] if job.approval else None)
            return json.dumps({"job_id": job.id, "status": job.status, "message": (
                f"`{job.tool}` needs a person's approval before it runs, so nothing has been done yet: I posted "
                f"a card asking for it (job `{job.id}`). {deciders} can approve or reject it until {until}; I'll "
                "carry on when someone decides.")})
        self._scope.new_jobs.append(job)
        message = (
            self._spec.scheduled_message(args, job.id)
            if self._spec.scheduled_message
            else f"Started `{job.tool}` as background job `{job.id}`; I'll report back when it finishes."
        )
        return json.dumps({"job_id": job.id, "status": "queued", "message": message})


class PlainTool(CachedSchema, BaseTool[BaseModel, Any]):
    """A declared plain tool as the model sees it: validated arguments, the declared timeout and retries.

    The result goes back to the model as text: a string as it is, anything else as JSON."""

    def __init__(self, declared: DeclaredTool) -> None:
        super().__init__(declared.args_model, str, declared.name, declared.description)
        self._declared = declared

    async def run_json(self, args: Any, cancellation_token: CancellationToken, call_id: str | None = None) -> Any:
        try:
            validated = self._declared.args_model.model_validate(args)
        except ValidationError as exc:
            raise ValueError(validation_message(exc)) from None
        return await self.run(validated, cancellation_token)

    async def run(self, args: BaseModel, cancellation_token: CancellationToken) -> str:
        declared = self._declared
        for attempt in range(1, declared.retry.max_attempts + 1):
            try:
                value = await asyncio.wait_for(declared.invoke(args), timeout=declared.timeout)
                return value if isinstance(value, str) else json.dumps(value, default=str)
            except PermanentJobError:
                raise
            except TimeoutError:
                if attempt == declared.retry.max_attempts:
                    raise TimeoutError(f"{declared.name} timed out after {declared.timeout:g} s") from None
            except Exception:
                if attempt == declared.retry.max_attempts:
                    raise
            await asyncio.sleep(declared.retry.delay(attempt))
        raise AssertionError("unreachable")  # the loop returns or raises


def describe_job(job: JobRecord, *, full: bool = True) -> str:
    """One line a person can read: what, state, progress, attempts, outcome (tool-written text escaped);
    who started it when that is recorded. ``full=False`` (someone else's job in a shared conversation):
    no arguments, no outcome text."""
    args = escape_markdown(", ".join(str(v) for v in job.arguments.values())) if full else ""
    by = f", started by {escape_markdown(who)}" if (who := started_by_label(job)) else ""
    head = f"Job `{job.id}` ({escape_markdown(job.tool)}{' ' + args if args else ''}{by}): **{job.status}**"
    if (decided := decision_line(job)) is not None:  # issue 16: who decided and when
        head += f" ({escape_markdown(decided)})"
    if not full:
        return head
    # Short facts go in one pair of brackets; an outcome (a tool's sentence, which may hold
    # brackets of its own) follows as a sentence, so brackets never nest.
    details: list[str] = []
    if job.status == "running" and job.progress is not None:
        details.append(f"{job.progress:.0%}" + (f", {escape_markdown(job.progress_text)}" if job.progress_text else ""))
    if job.max_attempts > 1 and (job.attempt > 1 or job.next_retry_at):
        details.append(f"attempt {job.attempt} of {job.max_attempts}")
    outcome = ""
    if job.status == "queued" and job.next_retry_at:
        wait = max(0.0, job.next_retry_at - time.time())
        details.append(f"retrying in {wait:.0f} s")
        outcome = f"Last error: {escape_markdown(job.error or '')}"
    if job.status == "failed" and job.error:
        outcome = escape_markdown(job.error)
    if job.status == "succeeded" and isinstance(job.result, dict) and job.result.get("message"):
        outcome = escape_markdown(str(job.result["message"]))
    line = head + (" (" + "; ".join(details) + ")" if details else "")
    return f"{line}. {outcome}" if outcome else line


def not_found(job_id: str) -> str:
    return json.dumps({"error": "not_found", "message": f"There is no job {inline_code(job_id)} in this conversation."})


def job_tools(scope: TurnScope, store: ConversationStore, runner: JobRunner,
              access: JobAccess | None = None) -> list[BaseTool[Any, Any]]:
    key = scope.conversation_key
    access = access or JobAccess()
    viewer = scope.requester

    async def get_job_status(job_id: str = "") -> str:
        """Status of a background job in this conversation; an empty job_id means the latest job."""
        if job_id:
            try:
                job = await store.get_job(key, job_id)
            except JobNotFoundError:
                return not_found(job_id)
        else:
            jobs = await store.list_jobs(key)
            if not jobs:
                return json.dumps({"message": "There are no background jobs in this conversation yet."})
            job = jobs[-1]
        if not shows_arguments(job, viewer):  # someone else's job in a group chat or channel
            return json.dumps({"job": public_view(job), "message": describe_job(job, full=False)}, default=str)
        return json.dumps({"job": job.to_json(), "message": describe_job(job)}, default=str)

    async def list_jobs() -> str:
        """List the background jobs of this conversation (the most recent ones) with their status."""
        jobs = await store.list_jobs(key)
        if not jobs:
            return json.dumps({"jobs": [], "message": "There are no background jobs in this conversation yet."})
        # The result is stored in the agent's state: keep it small however many jobs there are.
        shown = jobs[-LIST_JOBS_LIMIT:]
        lines = "\n".join(f"- {describe_job(j, full=shows_arguments(j, viewer))}" for j in shown)
        more = f"\n({len(jobs) - len(shown)} older jobs not shown)" if len(jobs) > len(shown) else ""
        return json.dumps({"jobs": [j.id for j in shown], "message": f"Jobs in this conversation:\n{lines}{more}"})

    async def cancel_job(job_id: str) -> str:
        """Cancel a background job of this conversation by its id."""
        try:
            if (refusal := access.cancel_refusal(await store.get_job(key, job_id), viewer)) is not None:
                metrics.CANCELS_REFUSED.inc()
                return json.dumps({"error": "not_allowed", "message": refusal})
            outcome = await runner.cancel(key, job_id)
        except JobNotFoundError:
            return not_found(job_id)
        status = outcome.job.status if outcome.already_finished else "cancelling"
        return json.dumps({"status": status, "message": outcome.message()})

    return [HelperTool(get_job_status), HelperTool(list_jobs), HelperTool(cancel_job)]


def turn_tools(scope: TurnScope, registry: JobRegistry, store: ConversationStore, runner: JobRunner,
               caps: JobCaps | None = None, access: JobAccess | None = None,
               plain: Sequence[DeclaredTool] = (), approval: ApprovalPolicy | None = None,
               ) -> Sequence[BaseTool[Any, Any]]:
    """The turn's tools: the declared plain ones, one per long-running tool (it records a job), and the
    job helper tools; ``caps`` None: no caps (the app passes its settings'); ``approval``: which tools
    wait for a person's yes (None: only those declared with ``approval=True``)."""
    approval = approval or ApprovalPolicy()
    return ([PlainTool(declared) for declared in plain]
            + [ScheduleJobTool(spec, scope, store, caps, approval) for spec in registry]
            + job_tools(scope, store, runner, access))
