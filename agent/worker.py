"""The active worker: taking the role (at once, or as a standby), starting and stopping its services.

Only one process at a time runs inboxes and jobs (cluster/ elects it). When this process becomes
that worker it starts, in order: the MCP servers (their long-running tools join the job registry
before recovery, so their unfinished jobs resume), the job scheduler, job recovery, inbox
recovery, and the background chores (agent/housekeeping.py). Wake-ups that arrive meanwhile
(the lock is ours before the scheduler runs) are held by :class:`Wakeups` until all of that is up:
a turn must not create a job nobody can schedule yet.

It lives in agent/ rather than cluster/ because it drives the agent's processor and the jobs:
cluster/ stays below both (it imports nothing but runtime/).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Protocol

from agent.housekeeping import purge_periodically, sweep_periodically
from agent.mcp import McpHub
from agent.processor import ConversationProcessor
from cluster import Coordinator, OnWake
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from jobs.scheduler import JobScheduler
from runtime.lifecycle import naming
from storage.abc import ConversationStore

log = logging.getLogger(__name__)


class Closes(Protocol):
    async def close(self) -> None: ...


class Wakeups:
    """Where this process's wake-ups go (the coordinator's and the finished jobs'): held until the
    worker's services are up, then straight to the processor."""

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._to: OnWake | None = None

    def wake(self, key: str) -> None:
        if self._to is None:
            self._held.add(key)
        else:
            self._to(key)

    def release(self, to: OnWake) -> None:
        """The services are up: deliver what was held, and from now on every wake-up, to ``to``."""
        self._to = to
        held, self._held = self._held, set()
        for key in held:
            to(key)


class Worker:
    def __init__(self, coordinator: Coordinator, wakeups: Wakeups, processor: ConversationProcessor,
                 job_runner: JobRunner, scheduler: JobScheduler, registry: JobRegistry, mcp_hub: McpHub,
                 card_updater: Closes, store: ConversationStore, *, retention_days: int,
                 sweep_seconds: float | None) -> None:
        """``sweep_seconds``: how often to look for work a lost wake-up left (None: wake-ups cannot
        be lost, one process); ``retention_days``: what the hourly purge drops."""
        self._coordinator = coordinator
        self._wakeups = wakeups
        self._processor = processor
        self._job_runner = job_runner
        self._scheduler = scheduler
        self._registry = registry
        self._mcp_hub = mcp_hub
        self._card_updater = card_updater
        self._store = store
        self._retention_days = retention_days
        self._sweep_seconds = sweep_seconds
        self._chores: list[asyncio.Task[None]] = []
        self._started = False

    @property
    def leading(self) -> bool:
        """This process is the active worker and has started (or is starting) its services."""
        return self._started

    async def lead(self, *, wait: bool) -> bool:
        """Become the active worker (waiting for it if ``wait``; else False when another worker is)
        and start the worker's services."""
        if not await self._coordinator.lead(self._wakeups.wake, self._job_runner.apply_cancel, wait=wait):
            return False
        await self._start()
        self._wakeups.release(self._processor.wake)
        return True

    def stand_by(self) -> asyncio.Task[bool]:
        """Wait, in the background, to take over from the active worker (cancel the task to stop waiting)."""
        waiting = asyncio.create_task(self.lead(wait=True), name="standby")
        waiting.add_done_callback(_stop_if_takeover_failed)
        return waiting

    async def _start(self) -> None:
        self._started = True
        await self._mcp_hub.start()
        for tool in self._mcp_hub.long_running_tools():
            self._registry.register(tool)  # before recovery: their unfinished jobs resume
        async with naming("the job store", "JOB_STORE_URL (unset: SQLite under DATA_DIR)"):
            await self._scheduler.start(self._job_runner.run)
        recovered_jobs = await self._job_runner.recover()
        recovered_conversations = await self._processor.recover()
        log.info("active worker: recovered %d job(s), %d conversation(s)", recovered_jobs, recovered_conversations)
        self._chores.append(asyncio.create_task(purge_periodically(self._store, self._retention_days),
                                                name="retention"))
        if self._sweep_seconds is not None:
            self._chores.append(asyncio.create_task(sweep_periodically(self._processor, self._sweep_seconds),
                                                    name="sweep"))

    async def stop(self) -> None:
        """Stop what :meth:`lead` started (nothing if it never became the active worker); running jobs
        are handed back. The role itself is given up when the coordinator closes."""
        for task in self._chores:
            task.cancel()
        await asyncio.gather(*self._chores, return_exceptions=True)
        if not self._started:
            return
        await self._processor.close()
        await self._job_runner.shutdown()
        await self._card_updater.close()
        await self._mcp_hub.stop()
        await self._scheduler.shutdown()


def _stop_if_takeover_failed(task: asyncio.Task[bool]) -> None:
    """A standby that won the lock but could not start its services must not sit on the lock:
    stop gracefully (releasing it) and let the supervisor restart this process."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("could not take over as the active worker (%s); stopping so that another worker can",
                 task.exception(), exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)
