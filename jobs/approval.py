"""Durable human approval (issue 16): a long-running tool that waits for a person's yes.

A tool needs approval when it is declared with ``@tool(approval=True)`` or named in the
``APPROVAL_REQUIRED_TOOLS`` setting. Calling it records the job, in the turn's commit like any
job (agent/tools.py), with the status ``awaiting_approval`` and ``approval = {"expires_at": ...}``:
nothing runs, and the model is told that the request waits for approval. The outbox posts an
approval card instead of the live job card (bot/approval_cards.py), with the same
``card:<job id>`` id, so the card updater keeps it current in place.

Who may decide: the person who asked (``JobRecord.started_by``, as the edge authenticated it) and
the ``APPROVERS`` (AAD object ids). A decision is **claimed once**, in the store:
``JobStore.transition_job(awaiting_approval -> queued, approval.decision = ...)`` changes the job
only if it still awaits, so of a double click, two approvers at once or a redelivered invoke one
wins and the others are told it was decided already. The winner then appends the
``approval:<job id>`` event (:func:`approval_event`) through the inbox; the processor tells the
agent (an approval) and schedules the job; the job runner runs it (approved) or ends it
``rejected`` without running the tool, announcing that through the usual ``job:<id>`` result.

Crash windows. After the claim and before the event: the job is ``queued`` with its decision, so
the worker's recovery (``JobRunner.recover``) runs it and the runner appends the missing event
itself (idempotent, ``approval_event_id``); a click on the card meanwhile appends it too. After the
event and before the processor scheduled the job: recovery runs it. The tool runs at most as a
job always does (at least once per attempt, keyed by the job id), never twice for two clicks.

Expiry (``APPROVAL_TIMEOUT_HOURS``, default 72): an APScheduler date job in the existing job store
(``expiry_timer_id``), so the wait survives restarts and a takeover by another worker like any
retry timer; recovery re-arms a missing one. When it fires, the runner claims ``expired`` the same
conditional way (a decision at the same moment wins or loses cleanly) and announces it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jobs.access import same_person, starter
from jobs.registry import DeclaredTool, LongRunningTool
from runtime.config import ConfigError
from runtime.crashpoints import crash_point
from runtime.protocol import EventKind, JobResult, Requester, approval_event_id
from storage.abc import ConversationStore, InboxEvent, JobRecord
from storage.inbox import Inbox

log = logging.getLogger(__name__)

AWAITING = "awaiting_approval"
APPROVED, REJECTED, EXPIRED = "approved", "rejected", "expired"

#: The APScheduler id of a job's expiry timer (beside ``<job id>``, its attempts' timers).
_EXPIRY = "approval-expiry:"


def expiry_timer_id(job_id: str) -> str:
    return f"{_EXPIRY}{job_id}"


def when(timestamp: float | None) -> str:
    if not timestamp:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _approval(job: JobRecord) -> Mapping[str, Any]:
    return job.approval if isinstance(job.approval, Mapping) else {}


def decision(job: JobRecord) -> str | None:
    """``approved``, ``rejected`` or ``expired`` once decided; None while it awaits (or needs none)."""
    value = _approval(job).get("decision")
    return value if isinstance(value, str) else None


def decided_by(job: JobRecord) -> Requester | None:
    by = _approval(job).get("by")
    return Requester.from_json(by) if isinstance(by, Mapping) else None


def expires_at(job: JobRecord) -> float:
    value = _approval(job).get("expires_at")
    return float(value) if isinstance(value, int | float) else 0.0


def decision_line(job: JobRecord) -> str | None:
    """One sentence for cards and lists: who decided and when (None for a job that needed no approval)."""
    if job.approval is None:
        return None
    choice, at = decision(job), _approval(job).get("at")
    if choice is None:
        return f"Awaiting approval until {when(expires_at(job))}"
    if choice == EXPIRED:
        return f"Expired at {when(at)} without a decision"
    who = decided_by(job)
    return f"{choice.capitalize()} by {who.label if who else 'someone'} at {when(at)}"


def outcome_message(job: JobRecord) -> str:
    """What the model is told, as the tool's outcome, of a request that did not run."""
    what = f"Job `{job.id}` ({job.tool.replace('_', ' ')})"
    if job.status == EXPIRED:
        return (f"{what} was not run: the approval request expired at {when(_approval(job).get('at'))} "
                "without a decision. The user may ask again.")
    who = decided_by(job)
    return f"{what} was not run: rejected by {who.label if who else 'someone'}."


def approval_event(job: JobRecord) -> InboxEvent:
    """The ``approval:<job id>`` event of a decided job; its payload is a :class:`JobResult` (status
    ``approved`` or ``rejected``) the agent reads as a tool result, plus the decision."""
    choice = decision(job) or APPROVED
    who = decided_by(job)
    name = who.label if who else "someone"
    what = f"Job `{job.id}` ({job.tool.replace('_', ' ')})"
    message = (f"{what} was approved by {name} and is starting now; its result will follow when it finishes."
               if choice == APPROVED else f"{what} was not run: {choice} by {name}.")
    result = JobResult(job_id=job.id, call_id=job.call_id, tool=job.tool, status=choice,
                       content=json.dumps({"message": message, "job_id": job.id}), is_error=False,
                       arguments=job.arguments)
    return InboxEvent(id=approval_event_id(job.id), kind=EventKind.APPROVAL,
                      payload={**result.to_json(), "decision": choice, "by": who.to_json() if who else None})


@dataclass(frozen=True)
class ApprovalPolicy:
    """Which tools wait for approval, who may decide besides the requester, how long a request waits."""

    #: APPROVAL_REQUIRED_TOOLS (beside tools declared with ``approval=True``).
    tools: frozenset[str] = frozenset()
    #: APPROVERS: lower-case AAD object ids.
    approvers: frozenset[str] = frozenset()
    #: APPROVAL_TIMEOUT_HOURS, in seconds.
    timeout_seconds: float = 72 * 3600.0

    @classmethod
    def of(cls, tools: Iterable[str], approvers: Iterable[str], timeout_hours: float) -> ApprovalPolicy:
        return cls(frozenset(tools), frozenset(a.lower() for a in approvers), timeout_hours * 3600.0)

    def requires(self, spec: LongRunningTool) -> bool:
        return spec.approval or spec.name in self.tools

    def awaiting(self, now: float | None = None) -> dict[str, Any]:
        """The fields of a job recorded to await a decision."""
        return {"status": AWAITING, "approval": {"expires_at": (now or time.time()) + self.timeout_seconds}}

    def is_approver(self, requester: Requester) -> bool:
        return bool(requester.aad_object_id) and requester.aad_object_id.lower() in self.approvers

    def refusal(self, job: JobRecord, requester: Requester) -> str | None:
        """None if ``requester`` may decide ``job``; else the sentence that says who may."""
        owner = starter(job)
        if self.is_approver(requester) or (owner is not None and same_person(owner, requester)):
            return None
        approvers = " or an approver" if self.approvers else ""
        return (f"Only {owner.label if owner else 'the person who asked'}{approvers} can approve or reject "
                f"job `{job.id}`. Nothing was changed.")

    def check_tools(self, declared: Sequence[DeclaredTool]) -> list[str]:
        """Start-up check of APPROVAL_REQUIRED_TOOLS: a plain tool is a ConfigError (it runs inside the
        turn, so it cannot wait); a name no module declares is a warning (returned)."""
        by_name = {t.name: t for t in declared}
        if plain := sorted(n for n in self.tools if n in by_name and not by_name[n].long_running):
            raise ConfigError(f"APPROVAL_REQUIRED_TOOLS names plain tools ({', '.join(plain)}), which run inside "
                              "the turn and cannot wait; only long-running tools (@tool(long_running=True)) can "
                              "wait for approval")
        if unknown := sorted(n for n in self.tools if n not in by_name):
            return [f"APPROVAL_REQUIRED_TOOLS names {', '.join(unknown)}, which no module in TOOL_MODULES declares "
                    "(check the spelling; an MCP server's long-running tool of that name also waits)"]
        return []


class ApprovalRefusedError(Exception):
    """The requester may not decide this job; ``str(error)`` says who may. Nothing changed."""

    def __init__(self, job: JobRecord, message: str) -> None:
        super().__init__(message)
        self.job = job


@dataclass(frozen=True)
class Decided:
    job: JobRecord  # as it stands now
    won: bool  # this call took the decision (False: it had been taken already)

    def message(self) -> str:
        line = decision_line(self.job) or f"Job `{self.job.id}` needs no approval"
        return f"{line}." if self.won else f"Job `{self.job.id}` was decided already: {line}."


class Approvals:
    """Takes a person's decision on a job awaiting approval (any instance may: the edge).

    ``on_decided(job)``: after a won claim (the card updater shows the decision to everyone)."""

    def __init__(self, store: ConversationStore, inbox: Inbox, policy: ApprovalPolicy,
                 on_decided: Callable[[JobRecord], Awaitable[None]] | None = None) -> None:
        self._store = store
        self._inbox = inbox
        self._policy = policy
        self._on_decided = on_decided

    async def decide(self, key: str, job_id: str, approve: bool, requester: Requester) -> Decided:
        """Raises JobNotFoundError, or ApprovalRefusedError (nothing changes)."""
        job = await self._store.get_job(key, job_id)
        if job.status != AWAITING:
            await self._repair(job)
            return Decided(job, won=False)
        if (refusal := self._policy.refusal(job, requester)) is not None:
            raise ApprovalRefusedError(job, refusal)
        now = time.time()
        choice = APPROVED if approve else REJECTED
        claimed = await self._store.transition_job(key, job_id, AWAITING, {"status": "queued", "approval": {
            **_approval(job), "decision": choice, "by": requester.to_json(), "at": now}})
        if claimed is None:  # someone else decided (or it expired) a moment before
            return Decided(await self._store.get_job(key, job_id), won=False)
        log.info("job %s %s by %s", job_id, choice, requester.label)
        crash_point("approval_claimed")  # claimed, its event not yet appended: recovery appends it
        await self._inbox.post(key, approval_event(claimed))
        if self._on_decided is not None:
            try:
                await self._on_decided(claimed)
            except Exception:  # the decision stands; the card catches up with the job's next change
                log.exception("could not show the decision on the card of job %s", job_id)
        return Decided(claimed, won=True)

    async def _repair(self, job: JobRecord) -> None:
        """A decided job not yet finished: append its approval event if a crash lost it (a no-op if stored)."""
        if decision(job) in (APPROVED, REJECTED) and not job.finished:
            await self._inbox.post(job.conversation_key, approval_event(job))
