"""The agent turn runner: real AutoGen team, scripted with the offline model, state round-trips."""

from __future__ import annotations

import json
from typing import Any

from agent.offline_model import OfflineChatCompletionClient
from agent.runner import AgentTurnRunner
from agent.tools import turn_tools
from agent.turns import AgentInput
from jobs.activate_line import activate_new_line, make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from runtime.protocol import Requester
from storage.memory import MemoryStore

KEY = "emulator:c1"
ADA = Requester(id="user-1", name="Ada", aad_object_id="aad-ada", tenant_id="tenant-1", conversation_type="personal")


def make_runner(context_messages: int = 40, thread_messages: int = 20) -> AgentTurnRunner:
    store = MemoryStore()
    registry = JobRegistry([make_activate_line_tool(1)])
    jobs = JobRunner(store, registry, lambda key: None)
    return AgentTurnRunner(OfflineChatCompletionClient(tools=[activate_new_line]),
                           lambda scope: turn_tools(scope, registry, store, jobs),
                           context_messages=context_messages, thread_messages=thread_messages)


async def test_state_round_trips_through_a_fresh_team() -> None:
    runner = make_runner()
    first = await runner.run(KEY, None, [AgentInput("my name is Ada")])
    stored = json.loads(json.dumps(first.state))  # what the store keeps is plain JSON
    second = await make_runner().run(KEY, stored, [AgentInput("what is my name?")])
    assert second.replies == ["Your name is Ada."]


async def test_a_long_running_tool_call_records_a_job_with_its_call_id() -> None:
    outcome = await make_runner().run(KEY, None, [AgentInput("activate line 555-0100", requester=ADA)])
    [job] = outcome.new_jobs
    assert (job.tool, job.arguments, job.status, job.conversation_key, job.started_by) == (
        "activate_new_line", {"phone_number": "555-0100"}, "queued", KEY, ADA.to_json())
    messages = outcome.state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]
    [call] = [c for m in messages if m["type"] == "AssistantMessage" and isinstance(m["content"], list)
              for c in m["content"]]
    assert job.call_id == call["id"]
    assert outcome.replies == [f"I've started activating line 555-0100 (job `{job.id}`). It takes about 1 seconds; "
                               "I'll message you here when it's done."]


async def test_invalid_arguments_get_a_readable_error_and_no_job() -> None:
    outcome = await make_runner().run(KEY, None, [AgentInput("activate line 12")])
    assert outcome.new_jobs == []
    [reply] = outcome.replies
    assert "'12' is not a phone number" in reply and "errors.pydantic.dev" not in reply


async def test_stored_state_stays_bounded_however_long_the_conversation() -> None:
    runner = make_runner(context_messages=10, thread_messages=6)
    state: dict[str, Any] = {}
    sizes = []
    for turn in range(60):
        outcome = await runner.run(KEY, state, [AgentInput(f"my name is Person{turn}")])
        state = json.loads(json.dumps(outcome.state))
        sizes.append(len(json.dumps(state)))
    messages = state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]
    thread = state["agent_states"]["RoundRobinGroupChatManager"]["message_thread"]
    assert len(messages) <= 10 and len(thread) <= 6
    assert max(sizes[30:]) <= max(sizes[:30]) + 64  # levels off: no growth after the bound is reached
    final = await runner.run(KEY, state, [AgentInput("what is my name?")])
    assert final.replies == ["Your name is Person59."]


async def test_huge_messages_are_clipped_in_the_stored_state() -> None:
    outcome = await make_runner().run(KEY, None, [AgentInput("é" * 20_000)])
    stored = json.dumps(outcome.state, ensure_ascii=False)
    assert len(stored) < 20_000  # 20,000 characters in, twice (context and thread), 4,000 each kept
    assert "truncated in the stored history" in stored
