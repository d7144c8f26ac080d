"""4. Job scale: N long-running jobs pending at once in one process.

Each mode runs in a fresh process (``python -m bench.jobscale --mode ours|bare --jobs N``, one
JSON line on stdout), so its resident memory is its own.

``ours``: JobRunner + JobScheduler (APScheduler, SQLAlchemy job store) + SqliteStore, a
registered long-running tool that waits until released, and the real ConversationProcessor
(offline model) with a counting sender. N job records are committed across N/10
conversations, all N scheduled to run now (concurrently, as processors of many conversations
would), and once all N are running (the runner holds them, the store says ``running``) the
resident set is read. Then every job is released: each finishes, appends its "job finished"
event, the conversation's processor runs an agent turn and the sender counts the notification.

``bare`` (the baseline): stock APScheduler ``AsyncIOScheduler`` on the same SQLAlchemy job
store with N date jobs whose coroutine waits for the same release and counts itself done.
No conversation store, no runner, no agent.

Memory per job = (RSS with all N pending - RSS before the jobs were created) / N.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import rss_bytes

_release: asyncio.Event | None = None
_done = 0
_running = 0


def _peak_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


async def bare_job(n: int) -> None:
    """The baseline's job: pending until released (the module-level callable APScheduler stores)."""
    global _done, _running
    assert _release is not None
    _running += 1
    await _release.wait()
    _running -= 1
    _done += 1


async def _wait_until(predicate: Any, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll)
    return True


async def run_bare(jobs: int, tmp: Path) -> dict[str, Any]:
    global _release
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
    from apscheduler.schedulers.asyncio import AsyncIOScheduler

    _release = asyncio.Event()
    scheduler = AsyncIOScheduler(jobstores={"default": SQLAlchemyJobStore(url=f"sqlite:///{tmp / 'jobs.sqlite3'}")},
                                 job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
                                 timezone=UTC)
    scheduler.start()
    await asyncio.sleep(0.2)
    rss0 = rss_bytes()
    began = time.monotonic()
    now = datetime.now(UTC)

    async def add(n: int) -> None:
        await asyncio.to_thread(scheduler.add_job, bare_job, trigger="date", run_date=now, args=[n], id=f"bare-{n}",
                                replace_existing=True)

    await asyncio.gather(*(add(n) for n in range(jobs)))
    scheduled = time.monotonic() - began

    async def all_running() -> bool:
        return _running >= jobs

    ok = await _wait_until(all_running, timeout=600)
    pending = time.monotonic() - began
    await asyncio.sleep(0.5)
    rss1 = rss_bytes()
    _release.set()
    release_at = time.monotonic()

    async def all_done() -> bool:
        return _done >= jobs

    await _wait_until(all_done, timeout=600)
    drained = time.monotonic() - release_at
    scheduler.shutdown(wait=False)
    return {"mode": "bare", "jobs": jobs, "all_pending": ok, "rss_before": rss0, "rss_pending": rss1,
            "rss_peak": _peak_rss(), "schedule_seconds": scheduled, "pending_seconds": pending,
            "notified": _done, "drain_seconds": drained}


async def run_ours(jobs: int, tmp: Path, per_conversation: int = 10) -> dict[str, Any]:
    global _release
    from pydantic import BaseModel

    from agent.offline_model import OfflineChatCompletionClient
    from agent.processor import ConversationProcessor, text_activity
    from agent.runner import AgentTurnRunner
    from agent.tools import turn_tools
    from jobs.context import JobContext
    from jobs.registry import JobRegistry, LongRunningTool, RetryPolicy
    from jobs.runner import JobRunner
    from jobs.scheduler import JobScheduler
    from storage.abc import ConversationRecord, InboxEvent, JobRecord, new_id
    from storage.sqlite import SqliteStore

    _release = asyncio.Event()
    release = _release

    class WaitArgs(BaseModel):
        n: int

    async def wait_for_release(ctx: JobContext, args: WaitArgs) -> dict[str, Any]:
        await release.wait()
        return {"n": args.n, "message": f"bench job {ctx.job_id} done"}

    tool = LongRunningTool(name="bench_wait", description="Waits until the benchmark releases it.",
                           args_model=WaitArgs, run=wait_for_release, timeout=3600.0,
                           retry=RetryPolicy(max_attempts=1))

    class CountingSender:
        notified = 0
        other = 0

        async def send(self, reference: dict[str, Any], activity: dict[str, Any]) -> str | None:
            if "bench job" in str(activity.get("text", "")):
                CountingSender.notified += 1
            else:
                CountingSender.other += 1
            return "1"

        async def typing(self, reference: dict[str, Any]) -> None:
            return None

    store = SqliteStore(tmp / "conversations.sqlite3")
    await store.open()
    registry = JobRegistry([tool])
    processors: list[ConversationProcessor] = []
    scheduler = JobScheduler(f"sqlite:///{tmp / 'jobs.sqlite3'}")
    job_runner = JobRunner(store, registry, lambda k: processors[0].wake(k), scheduler=scheduler)
    runner = AgentTurnRunner(OfflineChatCompletionClient(),
                             lambda scope: turn_tools(scope, registry, store, job_runner))
    processor = ConversationProcessor(store, runner, CountingSender(), welcome=lambda: text_activity("hi"),
                                      schedule_job=scheduler.schedule)
    processors.append(processor)
    await scheduler.start(job_runner.run)
    # Warm up the agent path once (imports, pydantic schemas), then take the baseline RSS.
    await store.save_reference("warmup", {"conversation": {"id": "warmup"}, "serviceUrl": "http://127.0.0.1:9/"})
    await store.append_event("warmup", InboxEvent(id="w1", kind="message", payload={"text": "my name is Warm"}))
    processor.wake("warmup")
    await processor.idle()
    await asyncio.sleep(0.2)
    rss0 = rss_bytes()

    conversations = max(1, jobs // per_conversation)
    records: list[JobRecord] = []
    for c in range(conversations):
        key = f"msteams:bench-{c}"
        await store.save_reference(key, {"conversation": {"id": f"bench-{c}"}, "serviceUrl": "http://127.0.0.1:9/",
                                         "channelId": "msteams"})
        batch = [JobRecord(id=new_id(), conversation_key=key, tool=tool.name, arguments={"n": c * per_conversation + i},
                           call_id=f"call_{c}_{i}", max_attempts=1)
                 for i in range(per_conversation if c < conversations - 1 else jobs - c * per_conversation)]
        await store.commit(ConversationRecord(key=key), new_jobs=batch)
        records.extend(batch)

    async def count_running() -> int:
        async with store.db.execute("SELECT count(*) FROM jobs WHERE status = 'running'") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    began = time.monotonic()
    await asyncio.gather(*(scheduler.schedule(job) for job in records))
    scheduled = time.monotonic() - began

    async def all_running() -> bool:
        return len(job_runner._live) >= jobs and await count_running() >= jobs

    ok = await _wait_until(all_running, timeout=900, poll=0.1)
    pending = time.monotonic() - began
    await asyncio.sleep(0.5)
    rss1 = rss_bytes()
    live = len(job_runner._live)
    release.set()
    release_at = time.monotonic()

    async def all_notified() -> bool:
        return CountingSender.notified >= jobs

    await _wait_until(all_notified, timeout=900, poll=0.1)
    drained = time.monotonic() - release_at
    await processor.idle()
    await processor.close()
    await job_runner.shutdown()
    await scheduler.shutdown()
    await store.close()
    return {"mode": "ours", "jobs": jobs, "all_pending": ok, "live": live, "rss_before": rss0, "rss_pending": rss1,
            "rss_peak": _peak_rss(), "schedule_seconds": scheduled, "pending_seconds": pending,
            "notified": CountingSender.notified, "other_messages": CountingSender.other, "drain_seconds": drained}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ours", "bare"), required=True)
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    logging.getLogger("autogen_core").setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        work = run_ours if args.mode == "ours" else run_bare
        result = asyncio.run(work(args.jobs, Path(tmp)))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
