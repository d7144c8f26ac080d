"""One agent turn as the processor sees it: what goes in, what comes out, how it fails.

Plain data and a :class:`TurnRunner` protocol, free of AutoGen: the durability runtime
(:mod:`agent.processor`) depends on this module only, and :class:`agent.runner.AgentTurnRunner`
(the AutoGen team) implements the protocol. A test's fake runner implements it too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from runtime.protocol import JSON, JobResult, Requester
from storage.abc import JobRecord

SORRY = "Sorry, I couldn't get an answer from the model just now"
AGAIN = "Nothing was lost: please try again in a moment."
GENERIC_FAILURE = f"{SORRY}. {AGAIN}"


class AgentError(Exception):
    """The model or the agent failed; the turn is not committed as a success.

    ``str(error)`` is the operator's log line (what failed, in the service's own words),
    ``user_message`` what the user is told, ``cause`` a short key (``timeout``, ``auth``,
    ``rate_limited``, ``quota``, ``server_error``, ``unreachable``, ``content_filter``, ``not_found``,
    ``context_length``, ``bad_request``, ``budget`` (a daily token budget is spent: agent/budget.py),
    ``unknown``) and ``log_level`` how loudly to log it. :func:`agent.runner.classify_failure` makes
    one from what a model call raised.
    """

    def __init__(self, message: str, *, cause: str = "unknown", user_message: str | None = None,
                 log_level: int = logging.ERROR) -> None:
        super().__init__(message)
        self.cause = cause
        self.user_message = user_message or GENERIC_FAILURE
        self.log_level = log_level


@dataclass(frozen=True)
class AgentInput:
    text: str
    source: str = "user"
    #: Who asked (a user message); None for a job result or when unknown.
    requester: Requester | None = None
    #: A finished job's outcome: it enters the model context as a tool result before ``text``.
    job_result: JobResult | None = None


@dataclass
class TurnOutcome:
    state: JSON
    replies: list[str] = field(default_factory=list)
    new_jobs: list[JobRecord] = field(default_factory=list)
    #: Sources the turn's tools returned, as Teams citation entities (agent/citations.py), in [n] order.
    citations: list[JSON] = field(default_factory=list)


class TurnProgress(Protocol):
    """Where a running turn says what it is doing (a stream to the user: runtime.protocol.ReplyStream).
    Both only note the latest; neither blocks the turn."""

    def informative(self, text: str) -> None:
        """What the agent is doing now ("Starting get_current_time…"), before its answer starts."""

    def text(self, so_far: str) -> None:
        """The answer as written so far (each call extends the one before)."""


class TurnRunner(Protocol):
    async def run(self, conversation_key: str, state: JSON | None, inputs: Sequence[AgentInput], *,
                  earlier_jobs: Sequence[JobRecord] = (), progress: TurnProgress | None = None) -> TurnOutcome:
        """Run the inputs one after the other (each gets its own reply) and return the new state.
        ``earlier_jobs``: jobs recorded by earlier turns of the same commit (counted by the job caps);
        ``progress``: told what the turn does and the answer as the model writes it.
        Raises :class:`AgentError`; the state passed in is not changed."""
        ...
