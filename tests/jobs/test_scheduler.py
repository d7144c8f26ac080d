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

from jobs.scheduler import JobScheduler, run_scheduled_job

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
