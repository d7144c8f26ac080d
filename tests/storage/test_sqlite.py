"""SqliteStore specifics: durability across reopen, several stores on one file, a free event loop."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from storage.abc import ConcurrencyError, ConversationRecord, InboxEvent, JobRecord, OutboxMessage, StoreError
from storage.sqlite import SqliteStore

KEY = "19:sqlite-test@thread.tacv2"
#: A tick of asyncio.sleep(0.001) that takes this long means the loop was blocked. Generous on
#: purpose: a slow shared CI machine can delay a tick by tens of milliseconds without blocking.
MAX_LOOP_GAP = 0.2


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[SqliteStore]:
    store = SqliteStore(path)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def _increment(store: SqliteStore, key: str, max_attempts: int = 500) -> None:
    for _ in range(max_attempts):
        record = await store.load(key)
        state = dict(record.agent_state or {})
        state["counter"] = state.get("counter", 0) + 1
        await asyncio.sleep(0)
        try:
            await store.commit(record.evolve(agent_state=state))
            return
        except ConcurrencyError:
            continue
    raise AssertionError(f"no successful commit after {max_attempts} attempts")


@dataclass
class LoopLag:
    max_gap: float = 0.0
    ticks: int = 0


@asynccontextmanager
async def measure_loop_lag() -> AsyncIterator[LoopLag]:
    """Ticks asyncio.sleep(0.001) in the background and records the largest gap between ticks."""
    lag = LoopLag()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = loop.time()
            lag.max_gap = max(lag.max_gap, now - last)
            lag.ticks += 1
            last = now

    task = asyncio.create_task(tick())
    await asyncio.sleep(0)  # let the ticker start before the workload does
    try:
        yield lag
    finally:
        stop.set()
        await task


async def test_data_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    job = JobRecord(id="j1", conversation_key=KEY, tool="t", arguments={"a": 1}, status="running", call_id="c1")
    async with opened(path) as store:
        await store.save_reference(KEY, {"serviceUrl": "https://x.example/"})
        await store.append_event(KEY, InboxEvent(id="done", kind="message", payload={"text": "1"}))
        await store.append_event(KEY, InboxEvent(id="left", kind="message", payload={"text": "2"}))
        committed = await store.commit(
            ConversationRecord(key=KEY, agent_state={"ü": [1, {"x": None}]}, outbox=(OutboxMessage("o1", {}),)),
            processed=["done"],
            new_jobs=[job],
        )
        await store.write_items({"item": {"v": 1}})

    async with opened(path) as store:
        assert await store.load(KEY) == committed
        assert [e.id for e in await store.pending_events(KEY)] == ["left"]
        assert await store.has_event(KEY, "done")
        assert await store.get_reference(KEY) == {"serviceUrl": "https://x.example/"}
        assert await store.get_job(KEY, "j1") == job
        assert await store.unfinished_jobs() == [job]
        assert await store.read_items(["item"]) == {"item": {"v": 1}}
        assert await store.conversations_with_work() == [KEY]


async def test_jobs_stored_with_a_field_since_removed_still_load(tmp_path: Path) -> None:
    """Job documents written by an older version carry ``announced`` (never read, now gone)."""
    path = tmp_path / "store.sqlite3"
    job = JobRecord(id="j1", conversation_key=KEY, tool="t", arguments={"a": 1}, status="running")
    async with opened(path) as store:
        await store.commit(ConversationRecord(key=KEY), new_jobs=[job])
    with sqlite3.connect(path) as con:  # as an older version left it
        con.execute("UPDATE jobs SET doc = json_set(doc, '$.announced', json('true')) WHERE id = 'j1'")
    async with opened(path) as store:
        assert await store.get_job(KEY, "j1") == job
        assert await store.list_jobs(KEY) == [job] and await store.unfinished_jobs() == [job]
        patched = await store.patch_job(KEY, "j1", {"status": "succeeded"})
        assert patched.status == "succeeded" and await store.get_job(KEY, "j1") == patched
    with sqlite3.connect(path) as con:
        [(doc,)] = con.execute("SELECT doc FROM jobs WHERE id = 'j1'").fetchall()
    assert "announced" not in doc  # rewritten without it


async def test_two_stores_on_one_file_lose_no_update(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    async with opened(path) as first, opened(path) as second:
        await asyncio.gather(*(_increment(store, KEY) for store in (first, second) for _ in range(10)))
        assert (await first.load(KEY)).agent_state == {"counter": 20}
        assert (await second.load(KEY)).agent_state == {"counter": 20}


async def test_two_stores_on_one_file_append_each_event_once(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    ids = [f"activity-{n}" for n in range(25)]
    async with opened(path) as first, opened(path) as second:
        results = await asyncio.gather(
            *(s.append_event(KEY, InboxEvent(id=i, kind="message", payload={})) for i in ids for s in (first, second))
        )
        assert results.count(True) == len(ids)
        assert sorted(e.id for e in await second.pending_events(KEY)) == sorted(ids)


async def test_event_loop_is_not_blocked_by_a_workload(tmp_path: Path) -> None:
    async def conversation(store: SqliteStore, key: str) -> None:
        for batch in range(5):
            ids = [f"e{batch}-{n}" for n in range(5)]
            for event_id in ids:
                await store.append_event(key, InboxEvent(id=event_id, kind="message", payload={"text": "x" * 200}))
            record = await store.load(key)
            job = JobRecord(id=f"j{batch}", conversation_key=key, tool="t", arguments={})
            await store.commit(record.evolve(agent_state={"batch": batch}), processed=ids, new_jobs=[job])
            await store.write_items({f"{key}/dialog": {"batch": batch}})
            await store.conversations_with_work()

    async with opened(tmp_path / "store.sqlite3") as store, measure_loop_lag() as lag:
        await asyncio.gather(*(conversation(store, f"conv-{n}") for n in range(4)))

    assert lag.ticks > 0
    assert lag.max_gap < MAX_LOOP_GAP, f"event loop blocked for {lag.max_gap:.3f}s"


async def test_event_loop_is_not_blocked_while_waiting_for_the_file_lock(tmp_path: Path) -> None:
    """Another process holding the write lock makes commit wait; the wait must not block the loop.

    The lock is held from a plain thread, so it is released on time even if the loop is blocked.
    """
    path = tmp_path / "store.sqlite3"
    hold = 0.5
    locked = threading.Event()

    def hold_write_lock() -> None:
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(hold)
            con.execute("COMMIT")
        finally:
            con.close()

    async with opened(path) as store:
        holder = asyncio.create_task(asyncio.to_thread(hold_write_lock))
        assert await asyncio.to_thread(locked.wait, 10)
        async with measure_loop_lag() as lag:
            started = time.monotonic()
            committed = await store.commit(ConversationRecord(key=KEY, agent_state={"v": 1}))
            waited = time.monotonic() - started
        await holder
        assert await store.load(KEY) == committed

    assert waited >= hold * 0.5  # the commit really did wait for the lock
    assert lag.max_gap < MAX_LOOP_GAP, f"event loop blocked for {lag.max_gap:.3f}s"


def _files_containing(directory: Path, marker: bytes) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.is_file() and marker in p.read_bytes())


async def test_forgotten_text_is_not_left_in_the_database_files(tmp_path: Path) -> None:
    """Redacted and deleted text must not stay in free pages or in the -wal file (read while the store
    is open, as a running bot keeps it: closing checkpoints the WAL anyway)."""
    short, long = b"forget-me-short-7f3a", b"forget-me-long-91c2"
    async with opened(tmp_path / "c.sqlite3") as store:
        await store.append_event(KEY, InboxEvent(id="m1", kind="message", payload={"text": short.decode()}))
        await store.append_event(KEY, InboxEvent(id="m2", kind="message",
                                                 payload={"text": long.decode() * 2000}))  # overflow pages
        await store.commit(ConversationRecord(key=KEY, agent_state={"said": short.decode()}), processed=["m1", "m2"],
                           new_jobs=[JobRecord(id="j1", conversation_key=KEY, tool="t",
                                               arguments={"line": short.decode()}, status="succeeded")])
        await store.write_items({f"dialog/{KEY}": {"text": short.decode()}})
        assert await asyncio.to_thread(_files_containing, tmp_path, short)  # the check can see it
        await store.commit((await store.load(KEY)).evolve(agent_state=None))  # what the reset turn commits
        await store.forget_conversation(KEY, item_keys=[f"dialog/{KEY}"])
        found = await asyncio.to_thread(lambda: (_files_containing(tmp_path, short), _files_containing(tmp_path, long)))
        assert found == ([], []), found


async def test_open_tries_again_while_another_process_holds_the_file_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Processes starting together on one file: SQLite answers some statements "locked" at once (no busy
    wait); open tries again instead of failing the start-up. Any other error is not retried."""
    from storage import sqlite as sqlite_module

    prepare, calls = sqlite_module._prepare, []

    async def locked_twice(db: Any) -> None:
        calls.append(1)
        if len(calls) <= 2:
            raise sqlite3.OperationalError("database is locked")
        await prepare(db)

    monkeypatch.setattr(sqlite_module, "_prepare", locked_twice)
    store = SqliteStore(tmp_path / "c.sqlite3")
    with caplog.at_level(logging.WARNING):
        await store.open()
    assert len(calls) == 3 and "attempt 2 of" in caplog.text
    assert await store.append_event("k", InboxEvent(id="e", kind="message", payload={}))
    await store.close()

    async def broken(db: Any) -> None:
        raise sqlite3.OperationalError("no such table: nothing")

    monkeypatch.setattr(sqlite_module, "_prepare", broken)
    with pytest.raises(StoreError):
        await SqliteStore(tmp_path / "c.sqlite3").open()
