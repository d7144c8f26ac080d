"""The coordination interface, and its single-process implementation.

Issue 18: a worker leads *partitions* of the conversations (cluster/partitions.py); ``ownership``
says which, ``on_change(gained, lost)`` tells the worker when they change. ``LocalCoordinator``
owns everything at once, with no lease and no fence.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from cluster.partitions import Ownership
from runtime import metrics

log = logging.getLogger(__name__)

OnWake = Callable[[str], None]
OnCancel = Callable[[str, str], Awaitable[None]]
#: ``on_change(gained, lost)``: partitions this worker now holds / no longer holds. For a graceful
#: hand-back ``lost`` is called while they are still held (the worker may hand its jobs back);
#: for a lease that ran out, after (nothing may be written for them any more).
OnChange = Callable[[set[int], set[int]], Awaitable[None]]


async def _no_change(gained: set[int], lost: set[int]) -> None:
    pass


class Coordinator(Protocol):
    @property
    def active(self) -> bool:
        """True while this process is an active worker (it holds at least one partition)."""

    @property
    def ownership(self) -> Ownership:
        """The partitions this process holds (the processor and the job runner ask it before acting)."""

    async def open(self) -> None: ...

    async def close(self) -> None:
        """Stop; an active worker gives up its role (another can take over at once)."""

    def wake(self, key: str) -> None:
        """A conversation has new work: make sure the active worker, wherever it is, processes it."""

    async def cancel(self, key: str, job_id: str) -> None:
        """Ask the active worker to stop a job (the cancel request is already in the store)."""

    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True,
                   on_change: OnChange = _no_change) -> bool:
        """Become a worker: from then on wake-ups and cancel requests for the partitions it holds
        reach ``on_wake`` / ``on_cancel`` here, and ``on_change`` hears of every partition gained
        or lost. With ``wait=False`` returns False at once when that cannot start now."""

    async def check(self) -> str | None:
        """Readiness: ``ok``, what is wrong, or None when there is nothing shared to check."""


class LocalCoordinator:
    """One process is web and worker at once: it is always the active worker, calls stay in-process."""

    def __init__(self) -> None:
        self._on_wake: OnWake | None = None
        self._on_cancel: OnCancel | None = None
        self._ownership = Ownership.whole()

    @property
    def active(self) -> bool:
        return self._on_wake is not None

    @property
    def ownership(self) -> Ownership:
        return self._ownership

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

    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True,
                   on_change: OnChange = _no_change) -> bool:
        self._on_wake, self._on_cancel = on_wake, on_cancel
        metrics.ACTIVE_WORKER.set(1)
        await on_change(self._ownership.held(), set())  # everything, at once
        return True

    async def check(self) -> str | None:
        return None
