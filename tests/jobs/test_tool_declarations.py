"""``@tool`` declarations (jobs/registry.py) and loading the modules TOOL_MODULES names."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from autogen_core import CancellationToken
from pydantic import BaseModel

from agent.offline_model import OfflineChatCompletionClient, help_text
from agent.tool_policy import ToolPolicy
from agent.tools import PlainTool, TurnScope, turn_tools
from jobs.context import JobContext
from jobs.registry import (
    DeclaredTool,
    JobRegistry,
    PermanentJobError,
    RetryPolicy,
    ToolDeclarationError,
    load_tool_modules,
    tool,
    tool_setting,
)
from jobs.runner import JobRunner
from runtime.config import ConfigError, Settings
from storage.memory import MemoryStore


@tool(example="echo hello", offline_phrase=re.compile(r"^echo\b\s*(?P<text>.*)$"))
async def echo(text: str, times: int = 1) -> str:
    """Repeat a text.

    More words for the model."""
    return " ".join([text] * times)


class Order(BaseModel):
    item: str
    quantity: int = 1


@tool(long_running=True, timeout=5, retry=RetryPolicy(max_attempts=4))
async def place_order(ctx: JobContext, order: Order) -> str:
    """Place an order."""
    return f"ordered {order.quantity} {order.item} as {ctx.job_id}"


def context() -> JobContext:
    async def sink(fraction: float | None, text: str | None) -> bool:
        return True
    return JobContext("job-1", "k", 1, sink)


async def test_a_plain_tool_takes_its_arguments_from_the_signature_and_its_description_from_the_docstring() -> None:
    assert isinstance(echo, DeclaredTool)
    assert (echo.name, echo.long_running, echo.timeout, echo.retry.max_attempts) == ("echo", False, 30.0, 1)
    assert echo.description.startswith("Repeat a text.") and echo.summary == "Repeat a text"
    schema = echo.args_model.model_json_schema()
    assert schema["required"] == ["text"] and set(schema["properties"]) == {"text", "times"}
    assert await echo.invoke(echo.args_model(text="hi", times=2)) == "hi hi"
    assert await echo("still", 1) == "still"  # the decorated function stays callable


async def test_a_long_running_tool_takes_the_job_context_and_a_model() -> None:
    assert (place_order.long_running, place_order.timeout, place_order.retry.max_attempts) == (True, 5.0, 4)
    assert place_order.args_model is Order and place_order.takes_model
    job = place_order.job
    assert "background job" in job.description and job.args_model is Order and job.timeout == 5.0
    result = await job.run(context(), Order(item="tea", quantity=2))
    assert result == {"message": "ordered 2 tea as job-1"}  # a string is the message to relay
    assert next(iter(JobRegistry([place_order]))).name == "place_order"
    with pytest.raises(TypeError):
        _ = echo.job


def not_async() -> None:
    """Not a coroutine function."""


@pytest.mark.parametrize(("declare", "message"), [
    (lambda: tool(not_async), "must be an async function"),  # type: ignore[arg-type]
    (lambda: tool(name="bad name!")(echo.fn), "the name must be"),
    (lambda: tool(name="list_jobs")(echo.fn), "the bot's own tools"),
    (lambda: tool(long_running=True)(echo.fn), "first parameter is the job context"),
    (lambda: tool(place_order.fn), "only long-running tools get"),
    (lambda: tool(offline_phrase=re.compile(r"(?P<nope>.*)"))(echo.fn), "are not arguments"),
    (lambda: tool(example="say hi", offline_phrase=re.compile(r"^echo (?P<text>.*)$"))(echo.fn), "its own example"),
    (lambda: tool(scheduled_message=lambda a, j: "")(echo.fn), "long-running tools only"),
    (lambda: tool(timeout=0)(echo.fn), "timeout must be positive"),
    (lambda: tool(retry=RetryPolicy(max_attempts=0))(echo.fn), "max_attempts"),
    (lambda: tool(args=Order)(echo.fn), "takes one parameter"),
])
def test_a_broken_declaration_is_a_configuration_error(declare: Any, message: str) -> None:
    with pytest.raises(ToolDeclarationError, match=message) as raised:
        declare()
    assert isinstance(raised.value, ConfigError)  # app.main: one line, exit 2


def test_a_tool_needs_a_docstring_and_annotations() -> None:
    async def undocumented(text: str) -> str:
        return text

    async def untyped(text) -> str:  # type: ignore[no-untyped-def]
        """Untyped."""
        return str(text)

    with pytest.raises(ToolDeclarationError, match="needs a docstring"):
        tool(undocumented)
    with pytest.raises(ToolDeclarationError, match="needs a type annotation"):
        tool(untyped)


def test_tool_settings_are_typed_by_their_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_TOOL_SECONDS", "2.5")
    monkeypatch.setenv("SOME_TOOL_FLAG", "yes")
    monkeypatch.setenv("SOME_TOOL_COUNT", "")
    assert tool_setting("SOME_TOOL_SECONDS", 1.0) == 2.5
    assert tool_setting("SOME_TOOL_FLAG", False) is True
    assert tool_setting("SOME_TOOL_COUNT", 3) == 3  # blank: the default
    assert tool_setting("SOME_TOOL_UNSET", "x") == "x"
    monkeypatch.setenv("SOME_TOOL_COUNT", "many")
    with pytest.raises(ToolDeclarationError, match="SOME_TOOL_COUNT must be a number"):
        tool_setting("SOME_TOOL_COUNT", 3)


def write_module(root: Path, body: str) -> str:
    name = f"tools_{uuid.uuid4().hex[:8]}"
    (root / f"{name}.py").write_text(textwrap.dedent(body))
    return name


GOOD = """
    from jobs.context import JobContext
    from jobs.registry import tool

    @tool
    async def shout(text: str) -> str:
        \"\"\"Shout a text.\"\"\"
        return text.upper()

    @tool(long_running=True)
    async def slow_shout(ctx: JobContext, text: str) -> dict:
        \"\"\"Shout a text, slowly.\"\"\"
        return {"message": text.upper()}
"""


def test_modules_are_loaded_in_order_with_their_own_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    first = write_module(tmp_path, GOOD)
    whisper = textwrap.dedent(GOOD).replace("shout", "whisper")
    reexport = write_module(tmp_path, f"from {first} import shout\n{whisper}")
    tools = load_tool_modules([first, reexport, "jobs.activate_line"])
    assert [t.name for t in tools] == ["shout", "slow_shout", "whisper", "slow_whisper", "activate_new_line"]
    assert load_tool_modules([first])[0] is tools[0]  # imported once


@pytest.mark.parametrize(("body", "message"), [
    (None, "no such module"),
    ("import no_such_dependency_xyz\n", "failed to import: No module named 'no_such_dependency_xyz'"),
    ("x = 1 / 0\n", "failed to import: ZeroDivisionError"),
    ("VALUE = 1\n", "declares no tools"),
    ("from jobs.registry import tool\n@tool\nasync def f(x: int) -> int:\n    return x\n", "needs a docstring"),
])
def test_a_module_that_cannot_be_loaded_is_one_configuration_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str | None, message: str) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    name = write_module(tmp_path, body) if body is not None else "no_such_tools_module"
    with pytest.raises(ToolDeclarationError, match=message) as raised:
        load_tool_modules([name])
    assert str(raised.value).startswith(f"TOOL_MODULES: {name}: ")


def test_two_tools_with_one_name_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ToolDeclarationError, match="'shout' is already declared"):
        load_tool_modules([write_module(tmp_path, GOOD), write_module(tmp_path, GOOD)])


def test_the_setting_names_the_demo_by_default_and_may_be_blank() -> None:
    assert Settings.from_env({}, dotenv=None).tool_modules == ("jobs.activate_line",)
    assert Settings.from_env({"TOOL_MODULES": "a.b, c"}, dotenv=None).tool_modules == ("a.b", "c")
    assert Settings.from_env({"TOOL_MODULES": ""}, dotenv=None).tool_modules == ()


async def test_a_plain_tool_runs_in_the_turn_through_the_policy_with_its_timeout_and_retries() -> None:
    calls: list[int] = []

    @tool(timeout=0.05, retry=RetryPolicy(max_attempts=3, initial_delay=0, jitter=0))
    async def flaky(n: int) -> dict[str, int]:
        """Fails twice, then answers."""
        calls.append(n)
        if len(calls) < 3:
            raise RuntimeError("not yet")
        return {"n": n}

    @tool(timeout=0.05)
    async def stuck() -> str:
        """Never answers."""
        await asyncio.sleep(10)
        return ""

    @tool(retry=RetryPolicy(max_attempts=3, initial_delay=0))
    async def hopeless() -> str:
        """Fails for good."""
        calls.append(-1)
        raise PermanentJobError("no such thing")

    store = MemoryStore()
    registry = JobRegistry([place_order])
    scope = TurnScope("k")
    tools = turn_tools(scope, registry, store, JobRunner(store, registry, lambda key: None),
                       plain=[flaky, stuck, hopeless, echo])
    assert [t.name for t in tools][:5] == ["flaky", "stuck", "hopeless", "echo", "place_order"]
    assert isinstance(tools[0], PlainTool)
    token = CancellationToken()
    assert json.loads(await tools[0].run_json({"n": 7}, token)) == {"n": 7} and calls == [7, 7, 7]
    with pytest.raises(TimeoutError, match=r"stuck timed out after 0\.05 s"):
        await tools[1].run_json({}, token)
    calls.clear()
    with pytest.raises(PermanentJobError):
        await tools[2].run_json({}, token)
    assert calls == [-1]  # not retried
    with pytest.raises(ValueError, match="text: Field required"):
        await tools[3].run_json({}, token)
    [policed] = ToolPolicy(disabled=("place_order", "flaky", "stuck", "hopeless", "get_*", "list_*", "cancel_*")
                           ).tools_for(None, tools)
    assert policed.name == "echo" and await policed.run_json({"text": "hi"}, token) == "hi"


async def test_the_offline_model_learns_phrases_and_examples_from_declarations() -> None:
    from autogen_core import FunctionCall
    from autogen_core.models import UserMessage

    client = OfflineChatCompletionClient(tools=[echo, place_order])
    schemas: Any = [{"name": "echo", "description": ""}]
    calls = (await client.create([UserMessage(content="echo hi there!", source="u")], tools=schemas)).content
    assert isinstance(calls, list) and isinstance(call := calls[0], FunctionCall)
    assert (call.name, json.loads(call.arguments)) == ("echo", {"text": "hi there"})
    missing = (await client.create([UserMessage(content="echo", source="u")], tools=schemas)).content
    assert missing == "I need a bit more to repeat a text. Say for example `echo hello`."
    assert "- `echo hello`: repeat a text\n" in help_text([echo, place_order])
    assert "place_order" not in help_text([echo, place_order])  # no example: not listed
