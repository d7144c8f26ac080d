"""JobRunner with the real APScheduler (SQLAlchemy job store on SQLite) and the memory store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from agent.tools import describe_job
from jobs.context import JobContext
from jobs.registry import JobRegistry, LongRunningTool, RetryPolicy
from jobs.runner import MAX_INTERRUPTIONS, JobRunner
from jobs.scheduler import JobScheduler
from storage.abc import JobRecord
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "emulator:conv-1"


class NoArgs(BaseModel):
    pass


class Harness:
    def __init__(self, store: MemoryStore, runner: JobRunner, scheduler: JobScheduler, woken: list[str]) -> None:
        self.store, self.runner, self.scheduler, self.woken = store, runner, scheduler, woken

    async def submit(self, tool: str) -> JobRecord:
        job = JobRecord(id=f"job-{tool}", conversation_key=KEY, tool=tool, arguments={}, max_attempts=3)
        await add_job(self.store, job)
        await self.scheduler.schedule(job)
        return job

    async def until(self, job_id: str, predicate: Any, timeout: float = 10.0) -> JobRecord:
        deadline = time.monotonic() + timeout
        while True:
            job = await self.store.get_job(KEY, job_id)
            if predicate(job):
                return job
            assert time.monotonic() < deadline, f"job stuck: {job}"
            await asyncio.sleep(0.02)


def flaky_tool(failures: int) -> tuple[LongRunningTool, list[int]]:
    calls: list[int] = []

    async def run(ctx: JobContext, args: NoArgs) -> dict[str, Any]:
        calls.append(ctx.attempt)
        if len(calls) <= failures:
            raise ConnectionError(f"carrier system unavailable (call {len(calls)})")
        return {"message": "done"}

    policy = RetryPolicy(max_attempts=3, initial_delay=0.3, multiplier=2, jitter=0.1)
    return LongRunningTool("flaky", "fails then works", NoArgs, run, timeout=5, retry=policy), calls


async def sleepy(ctx: JobContext, args: NoArgs) -> dict[str, Any]:
    await asyncio.sleep(30)  # ignores its context on purpose
    return {}


async def polite(ctx: JobContext, args: NoArgs) -> dict[str, Any]:
    for step in range(100):
        await ctx.report_progress(step / 100, f"step {step}")
        await ctx.sleep(0.05)
    return {}


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = MemoryStore()
    woken: list[str] = []
    tool, _ = flaky_tool(2)
    registry = JobRegistry([
        tool,
        LongRunningTool("sleepy", "times out", NoArgs, sleepy, timeout=0.3, retry=RetryPolicy(max_attempts=1)),
        LongRunningTool("polite", "checks for cancellation", NoArgs, polite, timeout=30),
    ])
    scheduler = JobScheduler(f"sqlite:///{tmp_path / 'jobs.sqlite3'}")
    runner = JobRunner(store, registry, woken.append, scheduler=scheduler)
    await scheduler.start(runner.run)
    yield Harness(store, runner, scheduler, woken)
    await scheduler.shutdown()


async def test_fails_twice_then_succeeds_with_retries_visible(harness: Harness) -> None:
    await harness.submit("flaky")
    retrying = await harness.until("job-flaky", lambda j: j.status == "queued" and j.next_retry_at)
    assert retrying.attempt == 1 and "carrier system unavailable" in (retrying.error or "")
    assert "attempt 1 of 3" in describe_job(retrying) and "retrying in" in describe_job(retrying)
    second = await harness.until("job-flaky", lambda j: j.attempt == 2 and j.status == "queued")
    assert second.next_retry_at and second.next_retry_at - time.time() > 0.3  # backoff grew
    done = await harness.until("job-flaky", lambda j: j.finished)
    assert (done.status, done.attempt, done.result) == ("succeeded", 3, {"message": "done"})
    event = await harness.store.get_event(KEY, "job:job-flaky")
    assert event is not None and event.payload["status"] == "succeeded"
    assert harness.woken == [KEY]


async def test_a_timeout_fails_the_job_and_is_announced(harness: Harness) -> None:
    await harness.submit("sleepy")
    job = await harness.until("job-sleepy", lambda j: j.finished)
    assert job.status == "failed" and "timed out after 0.3 s" in (job.error or "")
    [event] = await harness.store.pending_events(KEY)
    assert event.payload["is_error"] and "timed out" in event.payload["content"]


async def test_cancel_a_running_job_through_its_context(harness: Harness) -> None:
    await harness.submit("polite")
    await harness.until("job-polite", lambda j: j.status == "running" and (j.progress or 0) > 0)
    requested = (await harness.runner.cancel(KEY, "job-polite")).job
    assert requested.cancel_requested
    job = await harness.until("job-polite", lambda j: j.finished)
    assert job.status == "cancelled" and (job.progress or 0) < 1
    assert (await harness.store.pending_events(KEY))[0].payload["status"] == "cancelled"


async def test_cancel_a_job_that_ignores_its_context(harness: Harness) -> None:
    job = JobRecord(id="job-stubborn", conversation_key=KEY, tool="sleepy", arguments={})
    await add_job(harness.store, job)
    task = asyncio.create_task(harness.runner.run(KEY, job.id))
    await harness.until(job.id, lambda j: j.status == "running")
    await harness.runner.cancel(KEY, job.id)
    await asyncio.wait_for(task, 2)
    assert (await harness.store.get_job(KEY, job.id)).status == "cancelled"


async def test_cancel_a_queued_job_removes_its_schedule(harness: Harness) -> None:
    job = JobRecord(id="job-later", conversation_key=KEY, tool="polite", arguments={})
    await add_job(harness.store, job)
    await harness.scheduler.schedule(job, run_at=time.time() + 60)
    assert await harness.scheduler.is_scheduled(job.id)
    cancelled = (await harness.runner.cancel(KEY, job.id)).job
    assert cancelled.status == "cancelled"
    assert not await harness.scheduler.is_scheduled(job.id)
    again = await harness.runner.cancel(KEY, job.id)  # a second cancel is harmless
    assert again.already_finished and again.message() == "Job `job-later` was already cancelled."


async def test_unknown_tool_fails_cleanly(harness: Harness) -> None:
    await harness.submit("vanished")
    job = await harness.until("job-vanished", lambda j: j.finished)
    assert job.status == "failed" and "no long-running tool named 'vanished'" in (job.error or "")


async def test_recovery_reschedules_unfinished_jobs_once(harness: Harness) -> None:
    orphan = JobRecord(id="job-orphan", conversation_key=KEY, tool="polite", arguments={}, status="running",
                       attempt=1, max_attempts=3)
    await add_job(harness.store, orphan)  # as a crash mid-run leaves it: no live schedule
    assert await harness.runner.recover() == 1
    await harness.runner.recover()  # a second pass must not make it run twice
    done = await harness.until("job-orphan", lambda j: j.finished)
    await asyncio.sleep(0.2)
    done = await harness.store.get_job(KEY, "job-orphan")
    # The interrupted attempt runs again under the same number: a crash is not the tool's failure.
    assert (done.status, done.attempt, done.interruptions) == ("succeeded", 1, 1)


def test_backoff_grows_exponentially_within_jitter() -> None:
    policy = RetryPolicy(initial_delay=1, multiplier=2, max_delay=5, jitter=0.2)
    for attempt, base in [(1, 1), (2, 2), (3, 4), (4, 5), (9, 5)]:
        delays = [policy.delay(attempt) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len(set(delays)) > 1  # jitter spreads retries


async def test_a_job_that_keeps_dying_with_the_process_is_given_up(harness: Harness) -> None:
    poison = JobRecord(id="job-poison", conversation_key=KEY, tool="polite", arguments={}, status="running",
                       attempt=1, max_attempts=3, interruptions=MAX_INTERRUPTIONS)
    await add_job(harness.store, poison)
    await harness.runner.recover()
    job = await harness.until("job-poison", lambda j: j.finished)
    assert job.status == "failed" and f"stopped during this job {MAX_INTERRUPTIONS + 1} times" in (job.error or "")


async def test_graceful_shutdown_hands_the_attempt_back(harness: Harness) -> None:
    job = JobRecord(id="job-stopped", conversation_key=KEY, tool="polite", arguments={})
    await add_job(harness.store, job)
    task = asyncio.create_task(harness.runner.run(KEY, job.id))
    await harness.until(job.id, lambda j: j.status == "running")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stopped = await harness.store.get_job(KEY, job.id)
    assert (stopped.status, stopped.attempt) == ("queued", 0)
