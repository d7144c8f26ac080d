"""Group commit for the SQLite store: the calls waiting for the connection's thread run together.

Every store call is a function of the connection (``work(conn)``). They queue here; one at a
time a batch of what is waiting goes to aiosqlite's thread and runs in **one transaction**, each
call inside a savepoint of its own: a call that raises (a ``ConcurrencyError``, a missing job)
is rolled back alone and its caller gets the exception; the others commit together, with one
fsync of the write-ahead log for the batch instead of one per call, and one hand-over to the
thread and back for the batch instead of one per call. With one conversation a batch is one
call, as before; under load (the turn benchmark, 10 conversations) the calls of several turns
share one.

A call made with ``alone=True`` runs by itself, outside any batch transaction (it runs its own
and a WAL checkpoint, which needs none open). A batch of calls that all say ``durable=False``
commits with ``synchronous=NORMAL``: not fsynced on its own, the next durable commit's fsync
carries it (a process crash loses nothing either way).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiosqlite

Work = Callable[[sqlite3.Connection], Any]

#: The most calls one transaction takes: a batch holds the database's write lock while it runs.
MAX_BATCH = 64


@dataclass
class _Call:
    work: Work
    writes: bool
    durable: bool
    alone: bool
    future: asyncio.Future[Any]


class GroupCommit:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        self._calls: list[_Call] = []
        self._drainer: asyncio.Task[None] | None = None

    async def run(self, work: Work, *, writes: bool, durable: bool = True, alone: bool = False) -> Any:
        """``work(conn)`` on the connection's thread, in the next batch; its result or its exception.

        ``writes``: it writes (the batch then takes the write lock at once: ``BEGIN IMMEDIATE``)."""
        loop = asyncio.get_running_loop()
        call = _Call(work, writes, durable, alone, loop.create_future())
        self._calls.append(call)
        if self._drainer is None:
            self._drainer = loop.create_task(self._drain(), name="sqlite group commit")
        return await call.future

    async def wait_idle(self) -> None:
        """Until every queued call has run (before the connection is closed)."""
        while self._drainer is not None:
            await asyncio.shield(self._drainer)

    async def _drain(self) -> None:
        try:
            while self._calls:
                batch = self._next_batch()
                execute: Any = self._db._execute  # aiosqlite's queue to its thread (private; aiosqlite is pinned)
                conn = self._db._conn
                try:
                    results = await execute(_run_batch, conn, batch)
                except BaseException as exc:  # the connection is closed, or the batch itself failed
                    results = [(False, exc)] * len(batch)
                for call, (ok, value) in zip(batch, results, strict=True):
                    if call.future.done():  # its caller was cancelled meanwhile
                        continue
                    if ok:
                        call.future.set_result(value)
                    else:
                        call.future.set_exception(value)
        finally:
            self._drainer = None

    def _next_batch(self) -> list[_Call]:
        """The oldest waiting calls, in order: one ``alone`` call, or up to the next one."""
        if self._calls[0].alone:
            return [self._calls.pop(0)]
        end = next((i for i, c in enumerate(self._calls) if c.alone), len(self._calls))
        end = min(end, MAX_BATCH)
        batch, self._calls = self._calls[:end], self._calls[end:]
        return batch


def _run_batch(conn: sqlite3.Connection, batch: list[_Call]) -> list[tuple[bool, Any]]:
    """On the connection's thread: the batch in one transaction, a savepoint per call."""
    if batch[0].alone:
        try:
            return [(True, batch[0].work(conn))]
        except BaseException as exc:
            return [(False, exc)]
    writes = any(c.writes for c in batch)
    lazy = writes and not any(c.writes and c.durable for c in batch)
    results: list[tuple[bool, Any]] = []
    if lazy:
        conn.execute("PRAGMA synchronous=NORMAL")
    try:
        conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
        try:
            for call in batch:
                conn.execute("SAVEPOINT call")
                try:
                    value = call.work(conn)
                except BaseException as exc:
                    conn.execute("ROLLBACK TO call")  # this call's changes only
                    conn.execute("RELEASE call")
                    results.append((False, exc))
                    continue
                conn.execute("RELEASE call")
                results.append((True, value))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except BaseException as exc:  # nothing of the batch was committed: every call failed
        return [(False, exc)] * len(batch)
    finally:
        if lazy:
            conn.execute("PRAGMA synchronous=FULL")
    return results
