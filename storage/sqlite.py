"""The embedded default store: one SQLite file under DATA_DIR, accessed through aiosqlite.

aiosqlite runs the statements on its own thread, so nothing here blocks the event loop. Every
store call is one function run on that thread (:meth:`SqliteStore._in_thread`), whole
transactions included: aiosqlite runs what it is given one at a time and in order, so one
call's transaction never interleaves with another's, and no lock is held across awaits (calls
queue on the thread, which works through them back to back). One hand-over per call, not one
per statement, fetch and cursor close: a turn made about 25 before, each a wake-up of the
event loop and of the thread. ``BEGIN IMMEDIATE`` and a busy timeout make it safe for several
processes on one file as well.

Retention: SQLite has no TTL, so every row carries ``updated_at`` (the time this store last
wrote it) and :meth:`SqliteStore.purge_expired` deletes what expired (the app calls it hourly).
Files from before that column existed get it on :meth:`SqliteStore.open`, set to the time of
the upgrade, so old rows start their retention period then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from storage.abc import (
    JSON,
    MAX_ITEM_BYTES,
    SCHEMA_VERSION,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
    StoreError,
    TurnStart,
    check_item_size,
    new_id,
    translate_errors,
)
from storage.group_commit import GroupCommit
from storage.private_files import ensure_private_file, tighten_sidecars

log = logging.getLogger(__name__)

_T = TypeVar("_T")

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
    reference TEXT NOT NULL,
    updated_at REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    created_at REAL NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL DEFAULT 0,
    UNIQUE (key, id)
);
CREATE INDEX IF NOT EXISTS events_pending ON events (processed, key);
CREATE TABLE IF NOT EXISTS jobs (
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    doc TEXT NOT NULL,
    updated_at REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (key, id)
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE TABLE IF NOT EXISTS items (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at REAL NOT NULL DEFAULT 0
);
"""

#: Tables that got ``updated_at`` after their first release (added by :func:`_add_updated_at`).
_RETENTION_TABLES = ("conversation_references", "events", "jobs", "items")

#: Created after :func:`_add_updated_at`: on an older file the column does not exist before it.
_RETENTION_INDEXES = """
CREATE INDEX IF NOT EXISTS events_expiry ON events (processed, updated_at);
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (status, updated_at);
CREATE INDEX IF NOT EXISTS conversations_idle ON conversations (updated_at);
CREATE INDEX IF NOT EXISTS conversation_references_idle ON conversation_references (updated_at);
CREATE INDEX IF NOT EXISTS items_expiry ON items (updated_at);
"""

_FINISHED = "('succeeded', 'failed', 'cancelled', 'rejected', 'expired')"
_UNFINISHED = "('queued', 'running', 'awaiting_approval')"

#: Idle conversations (see ConversationStore.purge_expired): nothing written since ``:t``, no
#: pending event, no unsent message, no unfinished job. Candidates come from the two small
#: "not written since" index ranges; each is then checked through its own key's rows only.
_IDLE_KEYS = f"""
SELECT key FROM (
    SELECT key FROM conversations WHERE updated_at < :t AND has_outbox = 0
    UNION
    SELECT key FROM conversation_references WHERE updated_at < :t
) AS candidate
WHERE NOT EXISTS (SELECT 1 FROM conversations c WHERE c.key = candidate.key
                  AND (c.updated_at >= :t OR c.has_outbox = 1))
  AND NOT EXISTS (SELECT 1 FROM conversation_references r WHERE r.key = candidate.key AND r.updated_at >= :t)
  AND NOT EXISTS (SELECT 1 FROM events e WHERE e.key = candidate.key AND (e.processed = 0 OR e.updated_at >= :t))
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.key = candidate.key
                  AND (j.status IN {_UNFINISHED} OR j.updated_at >= :t))
"""


async def _add_updated_at(db: aiosqlite.Connection) -> None:
    """Add ``updated_at`` to tables of a file written before retention existed (one transaction,
    re-checked inside it, so two processes opening one old file cannot both add it)."""

    async def missing() -> list[str]:
        tables = []
        for table in _RETENTION_TABLES:
            async with db.execute(f"PRAGMA table_info({table})") as cur:
                if "updated_at" not in {row[1] for row in await cur.fetchall()}:
                    tables.append(table)
        return tables

    if not await missing():
        return
    await db.execute("BEGIN IMMEDIATE")
    try:
        upgraded_at = time.time()
        for table in await missing():
            await db.execute(f"ALTER TABLE {table} ADD COLUMN updated_at REAL NOT NULL DEFAULT 0")
            await db.execute(f"UPDATE {table} SET updated_at = ?", (upgraded_at,))
        await db.execute("COMMIT")
    except BaseException:
        await db.execute("ROLLBACK")
        raise


def _record_to_doc(record: ConversationRecord) -> str:
    return json.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "agent_state": record.agent_state,
            "outbox": [{"id": m.id, "activity": m.activity} for m in record.outbox],
            "turns": record.turns,
            "fence": record.fence,
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
        fence=data.get("fence", 0),
    )


#: How often :meth:`SqliteStore.open` tries again when the file is locked (about 15 s in all).
OPEN_ATTEMPTS = 10


async def _prepare(db: aiosqlite.Connection) -> None:
    """The connection's settings, the schema and its upgrades."""
    # WAL lets readers run during a write; FULL makes an acknowledged ingest survive
    # power loss, not only a process crash.
    await db.execute("PRAGMA journal_mode=WAL")
    await db.execute("PRAGMA synchronous=FULL")
    await db.execute("PRAGMA busy_timeout=30000")
    # Deleted and overwritten content is zeroed, not left in free pages (a reset must really
    # forget; see forget_conversation for the WAL file).
    await db.execute("PRAGMA secure_delete=ON")
    await db.executescript(_SCHEMA)
    await _add_updated_at(db)
    await db.executescript(_RETENTION_INDEXES)


def _checkpoint(conn: sqlite3.Connection, why: str) -> None:
    """Copy the WAL into the database and empty it, so the page images a deletion replaced are gone
    from the ``-wal`` file too."""
    row = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    if row is not None and row[0]:  # another connection is reading: the old frames go at the next one
        log.warning("%s: the WAL checkpoint was blocked by a reader; deleted content stays in the -wal "
                    "file until the next checkpoint", why)


@translate_errors(sqlite3.Error, OSError)
class SqliteStore(ConversationStore):
    def __init__(self, path: str | os.PathLike[str], *, max_item_bytes: int = MAX_ITEM_BYTES) -> None:
        """``max_item_bytes``: the largest row document written (Cosmos DB's item limit by default)."""
        self._path = Path(path)
        self._max_item_bytes = max_item_bytes
        self._db: aiosqlite.Connection | None = None
        self._group: GroupCommit | None = None

    @property
    def path(self) -> Path:
        return self._path

    async def open(self) -> None:
        await asyncio.to_thread(ensure_private_file, self._path)  # 0600 in a 0700 directory, whatever the umask
        for attempt in range(1, OPEN_ATTEMPTS + 1):
            db = await aiosqlite.connect(self._path, isolation_level=None, timeout=30)
            try:
                await _prepare(db)
                break
            except sqlite3.OperationalError as exc:
                await db.close()
                # Processes starting together on one file (a web and two workers on a shared DATA_DIR): a
                # statement SQLite cannot wait for (it would deadlock) answers "locked" at once, whatever
                # the busy timeout; the scale-out benchmark's worker failed its start-up so, once in a run.
                if "locked" not in str(exc) or attempt == OPEN_ATTEMPTS:
                    raise
                log.warning("opening %s: %s (attempt %d of %d); trying again", self._path, exc, attempt,
                            OPEN_ATTEMPTS)
                await asyncio.sleep(min(2.0, 0.05 * 2 ** attempt))
        await asyncio.to_thread(tighten_sidecars, self._path)  # files an older version left too open
        self._db = db
        self._group = GroupCommit(db)

    async def close(self) -> None:
        if self._db is not None:
            if self._group is not None:
                await self._group.wait_idle()
            await self._db.close()
            self._db = None
            self._group = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("SqliteStore used before open()")
        return self._db

    async def _in_thread(self, work: Callable[[sqlite3.Connection], _T], *, writes: bool, durable: bool = True,
                         alone: bool = False) -> _T:
        """``work(connection)`` on aiosqlite's thread, inside a transaction shared with the calls queued
        beside it (storage/group_commit.py), unless ``alone``."""
        if self._group is None:
            raise StoreError("SqliteStore used before open()")
        result: _T = await self._group.run(work, writes=writes, durable=durable, alone=alone)
        return result

    async def _fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        return await self._in_thread(lambda conn: conn.execute(sql, params).fetchone(), writes=False)

    async def _fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return await self._in_thread(lambda conn: conn.execute(sql, params).fetchall(), writes=False)

    async def _write(self, sql: str, params: Sequence[Any]) -> int:
        return await self._in_thread(lambda conn: conn.execute(sql, params).rowcount, writes=True)

    # --- references ---
    async def save_reference(self, key: str, reference: JSON) -> None:
        await self._write(
            "INSERT INTO conversation_references (key, reference, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET reference = excluded.reference, updated_at = excluded.updated_at",
            (key, json.dumps(reference), time.time()),
        )

    async def get_reference(self, key: str) -> JSON | None:
        row = await self._fetchone("SELECT reference FROM conversation_references WHERE key = ?", (key,))
        return json.loads(row[0]) if row else None

    # --- inbox ---
    async def append_event(self, key: str, event: InboxEvent) -> bool:
        payload = json.dumps(event.payload)
        check_item_size(f"event {event.id!r} of conversation {key!r}", payload, self._max_item_bytes)
        inserted = await self._write(
            "INSERT OR IGNORE INTO events (key, id, kind, payload, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?)",
            (key, event.id, event.kind, payload, event.created_at, time.time()),
        )
        return inserted == 1

    async def has_event(self, key: str, event_id: str) -> bool:
        return await self._fetchone("SELECT 1 FROM events WHERE key = ? AND id = ?", (key, event_id)) is not None

    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        row = await self._fetchone(
            "SELECT id, kind, payload, created_at FROM events WHERE key = ? AND id = ?", (key, event_id))
        return InboxEvent(id=row[0], kind=row[1], payload=json.loads(row[2]), created_at=row[3]) if row else None

    async def annotate_event(self, key: str, event_id: str, name: str, value: Any) -> bool:
        row = await self._fetchone("SELECT payload FROM events WHERE key = ? AND id = ? AND processed = 0",
                                   (key, event_id))
        if row is None:
            return False
        payload = json.dumps({**json.loads(row[0]), name: value})
        check_item_size(f"event {event_id!r} of conversation {key!r}", payload, self._max_item_bytes)
        changed = await self._write("UPDATE events SET payload = ?, updated_at = ? WHERE key = ? AND id = ? "
                                    "AND processed = 0", (payload, time.time(), key, event_id))
        return changed == 1

    async def pending_events(self, key: str) -> list[InboxEvent]:
        rows = await self._fetchall(
            "SELECT id, kind, payload, created_at FROM events WHERE key = ? AND processed = 0 ORDER BY seq",
            (key,),
        )
        return [InboxEvent(id=r[0], kind=r[1], payload=json.loads(r[2]), created_at=r[3]) for r in rows]

    async def count_pending_events(self, key: str) -> int:
        row = await self._fetchone("SELECT count(*) FROM events WHERE processed = 0 AND key = ?", (key,))
        return int(row[0])

    # --- record ---
    async def load(self, key: str) -> ConversationRecord:
        row = await self._fetchone("SELECT etag, doc FROM conversations WHERE key = ?", (key,))
        return _record_from_doc(key, row[0], row[1]) if row else ConversationRecord(key=key)

    async def load_turn(self, key: str) -> TurnStart:
        def read(conn: sqlite3.Connection) -> tuple[Any, list[Any], Any]:
            # One transaction (the batch's): the record and the events it has not processed agree.
            record = conn.execute("SELECT etag, doc FROM conversations WHERE key = ?", (key,)).fetchone()
            events = conn.execute("SELECT id, kind, payload, created_at FROM events "
                                  "WHERE key = ? AND processed = 0 ORDER BY seq", (key,)).fetchall()
            reference = conn.execute("SELECT reference FROM conversation_references WHERE key = ?",
                                     (key,)).fetchone()
            return record, events, reference

        row, rows, reference = await self._in_thread(read, writes=False)
        return TurnStart(
            record=_record_from_doc(key, row[0], row[1]) if row else ConversationRecord(key=key),
            events=[InboxEvent(id=r[0], kind=r[1], payload=json.loads(r[2]), created_at=r[3]) for r in rows],
            reference=json.loads(reference[0]) if reference else None)

    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
        fence: int | None = None,
    ) -> ConversationRecord:
        record = record.fenced(fence)  # issue 18: refuses a worker that lost the conversation
        etag = new_id()
        doc = _record_to_doc(record)
        check_item_size(f"conversation {record.key!r}", doc, self._max_item_bytes)
        jobs = [(j, json.dumps(j.to_json())) for j in new_jobs]
        for job, job_doc in jobs:
            check_item_size(f"job {job.id!r}", job_doc, self._max_item_bytes)
        now = time.time()

        def write(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT etag FROM conversations WHERE key = ?", (record.key,)).fetchone()
            if (row[0] if row else None) != record.etag:
                raise ConcurrencyError(record.key)
            conn.execute(
                "INSERT INTO conversations (key, etag, doc, has_outbox, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "etag = excluded.etag, doc = excluded.doc, has_outbox = excluded.has_outbox, "
                "updated_at = excluded.updated_at",
                (record.key, etag, doc, int(bool(record.outbox)), now),
            )
            if processed:
                conn.executemany(
                    "UPDATE events SET processed = 1, updated_at = ? WHERE key = ? AND id = ?",
                    [(now, record.key, event_id) for event_id in processed],
                )
            if new_jobs:
                conn.executemany(
                    "INSERT OR IGNORE INTO jobs (key, id, status, created_at, doc, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    [(j.conversation_key, j.id, j.status, j.created_at, job_doc, now) for j, job_doc in jobs],
                )

        await self._in_thread(write, writes=True)  # in one transaction: a ConcurrencyError writes nothing
        return record.evolve(etag=etag)

    async def remove_from_outbox(self, record: ConversationRecord, ids: Iterable[str], *,
                                 fence: int | None = None) -> ConversationRecord:
        """Sets the document's outbox (and fence) in place: the rest of the stored document is the record's
        already (the update is conditional on its etag), so it is not serialised and written again."""
        gone = set(ids)
        record = record.evolve(outbox=tuple(m for m in record.outbox if m.id not in gone)).fenced(fence)
        outbox = json.dumps([{"id": m.id, "activity": m.activity} for m in record.outbox])
        etag = new_id()

        def write(conn: sqlite3.Connection) -> int:
            return int(conn.execute(
                "UPDATE conversations SET doc = json_set(doc, '$.outbox', json(?), '$.fence', ?), etag = ?, "
                "has_outbox = ?, updated_at = ? WHERE key = ? AND etag = ?",
                (outbox, record.fence, etag, int(bool(record.outbox)), time.time(), record.key,
                 record.etag)).rowcount)

        # Not fsynced on its own (the next durable commit's fsync of the write-ahead log carries it): a
        # process crash loses nothing; a power loss at worst loses the removal, and a sent message is sent
        # again, the repeat a crash between a send and its removal makes anyway.
        if await self._in_thread(write, writes=True, durable=False) != 1:
            raise ConcurrencyError(record.key)
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

    async def patch_job(self, key: str, job_id: str, changes: Mapping[str, Any]) -> JobRecord:
        job = await self._change_job(key, job_id, lambda current: current.evolve(**changes))
        assert job is not None  # the change always applies
        return job

    async def transition_job(self, key: str, job_id: str, from_status: str,
                             changes: Mapping[str, Any]) -> JobRecord | None:
        return await self._change_job(
            key, job_id, lambda current: current.evolve(**changes) if current.status == from_status else None)

    async def _change_job(self, key: str, job_id: str,
                          change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Read, ``change`` (None: leave it as it is), write: in one transaction, safe against other processes too."""
        def read_change_write(conn: sqlite3.Connection) -> JobRecord | None:
            row = conn.execute("SELECT doc FROM jobs WHERE key = ? AND id = ?", (key, job_id)).fetchone()
            if row is None:
                raise JobNotFoundError(key, job_id)
            job = change(JobRecord.from_json(json.loads(row[0])))
            if job is None:
                return None
            doc = json.dumps(job.to_json())
            check_item_size(f"job {job_id!r}", doc, self._max_item_bytes)
            conn.execute("UPDATE jobs SET status = ?, doc = ?, updated_at = ? WHERE key = ? AND id = ?",
                         (job.status, doc, time.time(), key, job_id))
            return job

        return await self._in_thread(read_change_write, writes=True)

    async def list_jobs(self, key: str) -> list[JobRecord]:
        rows = await self._fetchall("SELECT doc FROM jobs WHERE key = ? ORDER BY created_at", (key,))
        return [JobRecord.from_json(json.loads(r[0])) for r in rows]

    async def unfinished_jobs(self) -> list[JobRecord]:
        rows = await self._fetchall(
            f"SELECT doc FROM jobs WHERE status IN {_UNFINISHED} ORDER BY created_at"
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
        now = time.time()
        rows = [(k, json.dumps(v), now) for k, v in items.items()]
        await self._in_thread(lambda conn: conn.executemany(
            "INSERT INTO items (key, value, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at", rows),
            writes=True)

    async def delete_items(self, keys: Iterable[str]) -> None:
        rows = [(k,) for k in keys]
        await self._in_thread(lambda conn: conn.executemany("DELETE FROM items WHERE key = ?", rows), writes=True)

    # --- forgetting ---
    async def forget_conversation(self, key: str, *, item_keys: Iterable[str] = ()) -> int:
        """See :meth:`ConversationStore.forget_conversation`: one transaction, then a checkpoint.

        ``secure_delete`` zeroes what the transaction frees in the database pages, but in WAL
        mode the old page images (with the texts) stay in the ``-wal`` file until a checkpoint
        copies the new ones back: ``wal_checkpoint(TRUNCATE)`` does that and empties the file.
        """
        keys = [(k,) for k in dict.fromkeys(item_keys)]

        def forget(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                changed = conn.execute(
                    "UPDATE events SET payload = '{}' WHERE key = ? AND processed = 1 AND payload != '{}' "
                    "AND NOT EXISTS (SELECT 1 FROM jobs WHERE substr(events.id, 1, 4) = 'job:' "
                    f"AND jobs.key = events.key AND jobs.id = substr(events.id, 5) AND jobs.status IN {_UNFINISHED})",
                    (key,),
                ).rowcount
                changed += conn.execute(f"DELETE FROM jobs WHERE key = ? AND status IN {_FINISHED}", (key,)).rowcount
                if keys:
                    changed += conn.executemany("DELETE FROM items WHERE key = ?", keys).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            _checkpoint(conn, f"forgetting {key}")
            return changed

        return await self._in_thread(forget, writes=True, alone=True)  # alone: the checkpoint needs no transaction

    # --- retention ---
    async def purge_expired(self, older_than: float) -> int:
        """See :meth:`ConversationStore.purge_expired`; one ``BEGIN IMMEDIATE`` transaction."""
        t = {"t": older_than}

        def purge(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                idle = [(row[0],) for row in conn.execute(_IDLE_KEYS, t).fetchall()]
                deleted = 0
                for sql in (
                    # A job's finish event stays while the job is unfinished (JobRunner recovery).
                    "DELETE FROM events WHERE processed = 1 AND updated_at < :t AND NOT EXISTS ("
                    "SELECT 1 FROM jobs WHERE substr(events.id, 1, 4) = 'job:' AND jobs.key = events.key "
                    f"AND jobs.id = substr(events.id, 5) AND jobs.status IN {_UNFINISHED})",
                    f"DELETE FROM jobs WHERE status IN {_FINISHED} AND updated_at < :t",
                    "DELETE FROM items WHERE updated_at < :t",
                ):
                    deleted += conn.execute(sql, t).rowcount
                for table in ("conversations", "conversation_references") if idle else ():
                    deleted += conn.executemany(f"DELETE FROM {table} WHERE key = ?", idle).rowcount
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            if deleted:
                _checkpoint(conn, "retention")
            return deleted

        return await self._in_thread(purge, writes=True, alone=True)
