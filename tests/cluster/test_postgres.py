"""PostgresCoordinator against the suite's throwaway PostgreSQL (harness/peers/postgres.py), one database per test.

Each coordinator stands for one instance: the advisory lock elects one active worker, NOTIFY
carries wake-ups and cancel requests to it, and losing the lock's connection stops it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import psycopg
import pytest

from cluster.postgres import CANCEL_CHANNEL, PostgresCoordinator
from harness.peers.postgres import psycopg_url

#: How long a notification or takeover may take on a loaded machine (each normally takes milliseconds).
PATIENCE = 5.0

Make = Callable[..., Any]


class Worker:
    """What a worker does with what reaches it: records wake-ups and cancel requests."""

    def __init__(self) -> None:
        self.woken: list[str] = []
        self.cancelled: list[tuple[str, str]] = []
        self.changed = asyncio.Event()

    def on_wake(self, key: str) -> None:
        self.woken.append(key)
        self.changed.set()

    async def on_cancel(self, key: str, job_id: str) -> None:
        self.cancelled.append((key, job_id))
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(PATIENCE):
            while not done():
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
def url(postgres_url: str) -> str:
    return psycopg_url(postgres_url)


@pytest.fixture
async def make(url: str) -> AsyncIterator[Make]:
    """Opens coordinators on the test's database (``on_lost`` fails the test unless a test passes its own)."""
    async with AsyncExitStack() as stack:

        def lost() -> None:
            raise AssertionError("lost the worker lock unexpectedly")

        async def make_one(**options: Any) -> PostgresCoordinator:
            options.setdefault("on_lost", lost)
            coordinator = PostgresCoordinator(url, **options)
            await coordinator.open()
            stack.push_async_callback(coordinator.close)
            return coordinator

        yield make_one


async def test_one_worker_holds_the_lock_and_a_standby_takes_over_when_it_stops(make: Make) -> None:
    first, second, third = await make(), await make(), await make()
    worker = Worker()
    assert await first.lead(worker.on_wake, worker.on_cancel, wait=False) is True
    assert first.active
    assert await second.lead(worker.on_wake, worker.on_cancel, wait=False) is False
    assert not second.active

    standby = asyncio.create_task(third.lead(worker.on_wake, worker.on_cancel))  # waits in the server
    await asyncio.sleep(0.1)
    assert not standby.done() and not third.active
    await first.close()  # closing the session releases the lock at once
    async with asyncio.timeout(PATIENCE):
        assert await standby is True
    assert third.active and not first.active


async def test_wake_ups_from_any_instance_reach_the_active_worker(make: Make) -> None:
    leader, web = await make(), await make()
    worker = Worker()
    await leader.lead(worker.on_wake, worker.on_cancel)
    for key in ("19:a@thread.v2", "19:b@thread.v2", "19:a@thread.v2"):
        web.wake(key)
    leader.wake("own")  # the worker's own wake-ups take the same path
    await worker.until(lambda: {"19:a@thread.v2", "19:b@thread.v2", "own"} <= set(worker.woken))
    assert worker.cancelled == []


async def test_cancel_requests_reach_the_active_worker_and_malformed_ones_are_ignored(make: Make, url: str) -> None:
    leader, web = await make(), await make()
    worker = Worker()
    await leader.lead(worker.on_wake, worker.on_cancel)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:  # something else on the channel
        for payload in ("not json", json.dumps({"key": "k"}), json.dumps(["k", "j"])):
            await conn.execute("SELECT pg_notify(%s, %s)", [CANCEL_CHANNEL, payload])
    await web.cancel("msteams:19:c@thread.v2", "0d73272971a7")
    await worker.until(lambda: bool(worker.cancelled))
    assert worker.cancelled == [("msteams:19:c@thread.v2", "0d73272971a7")] and worker.woken == []
    assert leader.active  # a malformed notification stops nothing


async def test_a_failing_cancel_handler_keeps_the_worker_listening(make: Make) -> None:
    leader, web = await make(), await make()
    worker = Worker()

    async def failing_cancel(key: str, job_id: str) -> None:
        await worker.on_cancel(key, job_id)
        raise RuntimeError("the runner could not cancel")

    await leader.lead(worker.on_wake, failing_cancel)
    await web.cancel("k", "j1")
    await worker.until(lambda: bool(worker.cancelled))
    web.wake("after")
    await worker.until(lambda: worker.woken == ["after"])


async def test_losing_the_lock_connection_stops_the_worker(make: Make, url: str) -> None:
    lost = asyncio.Event()
    leader = await make(heartbeat=0.1, on_lost=lost.set, application_name="lost-test")
    worker = Worker()
    await leader.lead(worker.on_wake, worker.on_cancel)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        cursor = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lost-test lock'")
        assert [row[0] for row in await cursor.fetchall()] == [True]
    async with asyncio.timeout(PATIENCE):
        await lost.wait()  # within 3 heartbeats of the session's end
    assert not leader.active
    # The lock went with the session: another instance can become the worker at once.
    other = await make()
    assert await other.lead(worker.on_wake, worker.on_cancel, wait=False) is True


async def test_a_lost_sending_connection_is_reported_and_reconnected(make: Make, url: str) -> None:
    leader, web = await make(), await make(application_name="web-test")
    worker = Worker()
    await leader.lead(worker.on_wake, worker.on_cancel)
    assert await web.check() == "ok"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'web-test notify'")
    assert (await web.check() or "").startswith("PostgreSQL")  # not ready while its connection is gone
    web.wake("after the outage")  # retried on a new connection
    await worker.until(lambda: worker.woken == ["after the outage"])
    assert await web.check() == "ok"  # the new connection serves readiness too
