"""What the stores hold and what they raise: the records every seam of :mod:`storage.abc` speaks in.

Plain frozen dataclasses with no behaviour beyond (de)serialising themselves, so the agent, the
jobs and the edge can share them without importing a store.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from runtime.protocol import NotOwner

JSON = dict[str, Any]

#: Shape version written on every stored conversation document (see docs on migration).
SCHEMA_VERSION = 1


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or is throttling: retry later (ingest answers 503)."""


class FencedWriteError(StoreError, NotOwner):
    """Issue 18: a worker wrote a conversation under an older lease epoch than the one that last
    wrote it: it lost the conversation's partition to another worker. Not retried."""

    by = "store"

    def __init__(self, key: str, fence: int, stored: int) -> None:
        NotOwner.__init__(self, key, f"write fenced off (epoch {fence} < stored epoch {stored}); "
                                     "another worker owns it now")
        self.fence, self.stored = fence, stored


class ConcurrencyError(StoreError):
    """The record changed since it was loaded: reload and redo the work."""

    def __init__(self, key: str) -> None:
        super().__init__(f"conversation {key!r} was modified concurrently; reload and retry")
        self.key = key


#: Default of STORE_MAX_ITEM_BYTES: the largest item a store writes (UTF-8 JSON). Cosmos DB refuses
#: items over 2 MB; SQLite and memory enforce the same cap so every store behaves the same.
MAX_ITEM_BYTES = 2 * 1024 * 1024


class ItemTooLargeError(StoreError):
    """The item is larger than the store accepts (Cosmos DB: 413). Retrying cannot help: the write
    is a permanent failure of whatever produced it."""

    def __init__(self, what: str, size: int | None, limit: int) -> None:
        measured = f" ({size} bytes)" if size is not None else ""
        super().__init__(f"{what} is too large to store{measured}; the limit is {limit} bytes")
        self.size = size
        self.limit = limit


def check_item_size(what: str, encoded: str, limit: int) -> None:
    """Raise :class:`ItemTooLargeError` if ``encoded`` (the item's JSON) exceeds ``limit`` bytes."""
    if len(encoded) * 4 <= limit:  # cheap: no UTF-8 character takes more than 4 bytes
        return
    size = len(encoded.encode("utf-8"))
    if size > limit:
        raise ItemTooLargeError(what, size, limit)


class JobNotFoundError(StoreError, LookupError):
    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"no job {job_id!r} in conversation {key!r}")
        self.key = key
        self.job_id = job_id


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class InboxEvent:
    """Something that happened to a conversation, to be folded into its state in order.

    ``id`` is the idempotency key: the activity id for user messages, ``job:<id>`` for
    job results, so a redelivered activity or a re-run job appends nothing new.
    """

    id: str
    kind: str  # "message" | "welcome" | "reset" | "job_finished"
    payload: JSON
    created_at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class OutboxMessage:
    """An activity the bot has decided to send; removed from the outbox once sent."""

    id: str
    activity: JSON


@dataclass(frozen=True)
class JobRecord:
    """A long-running tool call. Lives in the conversation's partition, keyed by ``id``."""

    id: str
    conversation_key: str
    tool: str
    arguments: JSON
    status: str = "queued"  # awaiting_approval | queued | running | succeeded | failed | cancelled | rejected | expired
    call_id: str | None = None
    attempt: int = 0
    max_attempts: int = 1
    interruptions: int = 0  # attempts cut short by the process dying (not counted as failures)
    progress: float | None = None
    progress_text: str | None = None
    result: Any = None
    error: str | None = None
    cancel_requested: bool = False
    next_retry_at: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    card_activity_id: str | None = None
    #: Who asked for it (``agent.events.Requester.to_json()``); None if not recorded (older jobs).
    started_by: JSON | None = None
    #: A job behind approval (issue 16, jobs/approval.py): ``{"expires_at", "decision", "by", "at"}``;
    #: None for a job that needs none.
    approval: JSON | None = None

    FINISHED = frozenset({"succeeded", "failed", "cancelled", "rejected", "expired"})

    @property
    def finished(self) -> bool:
        return self.status in self.FINISHED

    def to_json(self) -> JSON:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobRecord:
        # Unknown keys are dropped: records stored by older versions (e.g. with ``announced``) still load.
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def evolve(self, **changes: Any) -> JobRecord:
        return replace(self, updated_at=time.time(), **changes)


@dataclass(frozen=True)
class ConversationRecord:
    """The single item an atomic commit writes.

    ``etag`` is None for a conversation never committed; ``outbox`` holds unsent messages
    only; ``agent_state`` is the AutoGen team state (already pruned by the agent).
    """

    key: str
    agent_state: JSON | None = None
    outbox: tuple[OutboxMessage, ...] = ()
    etag: str | None = None
    turns: int = 0
    schema_version: int = SCHEMA_VERSION
    #: Issue 18: the lease epoch of the worker that wrote it (0: never written under a lease).
    fence: int = 0

    def evolve(self, **changes: Any) -> ConversationRecord:
        return replace(self, **changes)

    def fenced(self, fence: int | None) -> ConversationRecord:
        """This record to be written under lease epoch ``fence`` (None: no lease, one process).

        Every store calls it first in ``commit``. The commit is conditional on the etag, so the
        stored record is the one loaded: if a newer owner wrote it (a higher epoch), this write
        is refused with :class:`FencedWriteError` before anything is written.
        """
        if fence is None:
            return self
        if fence < self.fence:
            raise FencedWriteError(self.key, fence, self.fence)
        return replace(self, fence=fence)
