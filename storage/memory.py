"""In-process store for tests and experiments: same contract as the durable ones, no durability.

Like SQLite it has no TTL: it records when it last wrote each entry, for :meth:`MemoryStore.purge_expired`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from runtime.protocol import finished_event_id
from storage.abc import (
    JSON,
    MAX_ITEM_BYTES,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    JobNotFoundError,
    JobRecord,
    check_item_size,
    new_id,
)


class MemoryStore(ConversationStore):
    def __init__(self, *, max_item_bytes: int = MAX_ITEM_BYTES) -> None:
        self._max_item_bytes = max_item_bytes  # the same cap as the durable stores (see storage.abc)
        self._lock = asyncio.Lock()
        self._records: dict[str, ConversationRecord] = {}
        self._references: dict[str, JSON] = {}
        # key -> event id -> (event, processed)
        self._events: dict[str, dict[str, tuple[InboxEvent, bool]]] = {}
        self._jobs: dict[str, dict[str, JobRecord]] = {}
        self._items: dict[str, JSON] = {}
        # When each entry was last written (what purge_expired compares): the record and the
        # reference by conversation key, events and jobs by (key, id), items by item key.
        self._record_written: dict[str, float] = {}
        self._reference_written: dict[str, float] = {}
        self._event_written: dict[tuple[str, str], float] = {}
        self._job_written: dict[tuple[str, str], float] = {}
        self._item_written: dict[str, float] = {}

    async def save_reference(self, key: str, reference: JSON) -> None:
        self._references[key] = copy.deepcopy(reference)
        self._reference_written[key] = time.time()

    async def get_reference(self, key: str) -> JSON | None:
        ref = self._references.get(key)
        return copy.deepcopy(ref) if ref is not None else None

    async def append_event(self, key: str, event: InboxEvent) -> bool:
        events = self._events.setdefault(key, {})
        if event.id in events:
            return False
        check_item_size(f"event {event.id!r} of conversation {key!r}", json.dumps(event.payload),
                        self._max_item_bytes)
        events[event.id] = (copy.deepcopy(event), False)
        self._event_written[key, event.id] = time.time()
        return True

    async def has_event(self, key: str, event_id: str) -> bool:
        return event_id in self._events.get(key, {})

    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        found = self._events.get(key, {}).get(event_id)
        return copy.deepcopy(found[0]) if found else None

    async def annotate_event(self, key: str, event_id: str, name: str, value: Any) -> bool:
        found = self._events.get(key, {}).get(event_id)
        if found is None or found[1]:
            return False
        payload = {**found[0].payload, name: copy.deepcopy(value)}
        check_item_size(f"event {event_id!r} of conversation {key!r}", json.dumps(payload), self._max_item_bytes)
        self._events[key][event_id] = (replace(found[0], payload=payload), False)
        self._event_written[key, event_id] = time.time()
        return True

    async def pending_events(self, key: str) -> list[InboxEvent]:
        return [copy.deepcopy(e) for e, done in self._events.get(key, {}).values() if not done]

    async def count_pending_events(self, key: str) -> int:
        return sum(not done for _, done in self._events.get(key, {}).values())

    async def load(self, key: str) -> ConversationRecord:
        return copy.deepcopy(self._records.get(key, ConversationRecord(key=key)))

    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
        fence: int | None = None,
    ) -> ConversationRecord:
        record = record.fenced(fence)  # issue 18: refuses a worker that lost the conversation
        async with self._lock:
            stored = self._records.get(record.key)
            if (stored.etag if stored else None) != record.etag:
                raise ConcurrencyError(record.key)
            doc = {"agent_state": record.agent_state, "outbox": [(m.id, m.activity) for m in record.outbox]}
            check_item_size(f"conversation {record.key!r}", json.dumps(doc), self._max_item_bytes)
            for job in new_jobs:
                check_item_size(f"job {job.id!r}", json.dumps(job.to_json()), self._max_item_bytes)
            now = time.time()
            committed = copy.deepcopy(record.evolve(etag=new_id()))
            self._records[record.key] = committed
            self._record_written[record.key] = now
            events = self._events.setdefault(record.key, {})
            for event_id in processed:
                if event_id in events:
                    events[event_id] = (events[event_id][0], True)
                    self._event_written[record.key, event_id] = now
            for job in new_jobs:
                jobs = self._jobs.setdefault(job.conversation_key, {})
                if job.id not in jobs:
                    jobs[job.id] = copy.deepcopy(job)
                    self._job_written[job.conversation_key, job.id] = now
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

    async def patch_job(self, key: str, job_id: str, changes: Mapping[str, Any]) -> JobRecord:
        async with self._lock:
            job = (await self.get_job(key, job_id)).evolve(**changes)
            check_item_size(f"job {job_id!r}", json.dumps(job.to_json()), self._max_item_bytes)
            self._jobs[key][job_id] = copy.deepcopy(job)
            self._job_written[key, job_id] = time.time()
            return job

    async def transition_job(self, key: str, job_id: str, from_status: str,
                             changes: Mapping[str, Any]) -> JobRecord | None:
        async with self._lock:
            current = await self.get_job(key, job_id)
            if current.status != from_status:
                return None
            job = current.evolve(**changes)
            check_item_size(f"job {job_id!r}", json.dumps(job.to_json()), self._max_item_bytes)
            self._jobs[key][job_id] = copy.deepcopy(job)
            self._job_written[key, job_id] = time.time()
            return job

    async def list_jobs(self, key: str) -> list[JobRecord]:
        return copy.deepcopy(sorted(self._jobs.get(key, {}).values(), key=lambda j: j.created_at))

    async def unfinished_jobs(self) -> list[JobRecord]:
        unfinished = [j for jobs in self._jobs.values() for j in jobs.values() if not j.finished]
        return copy.deepcopy(sorted(unfinished, key=lambda j: j.created_at))

    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]:
        return {k: copy.deepcopy(self._items[k]) for k in keys if k in self._items}

    async def write_items(self, items: Mapping[str, JSON]) -> None:
        self._items.update(copy.deepcopy(dict(items)))
        now = time.time()
        self._item_written.update(dict.fromkeys(items, now))

    async def delete_items(self, keys: Iterable[str]) -> None:
        for k in keys:
            self._items.pop(k, None)
            self._item_written.pop(k, None)

    async def forget_conversation(self, key: str, *, item_keys: Iterable[str] = ()) -> int:
        """See :meth:`ConversationStore.forget_conversation`."""
        async with self._lock:
            changed = 0
            jobs = self._jobs.get(key, {})
            unfinished = {finished_event_id(i) for i, j in jobs.items() if not j.finished}
            events = self._events.get(key, {})
            for event_id, (event, done) in list(events.items()):
                if done and event.payload and event_id not in unfinished:
                    events[event_id] = (replace(event, payload={}), True)
                    changed += 1
            for job_id in [i for i, j in jobs.items() if j.finished]:
                del jobs[job_id]
                self._job_written.pop((key, job_id), None)
                changed += 1
            for item_key in item_keys:
                if self._items.pop(item_key, None) is not None:
                    self._item_written.pop(item_key, None)
                    changed += 1
            return changed

    async def purge_expired(self, older_than: float) -> int:
        """See :meth:`ConversationStore.purge_expired`."""

        def old(written: float) -> bool:
            return written < older_than

        async with self._lock:
            idle = []
            for key in self._records.keys() | self._references.keys():
                record = self._records.get(key)
                if (  # a missing record or reference counts as old
                    not old(self._record_written.get(key, 0.0))
                    or not old(self._reference_written.get(key, 0.0))
                    or (record is not None and record.outbox)
                    or any(not done or not old(self._event_written[key, i])
                           for i, (_, done) in self._events.get(key, {}).items())
                    or any(not j.finished or not old(self._job_written[key, i])
                           for i, j in self._jobs.get(key, {}).items())
                ):
                    continue
                idle.append(key)
            deleted = 0
            for key, events in self._events.items():
                unfinished = {finished_event_id(i) for i, j in self._jobs.get(key, {}).items() if not j.finished}
                for event_id in [i for i, (_, done) in events.items()
                                 if done and old(self._event_written[key, i]) and i not in unfinished]:
                    del events[event_id], self._event_written[key, event_id]
                    deleted += 1
            for key, jobs in self._jobs.items():
                for job_id in [i for i, j in jobs.items() if j.finished and old(self._job_written[key, i])]:
                    del jobs[job_id], self._job_written[key, job_id]
                    deleted += 1
            for item_key in [k for k in self._items if old(self._item_written[k])]:
                del self._items[item_key], self._item_written[item_key]
                deleted += 1
            for key in idle:  # their events and jobs went above: all processed or finished, and old
                deleted += (self._records.pop(key, None) is not None) + (self._references.pop(key, None) is not None)
                self._record_written.pop(key, None)
                self._reference_written.pop(key, None)
                self._events.pop(key, None)
                self._jobs.pop(key, None)
            return deleted
