"""APScheduler wiring: the timers of job attempts. Persisted schedules carry ids only, never live objects.

Every schedule names the module-level :func:`run_scheduled_job` (the textual reference
``jobs.scheduler:run_scheduled_job``, which deployed job stores hold: keep it). When a schedule
fires, the executor of the scheduler that fired it hands that call its scheduler's ``run``
(the job runner's) through a context variable, so a schedule stored in the SQLAlchemy job store
survives restarts, never pickles a connection or a closure, and no module global holds a runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from apscheduler.executors.asyncio import AsyncIOExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.schedulers.base import STATE_STOPPED

from jobs import approval
from storage.abc import JobRecord
from storage.private_files import ensure_private_file, tighten_sidecars

log = logging.getLogger(__name__)

#: Runs one job attempt: ``JobRunner.run(conversation_key, job_id)``.
RunJob = Callable[[str, str], Awaitable[None]]

#: The ``run`` of the scheduler whose executor started this job (set in the job task's context).
_firing: ContextVar[RunJob | None] = ContextVar("firing_scheduler_run", default=None)


async def run_scheduled_job(conversation_key: str, job_id: str) -> None:
    """The one callable APScheduler persists; runs the job on the runner of the scheduler that fired it."""
    run = _firing.get()
    if run is None:
        log.error("job %s fired outside a started JobScheduler; recovery will run it later", job_id)
        return
    try:
        await run(conversation_key, job_id)
    except asyncio.CancelledError:  # a graceful stop: the runner handed the attempt back already
        log.info("job %s stopped by shutdown", job_id)


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///<path>`` job store URL (None: another database, or in memory)."""
    prefix, _, path = url.partition(":///")
    if prefix.split("+")[0] != "sqlite" or not path or path == ":memory:":
        return None
    return Path(path.split("?")[0])


class _ThreadSafeAsyncIOExecutor(AsyncIOExecutor):  # type: ignore[misc]  # APScheduler 3 is untyped
    """Submits coroutine jobs to the loop even when called from the job-store polling thread, each
    job's task started with ``run`` in its context (for :func:`run_scheduled_job`)."""

    def __init__(self, run: RunJob) -> None:
        super().__init__()
        self._run = run

    def _do_submit_job(self, job: Any, run_times: Any) -> None:
        loop = self._eventloop
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._submit_on_loop(job, run_times)
        else:
            loop.call_soon_threadsafe(self._submit_on_loop, job, run_times)

    def _submit_on_loop(self, job: Any, run_times: Any) -> None:
        token = _firing.set(self._run)  # the job's task copies the context when it is created
        try:
            super()._do_submit_job(job, run_times)
        finally:
            _firing.reset(token)


class _OffLoopAsyncIOScheduler(AsyncIOScheduler):  # type: ignore[misc]
    """AsyncIOScheduler whose job-store work runs on a worker thread.

    APScheduler 3's SQLAlchemy job store is synchronous and AsyncIOScheduler polls it on the
    event loop; here each wake-up runs ``_process_jobs`` in the default executor instead, and
    only the timers and the job coroutines themselves live on the loop.
    """

    _processing = False
    _again = False

    def __init__(self, run: RunJob, **options: Any) -> None:
        self._run = run  # before BaseScheduler.__init__: start() creates the executor from it
        super().__init__(**options)

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
        return _ThreadSafeAsyncIOExecutor(self._run)


class JobScheduler:
    """Schedules job attempts on an ``AsyncIOScheduler`` backed by a SQLAlchemy job store.

    APScheduler 3's job store API is synchronous: the scheduler polls it from a worker thread
    and our own calls go through ``asyncio.to_thread``, so it never stalls the event loop.
    Built before the job runner (which schedules its retries here); :meth:`start` is given the
    runner's ``run``, which every attempt that fires calls.
    """

    def __init__(self, job_store_url: str) -> None:
        self._url = job_store_url
        self._scheduler: AsyncIOScheduler | None = None

    @property
    def scheduler(self) -> AsyncIOScheduler:
        if self._scheduler is None:
            raise RuntimeError("JobScheduler used before start()")
        return self._scheduler

    async def start(self, run: RunJob) -> None:
        """Open the job store and start firing: each due schedule calls ``run(conversation_key, job_id)``."""
        loop = asyncio.get_running_loop()

        def create_and_start() -> AsyncIOScheduler:
            # Creating the engine and the table is file I/O: keep it off the loop too.
            if database := sqlite_file(self._url):  # 0600 in a 0700 directory, created if missing
                ensure_private_file(database)
            scheduler = _OffLoopAsyncIOScheduler(
                run,
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
        if self._scheduler is not None and self._scheduler.running:
            scheduler = self._scheduler
            # BaseScheduler.shutdown would dispose the job store's engine on the loop. Do its
            # parts by hand: executors (they cancel asyncio futures) here, job stores on a thread.
            scheduler.state = STATE_STOPPED
            scheduler._stop_timer()
            for executor in scheduler._executors.values():
                executor.shutdown(wait=False)
            await asyncio.to_thread(lambda: [store.shutdown() for store in scheduler._jobstores.values()])

    @property
    def running(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

    async def schedule(self, job: JobRecord, run_at: float | None = None) -> None:
        """Run the job's next attempt at ``run_at`` (now by default). A job awaiting approval gets its
        expiry timer instead (issue 16: the same entry point, under ``expiry_timer_id``); a decided one
        loses that timer."""
        timer_id = job.id
        if job.status == approval.AWAITING:
            timer_id, run_at = approval.expiry_timer_id(job.id), approval.expires_at(job)
        elif job.approval is not None:
            await self.unschedule(approval.expiry_timer_id(job.id))
        when = datetime.fromtimestamp(run_at or time.time(), tz=UTC)
        await asyncio.to_thread(
            self.scheduler.add_job,
            run_scheduled_job,
            trigger="date",
            run_date=when,
            args=[job.conversation_key, job.id],
            id=timer_id,
            name=f"{job.tool}:{timer_id}",
            replace_existing=True,
        )

    async def unschedule(self, job_id: str) -> None:
        with contextlib.suppress(JobLookupError):
            await asyncio.to_thread(self.scheduler.remove_job, job_id)

    async def is_scheduled(self, job_id: str) -> bool:
        return await asyncio.to_thread(self.scheduler.get_job, job_id) is not None

    async def scheduled_ids(self) -> set[str]:
        """The ids of the jobs that have a schedule (waiting to fire)."""
        return {job.id for job in await asyncio.to_thread(self.scheduler.get_jobs)}
