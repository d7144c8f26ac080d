"""The offline model: a deterministic ChatCompletionClient that needs no credentials.

It maps a few documented phrases to the same tool calls an LLM would make, so the whole
pipeline (tools, jobs, durable state, proactive messages) runs with no network. Phrases:

========================================  ============================================
``help`` / ``what can you do``            explains itself and how to configure a model
a declared tool's ``offline_phrase``      that tool, its named groups as arguments
``status`` / ``is it done?`` / ``status <id>``  ``get_job_status(job_id)``
``list jobs`` / ``jobs``                  ``list_jobs()``
``cancel <job id>``                       ``cancel_job(job_id)``
``my name is <name>`` / ``what is my name``  remembers from the conversation's context
``think for <n> seconds``                 answers over n seconds, word by word (a slow model, for crashes)
``explain durability``                    a longer answer, streamed at a reader's pace
``time in <zone>``                        ``get_current_time(timezone)`` (the MCP time server)
``run <tool> [json arguments]``           any tool, e.g. an MCP server's (local mode only)
========================================  ============================================

A declared tool (``@tool``, jobs/registry.py) teaches this model its phrase and example: the app
passes the declared tools to :meth:`OfflineChatCompletionClient.learn`, and :func:`help_text` lists
their examples. No tool is named here.

``run`` calls a tool by name with arguments the user typed: a testing aid, so the app enables it
(``run_phrase=True``) only in local mode; elsewhere the phrase is refused and calls nothing.
Every call still passes the tool policy (agent/tool_policy.py).

Anything else gets a plain answer that this is the offline model and how to set a real one.

Streamed (``create_stream``, what the agent uses), every answer arrives word by word: the two slow
phrases at a realistic pace, the others at once.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, Literal

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    FunctionExecutionResultMessage,
    LLMMessage,
    ModelCapabilities,
    ModelFamily,
    ModelInfo,
    RequestUsage,
    SystemMessage,
    UserMessage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from agent.events import JOB_RESULT_SOURCE, parse_job_result
from agent.tool_output import JOB_RESULT_TOOL
from jobs.registry import DeclaredTool
from runtime import metrics
from runtime.untrusted import escape_markdown, tool_output_data

CONFIGURE_HINT = (
    "To use a real model, set OPENAI_API_KEY (and optionally OPENAI_MODEL / OPENAI_BASE_URL for "
    "an OpenAI-compatible server), or AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_DEPLOYMENT, then restart the bot."
)

HELP_HEAD = ("I'm running on the **offline model**: a built-in stand-in for a real LLM that understands a few "
             "phrases.\n\n")
HELP_TAIL = (
    "- `status` or `is it done?`: the state of your latest job (`status JOB_ID` for a given one)\n"
    "- `list jobs`: every job in this conversation\n"
    "- `cancel JOB_ID`: cancel a job\n"
    "- `my name is Ada` / `what is my name?`: I remember this conversation, even across restarts\n"
    "- `think for 5 seconds`: a slow answer (to try stopping me mid-turn)\n"
    "- `explain durability`: a longer answer, streamed as it is written\n"
    "- `time in Europe/Paris`: asks the MCP time server, if one is configured in `mcp.json`\n"
    "- `run TOOL {json arguments}`: calls any tool I have, e.g. one from an MCP server (local mode only)\n"
    "- `reset`: forget this conversation (asks first)\n\n" + CONFIGURE_HINT
)


def tool_help_lines(tools: Sequence[DeclaredTool]) -> list[str]:
    """One help line per declared tool with an example: the example, what it does, how it runs."""
    return [f"- `{t.example}`: {t.summary[:1].lower()}{t.summary[1:]}"
            + (" (a background job; I'll message you when it's done)" if t.long_running else "")
            for t in tools if t.example]


def help_text(tools: Sequence[DeclaredTool] = ()) -> str:
    """What the offline model answers to ``help``: the declared tools' examples, then its own phrases."""
    return HELP_HEAD + "".join(line + "\n" for line in tool_help_lines(tools)) + HELP_TAIL


HELP_TEXT = help_text()  # with no declared tools

_STATUS = re.compile(
    r"^(?:status|job status|is it (?:done|finished|ready)\??|what(?:'s| is) the status\??)\s*(?P<id>[\w-]*)\??$", re.I)
_LIST = re.compile(r"^(?:list\s+(?:my\s+|the\s+)?jobs|jobs|show\s+(?:my\s+)?jobs)\s*[.!?]?$", re.I)
_CANCEL = re.compile(r"^(?:cancel|stop)\s+(?:job\s+)?(?P<id>[\w-]+)\s*[.!]?$", re.I)
_HELP = re.compile(r"^(?:/?help|\?|what can you do\??|how do you work\??)$", re.I)
_MY_NAME = re.compile(r"\bmy name is\s+(?P<name>[\w' -]{1,40}?)\s*[.!]?$", re.I)
_THINK = re.compile(r"^think for (?P<seconds>\d+(?:\.\d+)?) seconds?[.!]?$", re.I)
_TIME_IN = re.compile(r"^(?:what(?:'s| is) the )?time in (?P<zone>[\w/+-]+)\??$", re.I)
_RUN = re.compile(r"^run (?P<tool>[\w.-]+)\s*(?P<args>\{.*\})?\s*$", re.I | re.S)
_ASK_NAME = re.compile(r"\bwhat(?:'s| is) my name\b", re.I)
_EXPLAIN = re.compile(r"^explain durability[.!?]?$", re.I)
#: Seconds between two words of ``explain durability`` (about 12 words a second, a fast model).
WORD_DELAY = 0.08

DURABILITY = (
    "Everything this conversation has lives in the store, not in my memory. Your message was written to the "
    "conversation's inbox before Teams got its 200, so a crash cannot lose it. I fold each message into the "
    "conversation's state and commit the new state, your message marked done and my reply in the outbox in "
    "one conditional write; only then is the reply sent, and it leaves the outbox only after Teams accepted "
    "it. If the process dies mid-turn, the restarted one finds the message still pending and answers it "
    "again from the old state: nothing is lost and nothing is done twice. This answer is streamed, and even "
    "the stream survives a crash: its id is recorded first, so the re-run turn finishes the same message "
    "instead of leaving half an answer above a new one. Background jobs keep their own records and announce "
    "their outcome exactly once."
)

_INFO: ModelInfo = {
    "vision": False,
    "function_calling": True,
    "json_output": False,
    "family": ModelFamily.UNKNOWN,
    "structured_output": False,
    "multiple_system_messages": True,
}


def _text_of(message: LLMMessage) -> str:
    content = getattr(message, "content", "")
    return content if isinstance(content, str) else ""


def _words(text: str) -> list[str]:
    """``text`` as streamed chunks: each word with the space after it (joined, the text again)."""
    return re.findall(r"\S+\s*|\s+", text) or [text]


def _mcp_text(data: Any) -> str | None:
    """The text of an MCP tool result (a list of content blocks), if that is what it is."""
    if isinstance(data, list) and data and all(isinstance(b, dict) and "type" in b for b in data):
        return "\n".join(str(b["text"]) for b in data if b.get("type") == "text" and b.get("text"))
    return None


def describe_tool_result(name: str, content: str, is_error: bool) -> str:
    """What the offline model says about one tool result (also used for job results).

    The offline model is our template, so what it relays from a tool is escaped Markdown: an MCP
    server's text, an error, raw JSON. A ``message`` of the bot's own tools is the bot's sentence
    and is kept (an MCP long-running job's, marked by its ``server`` key, is the server's: escaped).
    """
    content = tool_output_data(content)
    if is_error:
        return f"Sorry, `{name}` failed: {escape_markdown(content)}"
    try:
        data: Any = json.loads(content)
    except ValueError:
        return escape_markdown(content)
    if (text := _mcp_text(data)) is not None:
        try:
            data = json.loads(text)
        except ValueError:
            return escape_markdown(text) if text else f"`{name}` returned nothing."
    if not isinstance(data, dict):
        return escape_markdown(content)
    if "message" in data:
        return escape_markdown(str(data["message"])) if "server" in data else str(data["message"])
    if {"timezone", "datetime"} <= data.keys():
        moment = str(data["datetime"])
        return f"It is {moment[11:16]} on {data.get('day_of_week', '')} {moment[:10]} in {data['timezone']}.".replace(
            "on  ", "on ")
    return f"`{name}` returned: {escape_markdown(json.dumps(data))}"


class OfflineChatCompletionClient(ChatCompletionClient):
    """Deterministic stand-in for an LLM; see the module docstring for the phrases."""

    def __init__(self, *, run_phrase: bool = False, tools: Sequence[DeclaredTool] = ()) -> None:
        self._usage = RequestUsage(prompt_tokens=0, completion_tokens=0)
        #: Whether ``run <tool> {json}`` calls the tool (local mode) or is refused.
        self._run_phrase = run_phrase
        #: Declared tools with an ``offline_phrase``, in declaration order (the first match wins).
        self._tools: list[DeclaredTool] = list(tools)

    def learn(self, tools: Sequence[DeclaredTool]) -> None:
        """Understand the declared tools' phrases (and list their examples in ``help``)."""
        self._tools.extend(tools)

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        tool_names = {t.name if not isinstance(t, dict) else t["name"] for t in tools}
        last = messages[-1] if messages else None
        if isinstance(last, UserMessage) and (m := _THINK.match(_text_of(last).strip())):
            seconds = min(float(m.group("seconds")), 600.0)
            await asyncio.sleep(seconds)
            return CreateResult(finish_reason="stop", content=f"I thought about it for {seconds:g} seconds.",
                                usage=self._usage, cached=False)
        if isinstance(last, UserMessage) and _EXPLAIN.match(_text_of(last).strip()):
            return CreateResult(finish_reason="stop", content=DURABILITY, usage=self._usage, cached=False)
        content = self._respond(list(messages), tool_names)
        return CreateResult(finish_reason="function_calls" if isinstance(content, list) else "stop",
                            content=content, usage=self._usage, cached=False)

    def _respond(self, messages: list[LLMMessage], tools: set[str]) -> str | list[FunctionCall]:
        last = messages[-1] if messages else None
        if isinstance(last, FunctionExecutionResultMessage):
            return "\n\n".join(describe_tool_result(r.name, r.content, bool(r.is_error)) for r in last.content)
        if not isinstance(last, UserMessage):
            return "I'm the offline model and I have nothing to add. " + CONFIGURE_HINT
        if last.source == JOB_RESULT_SOURCE:
            # The outcome is the tool result just before our prompt (state from older versions: the text).
            before = messages[-2] if len(messages) > 1 else None
            outcome = _text_of(last)
            if isinstance(before, FunctionExecutionResultMessage) and before.content[-1].name == JOB_RESULT_TOOL:
                outcome = tool_output_data(before.content[-1].content)
            result = parse_job_result(outcome)
            if result is None:
                return "A background job finished, but I could not read its result."
            return describe_tool_result(result.tool, result.content, result.is_error)
        return self._answer_user(_text_of(last).strip(), messages[:-1], tools)

    def _answer_user(self, text: str, history: list[LLMMessage], tools: set[str]) -> str | list[FunctionCall]:
        def call(name: str, **arguments: Any) -> str | list[FunctionCall]:
            if name not in tools:
                return f"The `{name}` tool is not available to you right now."
            return [FunctionCall(id=f"call_{uuid.uuid4().hex[:12]}", name=name, arguments=json.dumps(arguments))]

        if _HELP.match(text):
            return help_text(self._tools)
        for declared in self._tools:
            if declared.offline_phrase is None or not (said := declared.offline_phrase.search(text)):
                continue
            # A group that takes no part is left to the argument's default; one that matched nothing is missing.
            given = {k: v.strip().rstrip(".!?") for k, v in said.groupdict().items() if v is not None}
            arguments = {k: v for k, v in given.items() if v}
            if len(arguments) < len(given):
                example = f" Say for example `{declared.example}`." if declared.example else ""
                return f"I need a bit more to {declared.summary[:1].lower()}{declared.summary[1:]}.{example}"
            return call(declared.name, **arguments)
        if m := _TIME_IN.match(text):
            return call("get_current_time", timezone=m.group("zone"))
        if m := _RUN.match(text):
            if not self._run_phrase:
                metrics.TOOL_CALLS_REFUSED.labels("run_phrase").inc()
                return (f"You are not allowed to use `run {m.group('tool')}` here: calling tools by name works only "
                        "in local mode. Nothing was started; ask in plain words instead.")
            try:
                arguments = json.loads(m.group("args") or "{}")
            except ValueError:
                return "Those arguments are not valid JSON: write them like `run echo {\"message\": \"hi\"}`."
            return call(m.group("tool"), **arguments)
        if m := _CANCEL.match(text):
            return call("cancel_job", job_id=m.group("id"))
        if _LIST.match(text):
            return call("list_jobs")
        if m := _STATUS.match(text):
            return call("get_job_status", job_id=m.group("id") or "")
        if m := _MY_NAME.search(text):
            return f"Nice to meet you, {m.group('name').strip()}. I'll remember that."
        if _ASK_NAME.search(text):
            for message in reversed(history):
                if isinstance(message, UserMessage) and (found := _MY_NAME.search(_text_of(message))):
                    return f"Your name is {found.group('name').strip()}."
            return "You haven't told me your name yet."
        return (
            f"I'm the offline model, so I only understand a few phrases (say `help` to see them). "
            f"You said: “{escape_markdown(text[:200])}”. " + CONFIGURE_HINT
        )

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        last = messages[-1] if messages else None
        said = _text_of(last).strip() if isinstance(last, UserMessage) else ""
        pace = 0.0
        if m := _THINK.match(said):
            seconds = min(float(m.group("seconds")), 600.0)
            result = CreateResult(finish_reason="stop", content=f"I thought about it for {seconds:g} seconds.",
                                  usage=self._usage, cached=False)
            pace = seconds / len(_words(str(result.content)))  # the same n seconds, spent writing
        else:
            result = await self.create(messages, tools=tools)
            if _EXPLAIN.match(said):
                pace = WORD_DELAY
        if isinstance(result.content, str):
            for word in _words(result.content):
                await asyncio.sleep(pace)
                yield word
        yield result

    async def close(self) -> None:
        return None

    def actual_usage(self) -> RequestUsage:
        return self._usage

    def total_usage(self) -> RequestUsage:
        return self._usage

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return sum(len(_text_of(m).split()) for m in messages)

    def remaining_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return 1_000_000 - self.count_tokens(messages)

    @property
    def capabilities(self) -> ModelCapabilities:
        return _INFO

    @property
    def model_info(self) -> ModelInfo:
        return _INFO


__all__ = ["HELP_TEXT", "AssistantMessage", "OfflineChatCompletionClient", "SystemMessage", "help_text"]
