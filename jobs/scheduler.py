"""APScheduler wiring: the timers of job attempts. Persisted schedules carry ids only, never live objects.

Every schedule names the module-level :func:`run_scheduled_job` (the textual reference
``jobs.scheduler:run_scheduled_job``, which deployed job stores hold: keep it). When a schedule
fires, the executor of the scheduler that fired it hands that call its scheduler's ``run``
(the job runner's) through a context variable, so a schedule stored in the SQLAlchemy job store
survives restarts, never pickles a connection or a closure, and no module global holds a runner.

Issue 18, many workers: APScheduler 3 must never run two schedulers on one job store, so on a
cluster every partition of the conversations has its own job store (its own table,
``apscheduler_jobs_p<n>``), added to this worker's scheduler when it takes the partition and
removed when it gives it up. Each of those stores also stops reading and writing the moment the
partition's lease runs out by this process's monotonic clock (:class:`_PartitionJobStore`), so a
worker that wakes up from SIGSTOP cannot fire or delete a schedule of a partition it lost.
One process (SQLite, ``make run``) keeps the single default store.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

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


class Partitions(Protocol):
    """Which partitions this worker holds (cluster.Ownership)."""

    def partition(self, key: str) -> int: ...

    def holds(self, partition: int) -> bool: ...


def partition_alias(partition: int) -> str:
    return f"p{partition}"


class _PartitionJobStore(SQLAlchemyJobStore):  # type: ignore[misc]  # APScheduler 3 is untyped
    """One partition's job store; reads nothing due and writes nothing once the partition's lease is gone."""

    def __init__(self, url: str, partition: int, partitions: Partitions) -> None:
        super().__init__(url=url, tablename=f"apscheduler_jobs_p{partition}")
        self._held = functools.partial(partitions.holds, partition)

    def get_due_jobs(self, now: Any) -> Any:
        return super().get_due_jobs(now) if self._held() else []

    def get_next_run_time(self) -> Any:
        return super().get_next_run_time() if self._held() else None

    def update_job(self, job: Any) -> None:
        if self._held():
            super().update_job(job)

    def remove_job(self, job_id: str) -> None:
        if not self._held():
            raise JobLookupError(job_id)  # "not here": a lookup over every store goes on to the next
        super().remove_job(job_id)

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

    def __init__(self, job_store_url: str, *, partitions: Partitions | None = None) -> None:
        """``partitions``: a job store per partition, added as this worker takes them (a cluster);
        None: the one default job store (one process)."""
        self._url = job_store_url
        self._partitions = partitions
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
            # A cluster's default store is APScheduler's in-memory one, which nothing uses.
            stores = {} if self._partitions is not None else {"default": SQLAlchemyJobStore(url=self._url)}
            scheduler = _OffLoopAsyncIOScheduler(
                run,
                jobstores=stores,
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

    async def add_partitions(self, partitions: set[int]) -> None:
        """This worker took these partitions: open their job stores (their schedules fire here from now on)."""
        if self._partitions is None:
            return
        owned = self._partitions
        scheduler = self.scheduler

        def add() -> None:
            for partition in sorted(partitions):
                if partition_alias(partition) not in scheduler._jobstores:
                    scheduler.add_jobstore(_PartitionJobStore(self._url, partition, owned), partition_alias(partition))

        await asyncio.to_thread(add)

    async def remove_partitions(self, partitions: set[int]) -> None:
        """This worker gave these partitions up: close their job stores (their rows stay for the new owner)."""
        if self._partitions is None or self._scheduler is None:
            return
        scheduler = self._scheduler

        def remove() -> None:
            for partition in sorted(partitions):
                with contextlib.suppress(KeyError):
                    scheduler.remove_jobstore(partition_alias(partition), shutdown=True)

        await asyncio.to_thread(remove)

    def _store_of(self, conversation_key: str) -> str:
        if self._partitions is None:
            return "default"
        return partition_alias(self._partitions.partition(conversation_key))

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
            jobstore=self._store_of(job.conversation_key),
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
