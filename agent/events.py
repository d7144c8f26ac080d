"""How inbox events are presented to the agent.

A finished job reaches the model as a tool result, never as a user message (its output is
untrusted data): see :mod:`agent.tool_output`. The outcome (job id, the call id of the tool call
that started it, status, the tool's output) is JSON in a ``tool`` message answering a call of
its own, so the model gets the real result of its earlier call without a second result for that
call's id, which chat-completion APIs would reject. The agent is then prompted, in the user role,
by :data:`JOB_FINISHED_PROMPT` from the ``background_job`` source: a fixed text of ours.

State stored by earlier versions holds job results as user messages from ``background_job``
(:data:`_HEADER`, then the JSON): they still load, and :func:`parse_job_result` reads both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

JOB_RESULT_SOURCE = "background_job"


@dataclass(frozen=True)
class Requester:
    """Who sent a message, as the edge authenticated it: the channel account id, the display name,
    the Entra ID (AAD) object id and tenant when the channel gives them (Teams does), and the kind
    of conversation (``personal``, ``groupChat``, ``channel``; empty when the channel says none)."""

    id: str = ""
    name: str = ""
    aad_object_id: str = ""
    tenant_id: str = ""
    conversation_type: str = ""

    @property
    def shared_conversation(self) -> bool:
        """A group chat or a channel: other people see what the bot says and can click its cards."""
        return self.conversation_type in ("groupChat", "channel")

    @property
    def label(self) -> str:
        """How to name this person to others: the display name, else the id."""
        return self.name or self.aad_object_id or self.id or "someone"

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "aadObjectId": self.aad_object_id, "tenantId": self.tenant_id,
                "conversationType": self.conversation_type}

    @classmethod
    def from_json(cls, data: Any) -> Requester:
        """From :meth:`to_json` (or an older payload's ``{"id", "name"}``); anything else is nobody."""
        if not isinstance(data, dict):
            return cls()

        def text(name: str) -> str:
            value = data.get(name)
            return value if isinstance(value, str) else ""

        return cls(text("id"), text("name"), text("aadObjectId"), text("tenantId"), text("conversationType"))


_HEADER = "Background job finished. Tell the user the outcome of their request."
#: What prompts the agent once a job's outcome is in its context (contains no tool output).
JOB_FINISHED_PROMPT = "A background job finished; its result is the tool result above. Tell the user the outcome."


@dataclass(frozen=True)
class JobResult:
    job_id: str
    call_id: str | None
    tool: str
    status: str  # succeeded | failed | cancelled
    content: str  # JSON text the tool produced, or the error
    is_error: bool
    arguments: dict[str, Any]


def job_result_body(result: JobResult) -> dict[str, Any]:
    """A finished job's outcome as the JSON object the model reads (whatever message carries it)."""
    return {
        "job_id": result.job_id,
        "call_id": result.call_id,
        "tool": result.tool,
        "arguments": result.arguments,
        "status": result.status,
        "is_error": result.is_error,
        "content": result.content,
    }


def format_job_result(result: JobResult) -> str:
    """The old user-message form (kept for tests of stored state written by earlier versions)."""
    return f"{_HEADER}\n{json.dumps(job_result_body(result))}"


def parse_job_result(text: str) -> JobResult | None:
    """A job outcome from its JSON (the tool message's data) or the old ``_HEADER`` + JSON text."""
    raw = text if text.lstrip().startswith("{") else text.partition("\n")[2]
    try:
        data = json.loads(raw)
        return JobResult(
            job_id=str(data["job_id"]),
            call_id=data.get("call_id"),
            tool=str(data["tool"]),
            status=str(data["status"]),
            content=str(data["content"]),
            is_error=bool(data["is_error"]),
            arguments=dict(data.get("arguments") or {}),
        )
    except (ValueError, KeyError, TypeError):
        return None
