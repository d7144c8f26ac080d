"""Job ownership (who may cancel, who sees arguments) and the active-job caps."""

from __future__ import annotations

import json

import pytest
from autogen_core import CancellationToken

from agent.tools import ScheduleJobTool, TurnScope, job_tools
from jobs.access import CancelRefusedError, JobAccess, same_person, shows_arguments
from jobs.activate_line import make_activate_line_tool
from jobs.caps import JobCaps
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from runtime.protocol import Requester
from storage.abc import JobRecord
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "msteams:group"
ADA = Requester(id="29:ada", name="Ada", aad_object_id="aad-ada", conversation_type="groupChat")
BOB = Requester(id="29:bob", name="Bob", aad_object_id="aad-bob", conversation_type="groupChat")
ADMIN = Requester(id="29:root", name="Root", aad_object_id="AAD-ROOT", conversation_type="groupChat")


def job(job_id: str, by: Requester | None, *, key: str = KEY, status: str = "queued") -> JobRecord:
    return JobRecord(id=job_id, conversation_key=key, tool="activate_new_line", arguments={"phone_number": "555-0100"},
                     status=status, started_by=by.to_json() if by else None)


def test_same_person_prefers_the_aad_object_id_then_the_channel_id() -> None:
    assert same_person(ADA, Requester(id="other-channel-id", aad_object_id="AAD-ADA"))
    assert not same_person(ADA, Requester(id="29:ada", aad_object_id="aad-mallory"))  # both have one: it decides
    assert same_person(Requester(id="user-1"), Requester(id="user-1", aad_object_id="x"))  # Emulator: channel id
    assert not same_person(Requester(), Requester())


def test_only_the_starter_or_an_admin_may_cancel() -> None:
    access = JobAccess.of(["aad-root"])
    mine = job("j1", ADA)
    access.check_cancel(mine, ADA)
    access.check_cancel(mine, ADMIN)
    with pytest.raises(CancelRefusedError, match=r"Only Ada, who started job `j1`, or a bot admin can cancel it"):
        access.check_cancel(mine, BOB)
    assert JobAccess().cancel_refusal(mine, None) is not None  # a job-result turn cancels no one's job
    assert JobAccess().cancel_refusal(job("old", None), BOB) is None  # no recorded starter: as before


def test_arguments_are_hidden_from_other_members_of_shared_conversations_only() -> None:
    mine = job("j1", ADA)
    assert shows_arguments(mine, ADA) and not shows_arguments(mine, BOB) and not shows_arguments(mine, None)
    assert shows_arguments(mine, Requester(id="29:bob", conversation_type="personal"))
    assert shows_arguments(job("old", None), BOB)


async def test_job_tools_refuse_another_members_cancel_and_hide_their_arguments() -> None:
    store = MemoryStore()
    registry = JobRegistry([make_activate_line_tool(1)])
    runner = JobRunner(store, registry, lambda key: None)
    await add_job(store, job("j1", ADA))
    tools = {t.name: t for t in job_tools(TurnScope(KEY, BOB), store, runner, JobAccess())}
    refused = json.loads(await tools["cancel_job"].run_json({"job_id": "j1"}, CancellationToken()))
    assert refused["error"] == "not_allowed" and "Only Ada" in refused["message"]
    assert not (await store.get_job(KEY, "j1")).cancel_requested
    listed = json.loads(await tools["list_jobs"].run_json({}, CancellationToken()))
    status = json.loads(await tools["get_job_status"].run_json({"job_id": "j1"}, CancellationToken()))
    for text in (listed["message"], status["message"], json.dumps(status["job"])):
        assert "555-0100" not in text and "Ada" in text, text
    own = {t.name: t for t in job_tools(TurnScope(KEY, ADA), store, runner, JobAccess())}
    assert "555-0100" in json.loads(await own["list_jobs"].run_json({}, CancellationToken()))["message"]
    cancelled = json.loads(await own["cancel_job"].run_json({"job_id": "j1"}, CancellationToken()))
    assert cancelled["status"] == "cancelling" and (await store.get_job(KEY, "j1")).cancel_requested


async def test_caps_count_the_conversation_the_person_and_this_turns_jobs() -> None:
    store = MemoryStore()
    caps = JobCaps(per_conversation=3, per_user=2)
    await add_job(store, job("a1", ADA))
    await add_job(store, job("done", ADA, status="succeeded"))  # finished jobs do not count
    assert await caps.refusal(store, KEY, ADA) is None
    await add_job(store, job("a2", ADA, key="msteams:elsewhere"))  # the same person in another conversation
    refused = await caps.refusal(store, KEY, ADA)
    assert refused is not None and refused[0] == "user_cap" and "MAX_ACTIVE_JOBS_PER_USER = 2" in refused[1]
    assert await caps.refusal(store, KEY, BOB) is None
    earlier = [job("b1", BOB)]  # recorded this turn, not stored yet
    refused = await caps.refusal(store, KEY, BOB, [*earlier, job("b2", BOB)])
    assert refused is not None and refused[0] == "conversation_cap"
    assert await JobCaps(0, 0).refusal(store, KEY, ADA) is None  # 0: no cap


async def test_schedule_job_tool_records_who_started_it_and_refuses_past_a_cap() -> None:
    store = MemoryStore()
    spec = make_activate_line_tool(1)
    scope = TurnScope(KEY, ADA)
    tool = ScheduleJobTool(spec, scope, store, JobCaps(per_conversation=2, per_user=5))
    for number in ("555-0100", "555-0101"):
        assert json.loads(await tool.run_json({"phone_number": number}, CancellationToken()))["status"] == "queued"
    third = json.loads(await tool.run_json({"phone_number": "555-0102"}, CancellationToken()))
    assert third["reason"] == "conversation_cap" and "Nothing was started" in third["message"]
    assert [j.started_by for j in scope.new_jobs] == [ADA.to_json(), ADA.to_json()]
    nobody = TurnScope(KEY, None)  # a job-result turn
    refused = json.loads(await ScheduleJobTool(spec, nobody, store).run_json({"phone_number": "555-0100"},
                                                                             CancellationToken()))
    assert refused["reason"] == "no_requester" and nobody.new_jobs == []
