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

from runtime.protocol import JobResult

JOB_RESULT_SOURCE = "background_job"


_HEADER = "Background job finished. Tell the user the outcome of their request."
#: What prompts the agent once a job's outcome is in its context (contains no tool output).
JOB_FINISHED_PROMPT = "A background job finished; its result is the tool result above. Tell the user the outcome."
#: What prompts the agent once a person approved a job that awaited approval (issue 16).
APPROVAL_PROMPT = ("A background job that awaited approval was approved; the decision is the tool result above. "
                   "Tell the user what happens next.")


def format_job_result(result: JobResult) -> str:
    """The old user-message form (kept for tests of stored state written by earlier versions)."""
    return f"{_HEADER}\n{json.dumps(result.to_json())}"


def parse_job_result(text: str) -> JobResult | None:
    """A job outcome from its JSON (the tool message's data) or the old ``_HEADER`` + JSON text."""
    raw = text if text.lstrip().startswith("{") else text.partition("\n")[2]
    try:
        return JobResult.from_json(json.loads(raw))
    except ValueError:
        return None
