"""The embedded default store: one SQLite file under DATA_DIR, accessed through aiosqlite.

aiosqlite runs every statement on its own thread, so nothing here blocks the event loop.
All statements go through one connection guarded by an asyncio lock, which keeps a
multi-statement transaction from interleaving with another coroutine's; ``BEGIN IMMEDIATE``
and a busy timeout make it safe for several processes on one file as well.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from storage.abc import (
    JSON,
    SCHEMA_VERSION,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
    StoreError,
    new_id,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    key TEXT PRIMARY KEY,
    etag TEXT NOT NULL,
    doc TEXT NOT NULL,
    has_outbox INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS conversation_references (
    key TEXT PRIMARY KEY,
    reference TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0,
    UNIQUE (key, id)
);
CREATE INDEX IF NOT EXISTS events_pending ON events (processed, key);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (key, id)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def _record_to_doc(record: ConversationRecord) -> str:
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "agent_state": record.agent_state,
            "outbox": [{"id": m.id, "activity": m.activity} for m in record.outbox],
            "turns": record.turns,
        }
    )


def _record_from_doc(key: str, etag: str, doc: str) -> ConversationRecord:
    data: dict[str, Any] = json.loads(doc)
    return ConversationRecord(
        key=key,
        etag=etag,
        agent_state=data.get("agent_state"),
        outbox=tuple(OutboxMessage(m["id"], m["activity"]) for m in data.get("outbox", [])),
        turns=data.get("turns", 0),
        schema_version=data.get("schema_version", 1),
    )


class SqliteStore(ConversationStore):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        await asyncio.to_thread(self._path.parent.mkdir, parents=True, exist_ok=True)
        db = await aiosqlite.connect(self._path, isolation_level=None, timeout=30)
        # WAL lets readers run during a write; FULL makes an acknowledged ingest survive
        # power loss, not only a process crash.
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=30000")
        await db.executescript(_SCHEMA)
        self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("SqliteStore used before open()")
        return self._db

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        async with self._lock, self.db.execute(sql, params) as cur:
            return await cur.fetchone()

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._lock, self.db.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        async with self._lock, self.db.execute(sql, params) as cur:
            return cur.rowcount

    # --- references ---
    async def save_reference(self, key: str, reference: JSON) -> None:
        await self._write(
            "INSERT INTO conversation_references (key, reference) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET reference = excluded.reference",
            (key, json.dumps(reference)),
        )

    async def get_reference(self, key: str) -> JSON | None:
        row = await self._fetchone("SELECT reference FROM conversation_references WHERE key = ?", (key,))
        return json.loads(row[0]) if row else None

    # --- inbox ---
    async def append_event(self, key: str, event: InboxEvent) -> bool:
        inserted = await self._write(
            "INSERT OR IGNORE INTO events (key, id, kind, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            (key, event.id, event.kind, json.dumps(event.payload), event.created_at),
        )
        return inserted == 1

    async def has_event(self, key: str, event_id: str) -> bool:
        return await self._fetchone("SELECT 1 FROM events WHERE key = ? AND id = ?", (key, event_id)) is not None

    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        row = await self._fetchone(
            "SELECT id, kind, payload, created_at FROM events WHERE key = ? AND id = ?", (key, event_id))
        return InboxEvent(id=row[0], kind=row[1], payload=json.loads(row[2]), created_at=row[3]) if row else None

    async def pending_events(self, key: str) -> list[InboxEvent]:
        rows = await self._fetchall(
            "SELECT id, kind, payload, created_at FROM events WHERE key = ? AND processed = 0 ORDER BY seq",
            (key,),
        )
        return [InboxEvent(id=r[0], kind=r[1], payload=json.loads(r[2]), created_at=r[3]) for r in rows]

    # --- record ---
    async def load(self, key: str) -> ConversationRecord:
        row = await self._fetchone("SELECT etag, doc FROM conversations WHERE key = ?", (key,))
        return _record_from_doc(key, row[0], row[1]) if row else ConversationRecord(key=key)

    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
    ) -> ConversationRecord:
        etag = new_id()
        doc = _record_to_doc(record)
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                async with db.execute("SELECT etag FROM conversations WHERE key = ?", (record.key,)) as cur:
                    row = await cur.fetchone()
                if (row[0] if row else None) != record.etag:
                    raise ConcurrencyError(record.key)
                await db.execute(
                    "INSERT INTO conversations (key, etag, doc, has_outbox, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                    "etag = excluded.etag, doc = excluded.doc, has_outbox = excluded.has_outbox, "
                    "updated_at = excluded.updated_at",
                    (record.key, etag, doc, int(bool(record.outbox)), time.time()),
                )
                if processed:
                    await db.executemany(
                        "UPDATE events SET processed = 1 WHERE key = ? AND id = ?",
                        [(record.key, event_id) for event_id in processed],
                    )
                if new_jobs:
                    await db.executemany(
                        "INSERT OR IGNORE INTO jobs (key, id, status, created_at, doc) VALUES (?, ?, ?, ?, ?)",
                        [(j.conversation_key, j.id, j.status, j.created_at, json.dumps(j.to_json())) for j in new_jobs],
                    )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return record.evolve(etag=etag)

    async def conversations_with_work(self) -> list[str]:
        rows = await self._fetchall(
            "SELECT DISTINCT key FROM events WHERE processed = 0 "
            "UNION SELECT key FROM conversations WHERE has_outbox = 1 ORDER BY key"
        )
        return [r[0] for r in rows]

    # --- jobs ---
    async def get_job(self, key: str, job_id: str) -> JobRecord:
        row = await self._fetchone("SELECT doc FROM jobs WHERE key = ? AND id = ?", (key, job_id))
        if row is None:
            raise JobNotFoundError(key, job_id)
        return JobRecord.from_json(json.loads(row[0]))

    async def put_job(self, job: JobRecord) -> None:
        await self._write(
            "INSERT INTO jobs (key, id, status, created_at, doc) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (key, id) DO UPDATE SET status = excluded.status, doc = excluded.doc",
            (job.conversation_key, job.id, job.status, job.created_at, json.dumps(job.to_json())),
        )

    async def list_jobs(self, key: str) -> list[JobRecord]:
        rows = await self._fetchall("SELECT doc FROM jobs WHERE key = ? ORDER BY created_at", (key,))
        return [JobRecord.from_json(json.loads(r[0])) for r in rows]

    async def unfinished_jobs(self) -> list[JobRecord]:
        rows = await self._fetchall(
            "SELECT doc FROM jobs WHERE status IN ('queued', 'running') ORDER BY created_at"
        )
        return [JobRecord.from_json(json.loads(r[0])) for r in rows]

    # --- items ---
    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]:
        wanted = list(keys)
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        rows = await self._fetchall(f"SELECT key, value FROM items WHERE key IN ({marks})", wanted)
        return {r[0]: json.loads(r[1]) for r in rows}

    async def write_items(self, items: Mapping[str, JSON]) -> None:
        async with self._lock:
            await self.db.executemany(
                "INSERT INTO items (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [(k, json.dumps(v)) for k, v in items.items()],
            )

    async def delete_items(self, keys: Iterable[str]) -> None:
        async with self._lock:
            await self.db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k in keys])
