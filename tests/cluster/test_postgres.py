"""PostgresCoordinator against the suite's throwaway PostgreSQL (harness/peers/postgres.py), one database per test.

Each coordinator stands for one worker (or web instance): the partitions are dealt out over the
live workers under leases, a worker that stops renewing loses its partitions (and knows it by its
own clock), NOTIFY carries wake-ups and cancel requests to the partition's owner only.
Short leases (1 s, renewed every 0.2 s) keep the tests fast.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import psycopg
import pytest

from cluster.partitions import partition_of
from cluster.postgres import PostgresCoordinator, cancel_channel, fair_share
from harness.peers.postgres import psycopg_url
from runtime.protocol import NotOwner

#: How long a notification or a rebalance may take on a loaded machine (normally well under a second).
PATIENCE = 10.0
PARTITIONS = 8

Make = Callable[..., Any]


class Worker:
    """What a worker does with what reaches it: records wake-ups, cancel requests and partition changes."""

    def __init__(self) -> None:
        self.woken: list[str] = []
        self.cancelled: list[tuple[str, str]] = []
        self.gained: list[set[int]] = []
        self.lost: list[set[int]] = []
        self.changed = asyncio.Event()

    def on_wake(self, key: str) -> None:
        self.woken.append(key)
        self.changed.set()

    async def on_cancel(self, key: str, job_id: str) -> None:
        self.cancelled.append((key, job_id))
        self.changed.set()

    async def on_change(self, gained: set[int], lost: set[int]) -> None:
        if gained:
            self.gained.append(gained)
        if lost:
            self.lost.append(lost)
        self.changed.set()

    async def until(self, done: Callable[[], bool]) -> None:
        async with asyncio.timeout(PATIENCE):
            while not done():
                self.changed.clear()
                await self.changed.wait()


async def settled(coordinators: list[PostgresCoordinator], shares: list[int]) -> None:
    """Wait until the coordinators hold disjoint partitions, all of them, in these numbers, and listen
    for the wake-ups of exactly those."""
    async with asyncio.timeout(PATIENCE):
        while True:
            held = [c.ownership.held() for c in coordinators]
            if sorted(len(h) for h in held) == sorted(shares) and set().union(*held) == set(range(PARTITIONS)) \
                    and sum(len(h) for h in held) == PARTITIONS \
                    and all(c.listening == h for c, h in zip(coordinators, held, strict=True)):
                return
            await asyncio.sleep(0.05)


def key_in(partition: int) -> str:
    return next(key for n in range(10_000) if partition_of(key := f"msteams:19:{n}@thread.v2", PARTITIONS) == partition)


@pytest.fixture
def url(postgres_url: str) -> str:
    return psycopg_url(postgres_url)


@pytest.fixture
async def make(url: str) -> AsyncIterator[Make]:
    async with AsyncExitStack() as stack:

        async def make_one(**options: Any) -> PostgresCoordinator:
            options = {"partitions": PARTITIONS, "lease": 1.0, "renew": 0.2, **options}
            coordinator = PostgresCoordinator(url, **options)
            await coordinator.open()
            stack.push_async_callback(coordinator.close)
            return coordinator

        yield make_one


def test_fair_shares_add_up_and_differ_by_at_most_one() -> None:
    for workers in range(1, 20):
        names = [f"w{n:02d}" for n in range(workers)]
        shares = [fair_share(16, names, me) for me in names]
        assert sum(shares) == 16 and max(shares) - min(shares) <= 1


async def test_partitions_are_spread_over_every_live_worker_and_move_back_when_one_stops(make: Make) -> None:
    first, second, third = await make(), await make(), await make()
    workers = [Worker() for _ in range(3)]
    assert await first.lead(workers[0].on_wake, workers[0].on_cancel, on_change=workers[0].on_change) is True
    assert first.ownership.held() == set(range(PARTITIONS))  # alone: everything, before lead() returns
    assert workers[0].gained == [set(range(PARTITIONS))]
    await second.lead(workers[1].on_wake, workers[1].on_cancel, on_change=workers[1].on_change)
    await third.lead(workers[2].on_wake, workers[2].on_cancel, on_change=workers[2].on_change)
    await settled([first, second, third], [3, 3, 2])  # no worker idles
    assert workers[0].lost  # handed back above its share
    assert all(c.active for c in (first, second, third))

    await third.close()  # a graceful stop hands its partitions back at once
    await settled([first, second], [4, 4])


async def test_a_frozen_worker_loses_its_partitions_by_its_own_clock_and_they_move(make: Make, url: str) -> None:
    frozen, other = await make(), await make()
    idle = Worker()
    await frozen.lead(idle.on_wake, idle.on_cancel)
    await other.lead(idle.on_wake, idle.on_cancel)
    await settled([frozen, other], [4, 4])
    mine = frozen.ownership.held()
    key = key_in(min(mine))
    epoch = frozen.ownership.fence(key)
    assert isinstance(epoch, int)
    # Freeze it: its lease task stops renewing, its connections stay open (what SIGSTOP does).
    assert frozen._holder is not None
    frozen._holder.cancel()
    await asyncio.gather(frozen._holder, return_exceptions=True)
    await settled([other], [PARTITIONS])  # within lease + renew
    # Without a single round: its own monotonic deadline says the lease is gone.
    assert frozen.ownership.held() == set() and not frozen.active
    with pytest.raises(NotOwner):
        frozen.ownership.fence(key)
    newer = other.ownership.fence(key)
    assert isinstance(newer, int) and newer > epoch  # the new owner writes under a newer epoch
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as db:
        owners = {row[0] for row in await (await db.execute("SELECT DISTINCT owner FROM agent_partitions")).fetchall()}
    assert owners == {other.worker_id}


async def test_wake_ups_reach_the_owner_of_the_conversation_only(make: Make) -> None:
    first, second, web = await make(), await make(), await make()
    workers = {first: Worker(), second: Worker()}
    for coordinator, worker in workers.items():
        await coordinator.lead(worker.on_wake, worker.on_cancel)
    await settled([first, second], [4, 4])
    keys = [key_in(p) for p in range(PARTITIONS)]
    for key in keys:
        web.wake(key)
    for coordinator, worker in workers.items():
        mine = [k for k in keys if coordinator.ownership.owns(k)]
        await worker.until(lambda worker=worker, mine=mine: sorted(worker.woken) == sorted(mine))  # type: ignore[misc]
    await asyncio.sleep(0.3)  # nothing else arrives
    assert sorted(workers[first].woken + workers[second].woken) == sorted(keys)


async def test_cancel_requests_reach_the_owner_and_malformed_ones_are_ignored(make: Make, url: str) -> None:
    owner, web = await make(), await make()
    worker = Worker()
    await owner.lead(worker.on_wake, worker.on_cancel)
    key = key_in(3)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:  # something else on the channel
        for payload in ("not json", json.dumps({"key": "k"}), json.dumps(["k", "j"])):
            await conn.execute("SELECT pg_notify(%s, %s)", [cancel_channel(3), payload])
    await web.cancel(key, "0d73272971a7")
    await worker.until(lambda: bool(worker.cancelled))
    assert worker.cancelled == [(key, "0d73272971a7")] and worker.woken == []
    assert owner.active  # a malformed notification stops nothing


async def test_a_failing_cancel_handler_keeps_the_worker_listening(make: Make) -> None:
    owner, web = await make(), await make()
    worker = Worker()

    async def failing_cancel(key: str, job_id: str) -> None:
        await worker.on_cancel(key, job_id)
        raise RuntimeError("the runner could not cancel")

    await owner.lead(worker.on_wake, failing_cancel)
    await web.cancel("k", "j1")
    await worker.until(lambda: bool(worker.cancelled))
    web.wake("after")
    await worker.until(lambda: worker.woken == ["after"])


async def test_a_lost_lease_connection_is_reconnected_and_the_leases_renewed(make: Make, url: str) -> None:
    owner = await make(application_name="lease-test", lease=3.0)
    worker = Worker()
    await owner.lead(worker.on_wake, worker.on_cancel, on_change=worker.on_change)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'lease-test lease'")
    web = await make()
    async with asyncio.timeout(PATIENCE):  # a wake-up sent before it LISTENs again is lost (the sweep's job)
        while "after the outage" not in worker.woken:
            web.wake("after the outage")
            await asyncio.sleep(0.2)
    assert owner.ownership.held() == set(range(PARTITIONS)) and worker.lost == []


async def test_a_lost_sending_connection_is_reported_and_reconnected(make: Make, url: str) -> None:
    owner, web = await make(), await make(application_name="web-test")
    worker = Worker()
    await owner.lead(worker.on_wake, worker.on_cancel)
    assert await web.check() == "ok"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as admin:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'web-test notify'")
    assert (await web.check() or "").startswith("PostgreSQL")  # not ready while its connection is gone
    web.wake("after the outage")  # retried on a new connection
    await worker.until(lambda: worker.woken == ["after the outage"])
    assert await web.check() == "ok"  # the new connection serves readiness too
