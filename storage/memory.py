"""In-process store for tests and experiments: same contract as the durable ones, no durability."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterable, Mapping, Sequence

from storage.abc import (
    JSON,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    JobNotFoundError,
    JobRecord,
    new_id,
)


class MemoryStore(ConversationStore):
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._records: dict[str, ConversationRecord] = {}
        self._references: dict[str, JSON] = {}
        # key -> event id -> (event, processed)
        self._events: dict[str, dict[str, tuple[InboxEvent, bool]]] = {}
        self._jobs: dict[str, dict[str, JobRecord]] = {}
        self._items: dict[str, JSON] = {}

    async def save_reference(self, key: str, reference: JSON) -> None:
        self._references[key] = copy.deepcopy(reference)

    async def get_reference(self, key: str) -> JSON | None:
        ref = self._references.get(key)
        return copy.deepcopy(ref) if ref is not None else None

    async def append_event(self, key: str, event: InboxEvent) -> bool:
        events = self._events.setdefault(key, {})
        if event.id in events:
            return False
        events[event.id] = (copy.deepcopy(event), False)
        return True

    async def has_event(self, key: str, event_id: str) -> bool:
        return event_id in self._events.get(key, {})

    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        found = self._events.get(key, {}).get(event_id)
        return copy.deepcopy(found[0]) if found else None

    async def pending_events(self, key: str) -> list[InboxEvent]:
        return [copy.deepcopy(e) for e, done in self._events.get(key, {}).values() if not done]

    async def load(self, key: str) -> ConversationRecord:
        return copy.deepcopy(self._records.get(key, ConversationRecord(key=key)))

    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
    ) -> ConversationRecord:
        async with self._lock:
            stored = self._records.get(record.key)
            if (stored.etag if stored else None) != record.etag:
                raise ConcurrencyError(record.key)
            committed = copy.deepcopy(record.evolve(etag=new_id()))
            self._records[record.key] = committed
            events = self._events.setdefault(record.key, {})
            for event_id in processed:
                if event_id in events:
                    events[event_id] = (events[event_id][0], True)
            for job in new_jobs:
                self._jobs.setdefault(job.conversation_key, {}).setdefault(job.id, copy.deepcopy(job))
            return copy.deepcopy(committed)

    async def conversations_with_work(self) -> list[str]:
        keys = {k for k, evs in self._events.items() if any(not d for _, d in evs.values())}
        keys |= {k for k, r in self._records.items() if r.outbox}
        return sorted(keys)

    async def get_job(self, key: str, job_id: str) -> JobRecord:
        try:
            return copy.deepcopy(self._jobs[key][job_id])
        except KeyError:
            raise JobNotFoundError(key, job_id) from None

    async def put_job(self, job: JobRecord) -> None:
        self._jobs.setdefault(job.conversation_key, {})[job.id] = copy.deepcopy(job)

    async def list_jobs(self, key: str) -> list[JobRecord]:
        return copy.deepcopy(sorted(self._jobs.get(key, {}).values(), key=lambda j: j.created_at))

    async def unfinished_jobs(self) -> list[JobRecord]:
        unfinished = [j for jobs in self._jobs.values() for j in jobs.values() if not j.finished]
        return copy.deepcopy(sorted(unfinished, key=lambda j: j.created_at))

    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]:
        return {k: copy.deepcopy(self._items[k]) for k in keys if k in self._items}

    async def write_items(self, items: Mapping[str, JSON]) -> None:
        self._items.update(copy.deepcopy(dict(items)))

    async def delete_items(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._items.pop(k, None)
