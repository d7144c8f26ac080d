"""jobs/scheduler.py: a fired schedule runs on the runner of the scheduler that fired it, and
schedules stored by earlier releases (``jobs.scheduler:run_scheduled_job``) still run."""

from __future__ import annotations

import asyncio
import pickle
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

from apscheduler.job import Job
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger

from cluster.partitions import Ownership
from jobs.scheduler import JobScheduler, run_scheduled_job
from storage.abc import JobRecord

#: The textual reference deployed job stores hold: it must keep resolving.
STORED_REFERENCE = "jobs.scheduler:run_scheduled_job"


def store_a_job_as_an_earlier_release_did(url: str, key: str, job_id: str) -> None:
    """Write the job straight into the job store, as APScheduler persisted it then."""
    scheduler = BackgroundScheduler(timezone=UTC)  # never started: the job's owner, for the store's API
    store = SQLAlchemyJobStore(url=url)
    store.start(scheduler, "default")
    now = datetime.now(UTC)
    store.add_job(Job(scheduler, id=job_id, func=STORED_REFERENCE, args=[key, job_id], kwargs={},
                      trigger=DateTrigger(now, timezone=UTC), executor="default", name=f"activate_new_line:{job_id}",
                      misfire_grace_time=None, coalesce=True, max_instances=1, next_run_time=now))
    store.shutdown()


async def test_a_job_stored_with_the_old_reference_still_runs(tmp_path: Path) -> None:
    database = tmp_path / "jobs.sqlite3"
    url = f"sqlite:///{database}"
    await asyncio.to_thread(store_a_job_as_an_earlier_release_did, url, "emulator:c1", "abc123def456")
    def stored_reference() -> str:
        [(state,)] = sqlite3.connect(database).execute("select job_state from apscheduler_jobs").fetchall()
        return str(pickle.loads(state)["func"])

    assert await asyncio.to_thread(stored_reference) == STORED_REFERENCE

    ran: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def run(key: str, job_id: str) -> None:
        ran.append((key, job_id))
        done.set()

    scheduler = JobScheduler(url)
    await scheduler.start(run)
    try:
        await asyncio.wait_for(done.wait(), timeout=10)
    finally:
        await scheduler.shutdown()
    assert ran == [("emulator:c1", "abc123def456")]


async def test_two_schedulers_each_run_their_own_jobs(tmp_path: Path) -> None:
    seen: dict[str, list[str]] = {"a": [], "b": []}
    done = {"a": asyncio.Event(), "b": asyncio.Event()}
    schedulers = {}
    for name in ("a", "b"):
        async def run(key: str, job_id: str, name: str = name) -> None:
            seen[name].append(job_id)
            done[name].set()

        schedulers[name] = JobScheduler(f"sqlite:///{tmp_path / name}.sqlite3")
        await schedulers[name].start(run)
    try:
        for name, scheduler in schedulers.items():
            await asyncio.to_thread(scheduler.scheduler.add_job, run_scheduled_job, trigger="date",
                                    run_date=datetime.now(UTC), args=["k", f"job-{name}"], id=f"job-{name}")
        await asyncio.wait_for(asyncio.gather(done["a"].wait(), done["b"].wait()), timeout=10)
    finally:
        for scheduler in schedulers.values():
            await scheduler.shutdown()
    assert seen == {"a": ["job-a"], "b": ["job-b"]}


async def test_a_direct_call_outside_a_scheduler_runs_nothing() -> None:
    await run_scheduled_job("k", "j")  # logs an error; recovery runs the job later


async def test_each_partition_has_its_own_job_store_which_fires_only_while_its_lease_holds(tmp_path: Path) -> None:
    """Issue 18: a schedule goes into its conversation's partition's table; a partition whose lease ran
    out fires nothing (and deletes nothing) even before its store is removed; the new owner's fires."""
    clock = [100.0]
    ownership = Ownership(4, clock=lambda: clock[0])
    keys = {p: next(k for n in range(1000) if ownership.partition(k := f"msteams:{n}") == p) for p in range(4)}
    ownership.grant(1, epoch=7, deadline=200.0)
    ownership.grant(2, epoch=8, deadline=150.0)
    fired: list[str] = []
    seen = asyncio.Event()

    async def run(key: str, job_id: str) -> None:
        fired.append(job_id)
        seen.set()

    url = f"sqlite:///{tmp_path / 'jobs.sqlite3'}"
    scheduler = JobScheduler(url, partitions=ownership)
    await scheduler.start(run)
    try:
        await scheduler.add_partitions({1, 2})
        clock[0] = 160.0  # partition 2's lease ran out (its store is still registered)
        for p in (1, 2):
            await scheduler.schedule(JobRecord(id=f"job-{p}", conversation_key=keys[p], tool="t", arguments={}))
        await asyncio.wait_for(seen.wait(), timeout=10)
        await asyncio.sleep(0.5)
        assert fired == ["job-1"]
        def query(sql: str) -> list[tuple[str, ...]]:
            return sqlite3.connect(tmp_path / "jobs.sqlite3").execute(sql).fetchall()

        tables = {row[0] for row in await asyncio.to_thread(query, "select name from sqlite_master where type='table'")}
        assert {"apscheduler_jobs_p1", "apscheduler_jobs_p2"} <= tables and "apscheduler_jobs" not in tables
        [(left,)] = await asyncio.to_thread(query, "select id from apscheduler_jobs_p2")
        assert left == "job-2"  # kept for the partition's next owner
        await scheduler.remove_partitions({2})
    finally:
        await scheduler.shutdown()

    seen.clear()
    successor = Ownership(4, clock=lambda: clock[0])
    successor.grant(2, epoch=9, deadline=1000.0)
    other = JobScheduler(url, partitions=successor)
    await other.start(run)
    try:
        await other.add_partitions({2})
        await asyncio.wait_for(seen.wait(), timeout=10)
    finally:
        await other.shutdown()
    assert fired == ["job-1", "job-2"]
