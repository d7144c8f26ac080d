"""Group commit (storage/group_commit.py): calls queued together share one transaction, each in its
own savepoint, so one call's failure is its own; an ``alone`` call runs by itself; order is kept."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from storage import group_commit
from storage.group_commit import GroupCommit


@pytest.fixture
async def db(tmp_path: Path):  # type: ignore[no-untyped-def]
    conn = await aiosqlite.connect(tmp_path / "g.sqlite3", isolation_level=None)
    await conn.execute("PRAGMA journal_mode=WAL")
    await conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v INTEGER)")
    yield conn
    await conn.close()


def insert(k: str, v: int, fail: bool = False):  # type: ignore[no-untyped-def]
    def work(conn: sqlite3.Connection) -> int:
        conn.execute("INSERT INTO t VALUES (?, ?)", (k, v))
        if fail:
            raise LookupError(k)  # after writing: its row must be rolled back, the others' kept
        return v
    return work


async def rows(db: aiosqlite.Connection) -> dict[str, int]:
    return {k: v for k, v in await db.execute_fetchall("SELECT k, v FROM t")}


async def test_calls_queued_together_commit_together_and_a_failing_one_alone_is_undone(
        db: aiosqlite.Connection, monkeypatch: pytest.MonkeyPatch) -> None:
    batches: list[int] = []
    run_batch = group_commit._run_batch

    def counted(conn, batch):  # type: ignore[no-untyped-def]
        batches.append(len(batch))
        return run_batch(conn, batch)

    monkeypatch.setattr(group_commit, "_run_batch", counted)
    group = GroupCommit(db)
    outcomes = await asyncio.gather(
        group.run(insert("a", 1), writes=True),
        group.run(insert("b", 2, fail=True), writes=True),
        group.run(insert("c", 3), writes=True),
        group.run(insert("a", 9), writes=True),  # a constraint error of SQLite, after "a" in the same batch
        group.run(lambda conn: conn.execute("SELECT count(*) FROM t").fetchone()[0], writes=False),
        return_exceptions=True)
    assert outcomes[0] == 1 and outcomes[2] == 3
    assert isinstance(outcomes[1], LookupError) and isinstance(outcomes[3], sqlite3.IntegrityError)
    assert outcomes[4] == 2  # the read sees what the calls before it in the batch wrote, in order
    assert await rows(db) == {"a": 1, "c": 3}
    assert batches == [5]  # one transaction, one fsync, one hand-over for all five


async def test_an_alone_call_runs_outside_any_transaction_in_its_place(db: aiosqlite.Connection) -> None:
    group = GroupCommit(db)
    seen: list[bool] = []

    def checkpoint(conn: sqlite3.Connection) -> None:
        seen.append(conn.in_transaction)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    await asyncio.gather(group.run(insert("a", 1), writes=True), group.run(checkpoint, writes=True, alone=True),
                         group.run(insert("b", 2), writes=True))
    assert seen == [False]
    assert await rows(db) == {"a": 1, "b": 2}


async def test_a_batch_that_cannot_begin_fails_every_call_and_the_next_batch_runs(db: aiosqlite.Connection) -> None:
    group = GroupCommit(db)
    await db.execute("BEGIN IMMEDIATE")  # a transaction left open on the connection: BEGIN fails in the batch
    first = await asyncio.gather(group.run(insert("a", 1), writes=True), group.run(insert("b", 2), writes=True),
                                 return_exceptions=True)
    assert all(isinstance(o, sqlite3.OperationalError) for o in first)
    await db.execute("ROLLBACK")
    assert await group.run(insert("c", 3), writes=True) == 3
    assert await rows(db) == {"c": 3}


async def test_a_lazy_batch_is_not_fsynced_on_its_own(db: aiosqlite.Connection) -> None:
    group = GroupCommit(db)
    modes: list[int] = []

    def write_and_look(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT OR REPLACE INTO t VALUES ('x', 0)")
        modes.append(conn.execute("PRAGMA synchronous").fetchone()[0])

    await db.execute("PRAGMA synchronous=FULL")
    await group.run(write_and_look, writes=True, durable=False)
    await asyncio.gather(group.run(insert("d", 4), writes=True),
                         group.run(write_and_look, writes=True, durable=False))
    assert modes == [1, 2]  # NORMAL for a lazy batch alone; FULL once a durable call shares the batch
    assert list(await db.execute_fetchall("PRAGMA synchronous"))[0][0] == 2  # and FULL again after it


async def test_a_cancelled_caller_does_not_stop_the_others(db: aiosqlite.Connection) -> None:
    group = GroupCommit(db)
    first = asyncio.ensure_future(group.run(insert("a", 1), writes=True))
    second = asyncio.ensure_future(group.run(insert("b", 2), writes=True))
    await asyncio.sleep(0)
    first.cancel()
    assert await second == 2
    await group.wait_idle()
    assert (await rows(db)).get("b") == 2
