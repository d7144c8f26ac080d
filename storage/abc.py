"""The durable store's interface: every implementation (memory, sqlite, cosmos) fulfils it.

A conversation is one record (agent state, outbox, version tag) plus its inbox events,
its job records, and the conversation reference used for proactive sends. The record is
only ever written with :meth:`ConversationStore.commit`, conditional on its etag, which is
what makes "fold events into state" safe against crashes and concurrent writers.
"""

from __future__ import annotations

import functools
import inspect
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

JSON = dict[str, Any]

#: Shape version written on every stored conversation document (see docs on migration).
SCHEMA_VERSION = 1


class StoreError(Exception):
    """Base class of every error a store raises."""


class StoreUnavailableError(StoreError):
    """The store could not be reached or is throttling: retry later (ingest answers 503)."""


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
    status: str = "queued"  # queued | running | succeeded | failed | cancelled
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
    announced: bool = False
    card_activity_id: str | None = None
    #: Who asked for it (``agent.events.Requester.to_json()``); None if not recorded (older jobs).
    started_by: JSON | None = None

    FINISHED = frozenset({"succeeded", "failed", "cancelled"})

    @property
    def finished(self) -> bool:
        return self.status in self.FINISHED

    def to_json(self) -> JSON:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> JobRecord:
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

    def evolve(self, **changes: Any) -> ConversationRecord:
        return replace(self, **changes)


class ConversationStore(ABC):
    """Durable conversation state. All methods are coroutines; none may block the loop."""

    async def open(self) -> None:
        """Create tables/containers if missing. Called once at start-up."""

    async def close(self) -> None:
        """Release connections."""

    # --- conversation reference (for proactive sends) ---
    @abstractmethod
    async def save_reference(self, key: str, reference: JSON) -> None:
        """Upsert the conversation reference; independent of the record's etag."""

    @abstractmethod
    async def get_reference(self, key: str) -> JSON | None: ...

    # --- inbox ---
    @abstractmethod
    async def append_event(self, key: str, event: InboxEvent) -> bool:
        """Append an event; return False (and change nothing) if its id is already there.
        Raises :class:`ItemTooLargeError` (nothing written) if the event exceeds the item size limit."""

    @abstractmethod
    async def has_event(self, key: str, event_id: str) -> bool: ...

    @abstractmethod
    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        """The event with that id, processed or not; None if there is none."""

    @abstractmethod
    async def pending_events(self, key: str) -> list[InboxEvent]:
        """Unprocessed events of the conversation, oldest first."""

    async def count_pending_events(self, key: str) -> int:
        """How many events of the conversation are unprocessed (the ingest's inbox cap reads it
        for every message: stores override it with a count that does not read the payloads)."""
        return len(await self.pending_events(key))

    # --- the conversation record ---
    @abstractmethod
    async def load(self, key: str) -> ConversationRecord:
        """The stored record, or an empty one (etag None) if none was committed yet."""

    @abstractmethod
    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
    ) -> ConversationRecord:
        """Atomically write ``record``, mark ``processed`` events done and create ``new_jobs``.

        Conditional on ``record.etag`` (None = must not exist yet). Raises
        :class:`ConcurrencyError` if the stored etag differs, :class:`ItemTooLargeError` if the
        record exceeds the store's item size limit; nothing is written then.
        Returns the record with its new etag.
        """

    @abstractmethod
    async def conversations_with_work(self) -> list[str]:
        """Keys of conversations with pending events or unsent outbox messages."""

    # --- jobs ---
    @abstractmethod
    async def get_job(self, key: str, job_id: str) -> JobRecord:
        """Raises :class:`JobNotFoundError` if there is no such job."""

    @abstractmethod
    async def put_job(self, job: JobRecord) -> None:
        """Overwrite a job record (the job runner is the only writer of a running job)."""

    @abstractmethod
    async def patch_job(self, key: str, job_id: str, changes: Mapping[str, Any]) -> JobRecord:
        """Atomically change some fields of a job (and ``updated_at``); returns the job as stored.

        Writers own different fields (the runner its progress and status, a cancel request its
        flag, the card updater the card id), so a patch never loses another writer's change.
        Raises :class:`JobNotFoundError` if there is no such job.
        """

    @abstractmethod
    async def list_jobs(self, key: str) -> list[JobRecord]:
        """The conversation's jobs, oldest first."""

    @abstractmethod
    async def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs queued or running in any conversation (for recovery at start-up)."""

    # --- small key/value items (botbuilder dialog state) ---
    @abstractmethod
    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]: ...

    @abstractmethod
    async def write_items(self, items: Mapping[str, JSON]) -> None: ...

    @abstractmethod
    async def delete_items(self, keys: Iterable[str]) -> None: ...

    # --- forgetting (a confirmed reset) ---
    @abstractmethod
    async def forget_conversation(self, key: str, *, item_keys: Iterable[str] = ()) -> int:
        """Forget what was said in a conversation; idempotent (run again after a crash). Returns how many
        entries it changed.

        * **processed inbox events** keep their id and kind (redelivery dedupe stays sound) but lose
          their payload (message texts, job results and arguments), except the ``job:<id>`` event of
          a job that is still queued or running (the job runner reads it to recover from a crash).
        * **finished job records** are deleted; queued and running jobs stay until they finish
          (their finish is announced in the fresh conversation).
        * the key/value items ``item_keys`` (the conversation's dialog state) are deleted.

        Untouched: pending events (said after the reset), the record (the reset turn's commit
        cleared its agent state; its outbox holds the reset confirmation) and the conversation
        reference (needed to send; it holds ids, display names and the service URL, no message
        text). A store whose files keep deleted bytes must make them unrecoverable.
        """

    # --- retention ---
    async def purge_expired(self, older_than: float) -> int:
        """Delete what has not changed since ``older_than`` (a unix time); return how many entries went.

        For stores without server-side expiry (SQLite, memory); the app calls it periodically
        with ``now - CONVERSATION_TTL_DAYS``. Cosmos DB expires the same things by item ``ttl``,
        so there this default (delete nothing, return 0) applies. "Changed" means written by
        this store: appended, committed, saved or put, not a timestamp inside the data. Deleted:

        * **processed inbox events** last written before then. Redelivery dedupe stays sound:
          the TTL is days, far beyond any channel's redelivery window (minutes), so an event
          is long past redelivery when its id is forgotten. Pending events are never deleted,
          nor the ``job:<id>`` event of a job that is still queued or running (the job runner
          reads it to recover from a crash between announcing the job and recording its end).
        * **finished job records** (succeeded, failed, cancelled) last written before then;
          queued and running jobs are never deleted.
        * **idle conversations**: no commit, reference save, event or job write since then,
          no pending events, no unsent outbox messages, no unfinished jobs. Their record and
          conversation reference go (their events and jobs are expired by the rules above), so
          a later message starts the conversation afresh.
        * **key/value items** (dialog state) last written before then. They are not tied to a
          conversation: the store sees opaque keys (the bot writes botbuilder's
          ``dialog/<channel>/conversations/<id>``, not the conversation key), so each expires by
          its own last write, as Cosmos's ``item_ttl_days`` does; a dialog not touched for
          that long has been abandoned.
        """
        return 0


_StoreT = TypeVar("_StoreT", bound=type[ConversationStore])


def translate_errors(*driver_errors: type[BaseException]) -> Callable[[_StoreT], _StoreT]:
    """Class decorator: a driver's errors leave every store method as StoreUnavailableError.

    Callers then handle one family (StoreError) whatever the backend; errors the store already
    translated (ConcurrencyError, JobNotFoundError ...) pass through unchanged.
    """

    def decorate(cls: _StoreT) -> _StoreT:
        for name, member in list(vars(ConversationStore).items()):
            if name.startswith("_") or not inspect.iscoroutinefunction(member) or name not in vars(cls):
                continue  # only what this store implements itself; inherited defaults stay as they are
            method = getattr(cls, name)

            @functools.wraps(method)
            async def wrapper(self: Any, *args: Any, __method: Any = method, __name: str = name, **kwargs: Any) -> Any:
                try:
                    return await __method(self, *args, **kwargs)
                except StoreError:
                    raise
                except driver_errors as exc:
                    raise StoreUnavailableError(f"{cls.__name__}.{__name} failed: {type(exc).__name__}: {exc}") from exc

            setattr(cls, name, wrapper)
        return cls

    return decorate
