"""Long-running tools are declared once here and then offered to the agent like any tool."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from jobs.context import JobContext


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay = min(max_delay, initial * multiplier**(n-1)) ± jitter."""

    max_attempts: int = 3
    initial_delay: float = 2.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    jitter: float = 0.2  # fraction of the delay, drawn uniformly in [-jitter, +jitter]

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


ToolRun = Callable[[JobContext, Any], Awaitable[dict[str, Any]]]


class PermanentJobError(Exception):
    """A failure retrying cannot fix (bad input, unknown resource): fail at once."""


@dataclass(frozen=True)
class LongRunningTool:
    """A tool whose call becomes a durable job.

    ``run`` receives the job context and the validated ``args_model`` instance and returns a
    JSON-able dict; a ``message`` key in it is the human sentence the agent can relay.
    Validation errors of ``args_model`` are reported to the model at call time, before any
    job is recorded.
    """

    name: str
    description: str
    args_model: type[BaseModel]
    run: ToolRun
    timeout: float = 600.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    scheduled_message: Callable[[Any, str], str] | None = None


class JobRegistry:
    def __init__(self, tools: list[LongRunningTool] | None = None) -> None:
        self._tools: dict[str, LongRunningTool] = {}
        for tool in tools or []:
            self.register(tool)

    def register(self, tool: LongRunningTool) -> None:
        if tool.name in self._tools:
            raise ValueError(f"a long-running tool named {tool.name!r} is already registered")
        self._tools[tool.name] = tool

    def get(self, name: str) -> LongRunningTool:
        try:
            return self._tools[name]
        except KeyError:
            raise LookupError(f"no long-running tool named {name!r}") from None

    def __iter__(self) -> Iterator[LongRunningTool]:
        return iter(self._tools.values())

    def __contains__(self, name: object) -> bool:
        return name in self._tools
