"""The durable store's interface, in three seams every implementation (memory, sqlite, cosmos) fulfils.

A conversation is one record (agent state, outbox, version tag) plus its inbox events, its job
records and the conversation reference used for proactive sends. The record is only ever written
with :meth:`ConversationLog.commit`, conditional on its etag, which is what makes "fold events into
state" safe against crashes and concurrent writers.

* :class:`ConversationLog`: the reference, the inbox, the record and its outbox (the processor, the ingest).
* :class:`JobStore`: reading and patching job records (the job runner, cards, caps). Jobs are born
  only in a :meth:`ConversationLog.commit` (``new_jobs``), atomically with the turn that started them.
* :class:`ItemStore`: small opaque key/value items (botbuilder dialog state, token budgets).
* :class:`ConversationStore`: all three, plus what spans them (lifecycle, forgetting, retention).
  It is what a store implements and what the composition root passes around; a consumer that
  needs one seam asks for just that seam.

The records and errors live in :mod:`storage.records` and are re-exported here.
"""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from storage.records import (
    JSON,
    MAX_ITEM_BYTES,
    SCHEMA_VERSION,
    ConcurrencyError,
    ConversationRecord,
    FencedWriteError,
    InboxEvent,
    ItemTooLargeError,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
    StoreError,
    StoreUnavailableError,
    check_item_size,
    new_id,
)

__all__ = [
    "JSON",
    "MAX_ITEM_BYTES",
    "SCHEMA_VERSION",
    "ConcurrencyError",
    "ConversationLog",
    "ConversationRecord",
    "ConversationStore",
    "FencedWriteError",
    "InboxEvent",
    "ItemStore",
    "ItemTooLargeError",
    "JobNotFoundError",
    "JobRecord",
    "JobStore",
    "OutboxMessage",
    "StoreError",
    "StoreUnavailableError",
    "TurnStart",
    "check_item_size",
    "new_id",
    "translate_errors",
]


class ConversationLog(ABC):
    """A conversation's reference, inbox and record (with its outbox). Coroutines; none may block the loop."""

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

    @abstractmethod
    async def annotate_event(self, key: str, event_id: str, name: str, value: Any) -> bool:
        """Set ``payload[name] = value`` on a **pending** event (one small write; the turn that
        processes it reads it back with :meth:`pending_events`). Returns False, changing nothing,
        if there is no such pending event. Raises :class:`ItemTooLargeError` if the event would
        exceed the item size limit."""

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
        fence: int | None = None,
    ) -> ConversationRecord:
        """Atomically write ``record``, mark ``processed`` events done and create ``new_jobs``.

        ``fence`` (issue 18): the writer's lease epoch; the store refuses the write with
        :class:`FencedWriteError` when the record was last written under a newer one
        (:meth:`ConversationRecord.fenced`).

        Conditional on ``record.etag`` (None = must not exist yet). Raises
        :class:`ConcurrencyError` if the stored etag differs, :class:`ItemTooLargeError` if the
        record exceeds the store's item size limit; nothing is written then.
        Returns the record with its new etag.
        """

    @abstractmethod
    async def conversations_with_work(self) -> list[str]:
        """Keys of conversations with pending events or unsent outbox messages."""

    # --- a turn's round trips (issue 17): stores override these with fewer requests ---
    async def load_turn(self, key: str) -> TurnStart:
        """What a processing round starts from: :meth:`load`, :meth:`pending_events` and, when there
        is something to do (events or an outbox), :meth:`get_reference`."""
        record = await self.load(key)
        events = await self.pending_events(key)
        reference = await self.get_reference(key) if events or record.outbox else None
        return TurnStart(record, events, reference)

    async def remove_from_outbox(self, record: ConversationRecord, ids: Iterable[str], *,
                                 fence: int | None = None) -> ConversationRecord:
        """Remove the messages ``ids`` from the stored outbox, conditional on ``record.etag`` like
        :meth:`commit` (:class:`ConcurrencyError` if it moved), fenced like it (``fence``); returns the
        record with its new etag. Nothing else of the record changes."""
        gone = set(ids)
        return await self.commit(record.evolve(outbox=tuple(m for m in record.outbox if m.id not in gone)),
                                 fence=fence)


@dataclass(frozen=True)
class TurnStart:
    """:meth:`ConversationLog.load_turn`: the record, its pending events (oldest first), the reference."""

    record: ConversationRecord
    events: list[InboxEvent]
    reference: JSON | None


class JobStore(ABC):
    """Job records, each in its conversation. No create here: a job is written by the commit that
    started it (:meth:`ConversationLog.commit`, ``new_jobs``); afterwards only patched."""

    @abstractmethod
    async def get_job(self, key: str, job_id: str) -> JobRecord:
        """Raises :class:`JobNotFoundError` if there is no such job."""

    @abstractmethod
    async def patch_job(self, key: str, job_id: str, changes: Mapping[str, Any]) -> JobRecord:
        """Atomically change some fields of a job (and ``updated_at``); returns the job as stored.

        Writers own different fields (the runner its progress and status, a cancel request its
        flag, the card updater the card id), so a patch never loses another writer's change.
        Raises :class:`JobNotFoundError` if there is no such job.
        """

    @abstractmethod
    async def transition_job(self, key: str, job_id: str, from_status: str,
                             changes: Mapping[str, Any]) -> JobRecord | None:
        """Apply ``changes`` to a job only if its status is still ``from_status``, atomically (issue 16:
        an approval decision is claimed once). Returns the job as stored when this call made the change,
        None when the job's status was another (someone else moved first; nothing changed).
        Raises :class:`JobNotFoundError` if there is no such job.
        """

    @abstractmethod
    async def list_jobs(self, key: str) -> list[JobRecord]:
        """The conversation's jobs, oldest first."""

    @abstractmethod
    async def unfinished_jobs(self) -> list[JobRecord]:
        """Jobs queued, running or awaiting approval in any conversation (recovery at start-up, caps)."""


class ItemStore(ABC):
    """Small key/value items with opaque keys (botbuilder dialog state, token budgets)."""

    @abstractmethod
    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]: ...

    @abstractmethod
    async def write_items(self, items: Mapping[str, JSON]) -> None: ...

    @abstractmethod
    async def delete_items(self, keys: Iterable[str]) -> None: ...


class ConversationStore(ConversationLog, JobStore, ItemStore):
    """All three seams plus what spans them: what every store implements."""

    async def open(self) -> None:
        """Create tables/containers if missing. Called once at start-up."""

    async def close(self) -> None:
        """Release connections."""

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
        this store: appended, committed, saved or patched, not a timestamp inside the data. Deleted:

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


#: Every coroutine of every seam (what :func:`translate_errors` wraps).
_STORE_METHODS = sorted({
    name
    for seam in ConversationStore.__mro__
    for name, member in vars(seam).items()
    if not name.startswith("_") and inspect.iscoroutinefunction(member)
})

_StoreT = TypeVar("_StoreT", bound=type[ConversationStore])


def translate_errors(*driver_errors: type[BaseException]) -> Callable[[_StoreT], _StoreT]:
    """Class decorator: a driver's errors leave every store method as StoreUnavailableError.

    Callers then handle one family (StoreError) whatever the backend; errors the store already
    translated (ConcurrencyError, JobNotFoundError ...) pass through unchanged.
    """

    def decorate(cls: _StoreT) -> _StoreT:
        for name in _STORE_METHODS:
            if name not in vars(cls):
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
