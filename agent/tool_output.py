"""Tool output reaches the model as untrusted data in the tool role, clipped and delimited.

In-turn tool calls (the bot's tools, MCP tools) run through :class:`UntrustedOutputWorkbench`:
every result, errors included, is clipped to ``MAX_TOOL_RESULT_CHARS`` and wrapped in
:func:`untrusted.delimit_tool_output` before AutoGen puts it in a ``tool`` message.

A finished background job is not a user message either. :func:`job_result_messages` makes the
pair a chat-completions API expects for a tool result: an assistant message with one tool call
(a fresh call id, the name :data:`JOB_RESULT_TOOL`, the job id as its argument), then the tool
message with the same id carrying the job's outcome. The agent is then prompted by a fixed
text of ours that carries none of the output (:data:`agent.events.JOB_FINISHED_PROMPT`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import AssistantMessage, FunctionExecutionResult, FunctionExecutionResultMessage
from autogen_core.tools import StaticWorkbench, TextResultContent, ToolResult

from runtime.protocol import JobResult
from runtime.untrusted import DEFAULT_MAX_TOOL_RESULT_CHARS, clip, delimit_tool_output

#: The name of the (never offered) tool call that carries a finished job's outcome to the model.
JOB_RESULT_TOOL = "background_job_result"


def untrusted_tool_output(text: str, limit: int = DEFAULT_MAX_TOOL_RESULT_CHARS) -> str:
    return delimit_tool_output(clip(text, limit))


class UntrustedOutputWorkbench(StaticWorkbench):
    """AutoGen's static workbench; each result (or error) clipped and delimited as untrusted data."""

    def __init__(self, tools: Any, max_result_chars: int = DEFAULT_MAX_TOOL_RESULT_CHARS) -> None:
        super().__init__(list(tools))
        self._max_result_chars = max_result_chars

    async def call_tool(self, name: str, arguments: Mapping[str, Any] | None = None,
                        cancellation_token: CancellationToken | None = None, call_id: str | None = None) -> ToolResult:
        result = await super().call_tool(name, arguments, cancellation_token, call_id)
        text = untrusted_tool_output(result.to_text(), self._max_result_chars)
        return ToolResult(name=result.name, result=[TextResultContent(content=text)], is_error=result.is_error)


def format_job_outcome(result: JobResult, limit: int = DEFAULT_MAX_TOOL_RESULT_CHARS) -> str:
    """The job's outcome as the tool message's content: JSON, the tool's output clipped, delimited."""
    # Already clipped by the job runner; this bounds events stored by older versions.
    body = {**result.to_json(), "content": clip(result.content, 2 * limit)}
    return delimit_tool_output(clip(json.dumps(body), 4 * limit))


def job_result_messages(result: JobResult, limit: int = DEFAULT_MAX_TOOL_RESULT_CHARS,
                        source: str = "assistant") -> tuple[AssistantMessage, FunctionExecutionResultMessage]:
    """The tool call and its result that bring a finished job's outcome into the model context."""
    call_id = f"call_job_{uuid.uuid4().hex[:16]}"
    call = FunctionCall(id=call_id, name=JOB_RESULT_TOOL, arguments=json.dumps({"job_id": result.job_id}))
    outcome = FunctionExecutionResult(content=format_job_outcome(result, limit), name=JOB_RESULT_TOOL,
                                      call_id=call_id, is_error=result.is_error)
    return AssistantMessage(content=[call], source=source), FunctionExecutionResultMessage(content=[outcome])
