"""Durable human approval (issue 16): the policy, the gate, the claim, expiry and withdrawal in the runner."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from autogen_core import CancellationToken

from agent.tools import ScheduleJobTool, TurnScope
from jobs.activate_line import make_activate_line_tool
from jobs.approval import (
    AWAITING,
    ApprovalPolicy,
    ApprovalRefusedError,
    Approvals,
    approval_event,
)
from jobs.caps import JobCaps
from jobs.context import JobContext
from jobs.registry import JobRegistry, ToolDeclarationError, load_tool_modules, tool
from jobs.runner import JobRunner
from runtime.config import ConfigError, Settings
from runtime.protocol import Requester, approval_event_id, finished_event_id
from storage.abc import JobRecord
from storage.inbox import Inbox
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "msteams:group"
ADA = Requester(id="29:ada", name="Ada", aad_object_id="aad-ada", conversation_type="groupChat")
BOB = Requester(id="29:bob", name="Bob", aad_object_id="aad-bob", conversation_type="groupChat")
GRACE = Requester(id="29:grace", name="Grace", aad_object_id="3F2504E0-4F89-11D3-9A0C-0305E82C3301")
POLICY = ApprovalPolicy.of(["activate_new_line"], ["3f2504e0-4f89-11d3-9a0c-0305e82c3301"], 1.0)


def awaiting(job_id: str = "j1", expires_in: float = 3600.0) -> JobRecord:
    return JobRecord(id=job_id, conversation_key=KEY, tool="activate_new_line", arguments={"phone_number": "555-0100"},
                     status=AWAITING, started_by=ADA.to_json(), approval={"expires_at": time.time() + expires_in})


def test_the_requester_and_the_approvers_may_decide_no_one_else() -> None:
    job = awaiting()
    assert POLICY.refusal(job, ADA) is None and POLICY.refusal(job, GRACE) is None
    assert POLICY.refusal(job, BOB) == "Only Ada or an approver can approve or reject job `j1`. Nothing was changed."
    assert ApprovalPolicy().refusal(job, BOB) == "Only Ada can approve or reject job `j1`. Nothing was changed."


def test_settings_are_checked_at_start_up() -> None:
    with pytest.raises(ConfigError, match="APPROVERS must list Entra ID"):
        Settings.from_env({"APPROVERS": "ada@example.com"}, dotenv=None)
    with pytest.raises(ConfigError, match="APPROVAL_TIMEOUT_HOURS must be more than 0"):
        Settings.from_env({"APPROVAL_TIMEOUT_HOURS": "0"}, dotenv=None)
    declared = load_tool_modules(["jobs.activate_line", "examples.weather"])
    assert POLICY.check_tools(declared) == []
    assert "no module in TOOL_MODULES declares" in ApprovalPolicy.of(["activate_new_lin"], [], 1).check_tools(
        declared)[0]
    plain = next(t.name for t in declared if not t.long_running)
    with pytest.raises(ConfigError, match="plain tools"):
        ApprovalPolicy.of([plain], [], 1).check_tools(declared)


def test_approval_is_declared_on_long_running_tools_only() -> None:
    @tool(long_running=True, approval=True)
    async def wire_money(ctx: JobContext, amount: int) -> str:
        """Send money."""
        return "sent"

    assert wire_money.approval and wire_money.job.approval and ApprovalPolicy().requires(wire_money.job)
    with pytest.raises(ToolDeclarationError, match="approval=True is for long-running tools only"):
        @tool(approval=True)
        async def plain(amount: int) -> str:
            """Plain."""
            return "x"


async def test_a_call_records_an_awaiting_job_that_the_caps_count() -> None:
    store = MemoryStore()
    scope = TurnScope(KEY, ADA)
    tool_ = ScheduleJobTool(make_activate_line_tool(1), scope, store, JobCaps(per_conversation=5, per_user=1), POLICY)
    answer = json.loads(await tool_.run_json({"phone_number": "555-0100"}, CancellationToken()))
    assert answer["status"] == AWAITING and "nothing has been done yet" in answer["message"]
    [job] = scope.new_jobs
    assert job.status == AWAITING and job.approval is not None and job.approval["expires_at"] > time.time() + 3500
    again = json.loads(await tool_.run_json({"phone_number": "555-0101"}, CancellationToken()))
    assert again["reason"] == "user_cap"  # a request waiting for approval counts: they cannot pile up


async def test_the_decision_is_claimed_once_and_announced_once() -> None:
    store = MemoryStore()
    woken: list[str] = []
    await add_job(store, awaiting())
    approvals = Approvals(store, Inbox(store, woken.append), POLICY)
    with pytest.raises(ApprovalRefusedError):
        await approvals.decide(KEY, "j1", True, BOB)
    assert (await store.get_job(KEY, "j1")).status == AWAITING  # the refusal changed nothing
    outcomes = await asyncio.gather(approvals.decide(KEY, "j1", True, ADA), approvals.decide(KEY, "j1", False, GRACE),
                                    approvals.decide(KEY, "j1", True, GRACE))
    assert [o.won for o in outcomes].count(True) == 1
    event = await store.get_event(KEY, approval_event_id("j1"))
    assert event is not None and woken == [KEY]  # one event, one wake-up
    winner = next(o for o in outcomes if o.won)
    assert event.payload["decision"] == (winner.job.approval or {})["decision"]


async def test_the_runner_expires_a_due_request_and_never_runs_the_tool() -> None:
    store = MemoryStore()
    activations: dict[str, str] = {}
    registry = JobRegistry([make_activate_line_tool(0, activations)])
    runner = JobRunner(store, registry, lambda key: None)
    await add_job(store, awaiting("due", expires_in=-1.0), awaiting("later"))
    await runner.run(KEY, "later")  # not due: nothing happens
    assert (await store.get_job(KEY, "later")).status == AWAITING
    await runner.run(KEY, "due")
    expired = await store.get_job(KEY, "due")
    assert (expired.status, expired.attempt, (expired.approval or {}).get("decision")) == ("expired", 0, "expired")
    event = await store.get_event(KEY, finished_event_id("due"))
    assert event is not None and "approval request expired" in event.payload["content"]
    assert activations == {}  # the tool never ran


async def test_a_rejected_job_ends_rejected_and_an_approved_one_runs_with_its_event() -> None:
    store = MemoryStore()
    registry = JobRegistry([make_activate_line_tool(0)])
    runner = JobRunner(store, registry, lambda key: None)
    approvals = Approvals(store, Inbox(store, lambda key: None), POLICY)
    await add_job(store, awaiting("no"), awaiting("yes"))
    await approvals.decide(KEY, "no", False, GRACE)
    await runner.run(KEY, "no")
    rejected = await store.get_job(KEY, "no")
    assert (rejected.status, rejected.started_at) == ("rejected", None)
    finished = await store.get_event(KEY, finished_event_id("no"))
    assert finished is not None and "rejected by Grace" in finished.payload["content"]
    # An approval whose event a crash lost (claimed in the store only): the run appends it.
    claimed = await store.transition_job(KEY, "yes", AWAITING, {"status": "queued", "approval": {
        "decision": "approved", "by": ADA.to_json(), "at": time.time()}})
    assert claimed is not None and await store.get_event(KEY, approval_event_id("yes")) is None
    await runner.run(KEY, "yes")
    assert (await store.get_job(KEY, "yes")).status == "succeeded"
    event = await store.get_event(KEY, approval_event_id("yes"))
    assert event is not None and event.payload == approval_event(claimed).payload


async def test_cancel_withdraws_a_request() -> None:
    store = MemoryStore()
    runner = JobRunner(store, JobRegistry([make_activate_line_tool(0)]), lambda key: None)
    await add_job(store, awaiting())
    result = await runner.cancel(KEY, "j1")
    assert result.job.status == "cancelled"
    event = await store.get_event(KEY, finished_event_id("j1"))
    assert event is not None and "cancelled while it awaited approval" in event.payload["content"]
