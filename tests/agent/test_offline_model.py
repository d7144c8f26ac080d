"""The offline model maps documented phrases to the tool calls an LLM would make."""

from __future__ import annotations

import json
from typing import Any

import pytest
from autogen_core.models import FunctionExecutionResult, FunctionExecutionResultMessage, UserMessage
from autogen_core.tools import ToolSchema

from agent.events import JOB_RESULT_SOURCE, format_job_result
from agent.offline_model import OfflineChatCompletionClient
from jobs.activate_line import activate_new_line
from runtime.protocol import JobResult

TOOLS: list[ToolSchema] = [{"name": n, "description": ""}
                           for n in ("activate_new_line", "get_job_status", "list_jobs", "cancel_job")]


async def respond(text: str, source: str = "user", history: list[UserMessage] | None = None) -> Any:
    client = OfflineChatCompletionClient(tools=[activate_new_line])  # the demo's phrase, from its declaration
    result = await client.create([*(history or []), UserMessage(content=text, source=source)], tools=TOOLS)
    return result.content


@pytest.mark.parametrize(
    ("text", "tool", "arguments"),
    [
        ("activate line 555-0100", "activate_new_line", {"phone_number": "555-0100"}),
        ("Please activate a new line for +1 425 555 0100.", "activate_new_line", {"phone_number": "+1 425 555 0100"}),
        ("status", "get_job_status", {"job_id": ""}),
        ("is it done?", "get_job_status", {"job_id": ""}),
        ("status 0a1b2c3d4e5f", "get_job_status", {"job_id": "0a1b2c3d4e5f"}),
        ("list jobs", "list_jobs", {}),
        ("cancel 0a1b2c3d4e5f", "cancel_job", {"job_id": "0a1b2c3d4e5f"}),
    ],
)
async def test_phrases_become_tool_calls(text: str, tool: str, arguments: dict[str, str]) -> None:
    [call] = await respond(text)  # type: ignore[misc]
    assert (call.name, json.loads(call.arguments)) == (tool, arguments)


async def test_help_says_it_is_the_offline_model_and_how_to_configure_one() -> None:
    text = await respond("help")
    assert isinstance(text, str) and "offline model" in text and "OPENAI_API_KEY" in text


async def test_anything_else_gets_a_plain_answer() -> None:
    text = await respond("tell me a joke")
    assert isinstance(text, str) and "offline model" in text and "tell me a joke" in text


async def test_it_remembers_from_the_context_it_is_given() -> None:
    assert await respond("what's my name?") == "You haven't told me your name yet."
    history = [UserMessage(content="my name is Ada", source="user")]
    assert await respond("what is my name?", history=history) == "Your name is Ada."


async def test_tool_results_and_job_results_are_relayed() -> None:
    client = OfflineChatCompletionClient()
    results = FunctionExecutionResultMessage(content=[FunctionExecutionResult(
        content=json.dumps({"message": "Started job `x`."}), name="activate_new_line", call_id="c1", is_error=False)])
    assert (await client.create([results])).content == "Started job `x`."
    job = JobResult(job_id="x", call_id="c1", tool="activate_new_line", status="failed",
                    content="carrier offline", is_error=True, arguments={})
    text = await respond(format_job_result(job), source=JOB_RESULT_SOURCE)
    assert text == "Sorry, `activate_new_line` failed: carrier offline"


async def test_missing_tools_are_explained_not_called() -> None:
    client = OfflineChatCompletionClient()
    result = await client.create([UserMessage(content="list jobs", source="user")], tools=[])
    assert result.content == "The `list_jobs` tool is not available to you right now."
