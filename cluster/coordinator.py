"""The coordination interface, and its single-process implementation."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from runtime import metrics

log = logging.getLogger(__name__)

OnWake = Callable[[str], None]
OnCancel = Callable[[str, str], Awaitable[None]]


class Coordinator(Protocol):
    @property
    def active(self) -> bool:
        """True while this process is the active worker (the one running inboxes and jobs)."""

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Stop; an active worker gives up its role (another can take over at once)."""

    def wake(self, key: str) -> None:
        """A conversation has new work: make sure the active worker, wherever it is, processes it."""

    async def cancel(self, key: str, job_id: str) -> None:
        """Ask the active worker to stop a job (the cancel request is already in the store)."""

    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True) -> bool:
        """Become the active worker: from then on wake-ups and cancel requests from every
        instance reach ``on_wake`` / ``on_cancel`` here. Waits until it is this process's turn,
        or with ``wait=False`` returns False at once when another worker is active."""

    async def check(self) -> str | None:
        """Readiness: ``ok``, what is wrong, or None when there is nothing shared to check."""


class LocalCoordinator:
    """One process is web and worker at once: it is always the active worker, calls stay in-process."""

    def __init__(self) -> None:
        self._on_wake: OnWake | None = None
        self._on_cancel: OnCancel | None = None

    @property
    def active(self) -> bool:
        return self._on_wake is not None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        self._on_wake = self._on_cancel = None
        metrics.ACTIVE_WORKER.set(0)

    def wake(self, key: str) -> None:
        if self._on_wake is not None:  # before lead(): start-up recovery finds the work
            metrics.WAKEUPS.labels("local").inc()
            self._on_wake(key)

    async def cancel(self, key: str, job_id: str) -> None:
        if self._on_cancel is not None:  # in-process: done when this returns
            await self._on_cancel(key, job_id)

    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True) -> bool:
        self._on_wake, self._on_cancel = on_wake, on_cancel
        metrics.ACTIVE_WORKER.set(1)
        return True

    async def check(self) -> str | None:
        return None
