"""What a running job's tool sees: its id (the idempotency key), progress, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field


class JobCancelledError(Exception):
    """Raised inside a tool when its job was cancelled."""


ProgressSink = Callable[[float | None, str | None], Awaitable[bool]]


@dataclass
class JobContext:
    job_id: str
    conversation_key: str
    attempt: int
    _progress_sink: ProgressSink
    _cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries and re-runs after a crash: pass it to external systems."""
        return self.job_id

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise JobCancelledError(self.job_id)

    async def report_progress(self, fraction: float | None, text: str | None = None) -> None:
        """Record progress (0..1) on the job; raises JobCancelledError if it was cancelled."""
        if await self._progress_sink(fraction, text):
            self.cancel()
        self.raise_if_cancelled()

    async def sleep(self, seconds: float) -> None:
        """Wait, waking early (and raising JobCancelledError) if the job is cancelled."""
        try:
            await asyncio.wait_for(self._cancelled.wait(), timeout=seconds)
        except TimeoutError:
            return
        self.raise_if_cancelled()
