"""APScheduler wiring: persisted schedules carry ids only, never live objects.

Every job runs through the module-level :func:`run_scheduled_job`, which looks up the live
:class:`JobRunner` (the python-telegram-bot JobQueue pattern), so a schedule stored in the
SQLAlchemy job store survives restarts and never pickles a connection or a closure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_STOPPED

from jobs.runner import JobRunner
from storage.abc import ConversationStore, JobRecord
from storage.private_files import ensure_private_file, tighten_sidecars

log = logging.getLogger(__name__)

_runner: JobRunner | None = None


async def run_scheduled_job(conversation_key: str, job_id: str) -> None:
    """The one callable APScheduler persists; resolves the live runner at run time."""
    if _runner is None:
        log.error("job %s fired with no job runner installed; recovery will run it later", job_id)
        return
    try:
        await _runner.run(conversation_key, job_id)
    except asyncio.CancelledError:  # a graceful stop: the runner handed the attempt back already
        log.info("job %s stopped by shutdown", job_id)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` job store URL (None: another database, or in memory)."""
    prefix, _, path = url.partition(":///")
    if prefix.split("+")[0] != "sqlite" or not path or path == ":memory:":
        return None
    return Path(path.split("?")[0])


class _ThreadSafeAsyncIOExecutor(AsyncIOExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Submits coroutine jobs to the loop even when called from the job-store polling thread."""

    def _do_submit_job(self, job: Any, run_times: Any) -> None:
        loop = self._eventloop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            super()._do_submit_job(job, run_times)
        else:
            loop.call_soon_threadsafe(super()._do_submit_job, job, run_times)


class _OffLoopAsyncIOScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """AsyncIOScheduler whose job-store work runs on a worker thread.

    APScheduler 3's SQLAlchemy job store is synchronous and AsyncIOScheduler polls it on the
    event loop; here each wake-up runs ``_process_jobs`` in the default executor instead, and
    only the timers and the job coroutines themselves live on the loop.
    """

    _processing = False
    _again = False

    def wakeup(self) -> None:  # called from the loop and from worker threads (add_job)
        loop = self._eventloop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wakeup_on_loop)

    def _wakeup_on_loop(self) -> None:
        if self.state == STATE_STOPPED or self._eventloop is None:
            return
        self._stop_timer()
        if self._processing:
            self._again = True
            return
        self._processing = True
        self._eventloop.run_in_executor(None, self._process_jobs).add_done_callback(self._processed)

    def _processed(self, future: asyncio.Future[float | None]) -> None:
        self._processing = False
        if future.cancelled() or self.state == STATE_STOPPED or self._eventloop is None:
            return
        wait: float | None = 1.0
        if (error := future.exception()) is not None:
            log.error("APScheduler could not read its job store (%s); retrying in 1 s", error)
        else:
            wait = future.result()
        if self._again:
            self._again, wait = False, 0
        self._start_timer(wait)

    def _create_default_executor(self) -> AsyncIOExecutor:
        return _ThreadSafeAsyncIOExecutor()


class JobScheduler:
    """Schedules job attempts on an ``AsyncIOScheduler`` backed by a SQLAlchemy job store.

    APScheduler 3's job store API is synchronous: the scheduler polls it from a worker thread
    and our own calls go through ``asyncio.to_thread``, so it never stalls the event loop.
    """

    def __init__(self, job_store_url: str, runner: JobRunner, store: ConversationStore) -> None:
        self._url = job_store_url
        self._scheduler: AsyncIOScheduler | None = None
        self._runner = runner
        self._store = store
        self._recovered: set[asyncio.Task[None]] = set()  # recovered jobs started directly
        runner.scheduler = self

    @property
    def scheduler(self) -> AsyncIOScheduler:
        if self._scheduler is None:
            raise RuntimeError("JobScheduler used before start()")
        return self._scheduler

    async def start(self) -> None:
        global _runner
        _runner = self._runner
        loop = asyncio.get_running_loop()

        def create_and_start() -> AsyncIOScheduler:
            # Creating the engine and the table is file I/O: keep it off the loop too.
            if database := sqlite_file(self._url):  # 0600 in a 0700 directory, created if missing
                ensure_private_file(database)
            scheduler = _OffLoopAsyncIOScheduler(
                jobstores={"default": SQLAlchemyJobStore(url=self._url)},
                job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
                timezone=UTC,
                event_loop=loop,
            )
            scheduler.start()
            if database:
                tighten_sidecars(database)
            return scheduler

        self._scheduler = await asyncio.to_thread(create_and_start)

    async def shutdown(self) -> None:
        global _runner
        if self._scheduler is not None and self._scheduler.running:
            scheduler = self._scheduler
            # BaseScheduler.shutdown would dispose the job store's engine on the loop. Do its
            # parts by hand: executors (they cancel asyncio futures) here, job stores on a thread.
            scheduler.state = STATE_STOPPED
            scheduler._stop_timer()
            for executor in scheduler._executors.values():
                executor.shutdown(wait=False)
            await asyncio.to_thread(lambda: [store.shutdown() for store in scheduler._jobstores.values()])
        _runner = None

    @property
    def running(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

    async def schedule(self, job: JobRecord, run_at: float | None = None) -> None:
        when = datetime.fromtimestamp(run_at or time.time(), tz=UTC)
        await asyncio.to_thread(
            self.scheduler.add_job,
            run_scheduled_job,
            trigger="date",
            run_date=when,
            args=[job.conversation_key, job.id],
            id=job.id,
            name=f"{job.tool}:{job.id}",
            replace_existing=True,
        )

    async def unschedule(self, job_id: str) -> None:
        with contextlib.suppress(JobLookupError):
            await asyncio.to_thread(self.scheduler.remove_job, job_id)

    async def is_scheduled(self, job_id: str) -> bool:
        return await asyncio.to_thread(self.scheduler.get_job, job_id) is not None

    async def recover(self) -> int:
        """Restart queued/running jobs that have no live schedule (after a crash).

        Jobs due now start at once, straight on the runner: the store is the source of truth,
        so going through the persisted schedule first would only cost a job-store write each
        (about 13 ms per job on SQLite: 13 s for 1,000 jobs). Jobs waiting for a retry are
        scheduled for their time.
        """
        count = 0
        scheduled = {job.id for job in await asyncio.to_thread(self.scheduler.get_jobs)}
        for job in await self._store.unfinished_jobs():
            if self._runner.is_live(job.id) or job.id in scheduled:
                continue
            if job.next_retry_at and job.next_retry_at > time.time():
                await self.schedule(job, run_at=job.next_retry_at)
            else:
                task = asyncio.create_task(self._runner.run(job.conversation_key, job.id), name=f"job:{job.id}")
                self._recovered.add(task)
                task.add_done_callback(self._recovered.discard)
            count += 1
        if count:
            log.info("recovered %d unfinished job(s) and scheduled them again", count)
        return count
