"""Which conversations this worker may touch (issue 18): partitions, their leases, the local fence.

Every conversation belongs to one of ``PARTITIONS`` partitions (a stable hash of its key, the
same in every process); each partition is owned by one worker at a time under a lease with an
*epoch* that grows on every change of owner (cluster/postgres.py grants them).

:class:`Ownership` is this process's view: the partitions it holds, each with its epoch and its
deadline on ``CLOCK_MONOTONIC``. That clock keeps running while a process is stopped (SIGSTOP,
a frozen VM), so a worker that wakes up after its lease ran out sees it at once, before any
commit, send or job start: :meth:`Ownership.fence` raises :class:`~runtime.protocol.NotOwner` then. The
store checks the same epoch again on commit (``ConversationRecord.fenced``), for a write that
slipped past this check.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from runtime.protocol import NotOwner

#: Default of PARTITIONS: enough to spread over a few dozen workers, few enough to list on /readyz.
DEFAULT_PARTITIONS = 16


def partition_of(key: str, partitions: int) -> int:
    """The partition of a conversation: CRC-32 of its key (stable across processes, unlike hash())."""
    return zlib.crc32(key.encode()) % partitions


@dataclass(frozen=True)
class Lease:
    epoch: int
    deadline: float  # time.monotonic() until which this process may act on the partition


class Ownership:
    """The partitions this process holds. ``whole()``: one process owns everything (no leases, no fence)."""

    def __init__(self, partitions: int, *, clock: Callable[[], float] = time.monotonic, whole: bool = False) -> None:
        if partitions < 1:
            raise ValueError("partitions must be at least 1")
        self.partitions = partitions
        self._clock = clock
        self._whole = whole
        self._leases: dict[int, Lease] = {}

    @classmethod
    def whole(cls) -> Ownership:
        return cls(1, whole=True)

    def partition(self, key: str) -> int:
        return partition_of(key, self.partitions)

    def holds(self, partition: int) -> bool:
        """This process holds ``partition`` and its lease has not run out (by the monotonic clock)."""
        if self._whole:
            return True
        lease = self._leases.get(partition)
        return lease is not None and self._clock() < lease.deadline

    def owns(self, key: str) -> bool:
        return self.holds(self.partition(key))

    def fence(self, key: str) -> int | None:
        """The epoch to write the conversation under (None: one process, no fence). Raises
        :class:`NotOwner` when this process no longer holds its partition: call it before
        every commit, send and job start."""
        if self._whole:
            return None
        partition = self.partition(key)
        lease = self._leases.get(partition)
        if lease is None or self._clock() >= lease.deadline:
            raise NotOwner(key, f"partition {partition} is not (or no longer) leased to this worker")
        return lease.epoch

    def held(self) -> set[int]:
        """The partitions held now (leases not run out)."""
        if self._whole:
            return set(range(self.partitions))
        now = self._clock()
        return {p for p, lease in self._leases.items() if now < lease.deadline}

    def recorded(self) -> dict[int, Lease]:
        """Every lease recorded, run out or not (the lease keeper compares them with the database)."""
        return dict(self._leases)

    def grant(self, partition: int, epoch: int, deadline: float) -> None:
        self._leases[partition] = Lease(epoch, deadline)

    def revoke(self, partitions: Iterable[int]) -> None:
        for partition in partitions:
            self._leases.pop(partition, None)
