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

from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from jobs.runner import JobRunner
from storage.abc import ConversationStore, JobRecord

log = logging.getLogger(__name__)

_runner: JobRunner | None = None


async def run_scheduled_job(conversation_key: str, job_id: str) -> None:
    """The one callable APScheduler persists; resolves the live runner at run time."""
    if _runner is None:
        log.error("job %s fired with no job runner installed; recovery will run it later", job_id)
        return
    await _runner.run(conversation_key, job_id)


class JobScheduler:
    """Schedules job attempts on an ``AsyncIOScheduler`` backed by a SQLAlchemy job store.

    APScheduler 3's job store API is synchronous; the calls we make from our own coroutines
    go through a worker thread so they never stall the event loop.
    """

    def __init__(self, job_store_url: str, runner: JobRunner, store: ConversationStore) -> None:
        self._scheduler = AsyncIOScheduler(
            jobstores={"default": SQLAlchemyJobStore(url=job_store_url)},
            job_defaults={"misfire_grace_time": None, "coalesce": True, "max_instances": 1},
            timezone=UTC,
        )
        self._runner = runner
        self._store = store
        runner.scheduler = self

    async def start(self) -> None:
        global _runner
        _runner = self._runner
        # Start-up only: creates the job store's table synchronously, before we take traffic.
        self._scheduler.start()

    async def shutdown(self) -> None:
        global _runner
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
        _runner = None

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    async def schedule(self, job: JobRecord, run_at: float | None = None) -> None:
        when = datetime.fromtimestamp(run_at or time.time(), tz=UTC)
        await asyncio.to_thread(
            self._scheduler.add_job,
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
            await asyncio.to_thread(self._scheduler.remove_job, job_id)

    async def is_scheduled(self, job_id: str) -> bool:
        return await asyncio.to_thread(self._scheduler.get_job, job_id) is not None

    async def recover(self) -> int:
        """Re-schedule queued/running jobs that have no live schedule (after a crash)."""
        count = 0
        for job in await self._store.unfinished_jobs():
            if self._runner.is_live(job.id) or await self.is_scheduled(job.id):
                continue
            await self.schedule(job, run_at=job.next_retry_at)
            count += 1
        if count:
            log.info("recovered %d unfinished job(s) and scheduled them again", count)
        return count
