"""A worker: starting its services, joining the workers, and following the partitions it owns.

Issue 18: every worker is active; each owns some partitions of the conversations (cluster/
deals them out under leases) and runs the inboxes, jobs and sends of those only. A worker starts,
in order: the MCP servers (their long-running tools join the job registry before recovery, so
their unfinished jobs resume), the job scheduler and the background chores (agent/housekeeping.py);
then it joins (``Coordinator.lead``). For every partition it gains it opens the partition's job
store, recovers its jobs and its conversations; for every partition it loses it stops their
running jobs and turns and closes the job store (:meth:`Worker.partitions_changed`). Wake-ups
that arrive before it has joined are held by :class:`Wakeups`: a turn must not create a job
nobody can schedule yet. One process (``LocalCoordinator``) owns the one partition there is.

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
        self._leading = False
        self._stopping = False

    @property
    def leading(self) -> bool:
        """This process has joined the workers (its services are up)."""
        return self._leading

    async def lead(self, *, wait: bool) -> bool:
        """Start the worker's services and join the workers (waiting for the coordination database if
        ``wait``; else False when it cannot be reached now)."""
        if not self._started:
            await self._start()
        if not await self._coordinator.lead(self._wakeups.wake, self._job_runner.apply_cancel, wait=wait,
                                            on_change=self.partitions_changed):
            return False
        self._leading = True
        self._wakeups.release(self._processor.wake)
        return True

    async def partitions_changed(self, gained: set[int], lost: set[int]) -> None:
        """Follow the partitions: stop the work of those lost, recover the work of those gained."""
        if self._stopping:
            return  # the services are stopping; the coordinator hands every partition back when it closes
        ownership = self._coordinator.ownership
        if lost:
            # Still held: a graceful hand-back, the jobs hand themselves back and the turns finish.
            # Gone: nothing of theirs may be written any more, so stop at once.
            graceful = bool(lost & ownership.held())

            def moving(key: str) -> bool:
                return ownership.partition(key) in lost

            await asyncio.gather(self._job_runner.abandon(moving),
                                 self._processor.release(moving, timeout=5.0 if graceful else 0.0))
            await self._scheduler.remove_partitions(lost)
        if gained:
            await self._scheduler.add_partitions(gained)
            if ownership.partitions == 1:  # one process: recovered before it serves
                await self._recover(gained)
            else:  # in the background: the lease rounds must go on meanwhile
                task = asyncio.create_task(self._recover(gained), name="recovery")
                self._chores.append(task)
                task.add_done_callback(lambda done: self._chores.remove(done) if done in self._chores else None)

    async def _recover(self, gained: set[int]) -> None:
        """Recover the jobs and conversations of partitions just gained (retried while the store fails)."""
        ownership = self._coordinator.ownership

        def taken(key: str) -> bool:
            return ownership.partition(key) in gained

        delay = 0.5
        while True:
            try:
                jobs = await self._job_runner.recover(only=taken)
                conversations = await self._processor.recover(only=taken)
                break
            except Exception as exc:
                if ownership.partitions == 1:
                    raise
                log.warning("recovering partition(s) %s failed (%s); retrying in %.1f s", sorted(gained), exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        log.info("active worker: recovered %d job(s), %d conversation(s) (partition(s) %s)", jobs, conversations,
                 ", ".join(map(str, sorted(gained))) if ownership.partitions > 1 else "all")

    def stand_by(self) -> asyncio.Task[bool]:
        """Join in the background once the coordination database answers (cancel the task to stop waiting)."""
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
        self._chores.append(asyncio.create_task(purge_periodically(self._store, self._retention_days),
                                                name="retention"))
        if self._sweep_seconds is not None:
            self._chores.append(asyncio.create_task(sweep_periodically(self._processor, self._sweep_seconds),
                                                    name="sweep"))

    async def stop(self) -> None:
        """Stop what :meth:`lead` started (nothing if it never started); running jobs are handed back.
        The partitions themselves are handed back when the coordinator closes."""
        self._stopping = True
        for task in list(self._chores):
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
    """A worker that could not join or start its services must not sit on partitions:
    stop gracefully (handing them back) and let the supervisor restart this process."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("could not start as a worker (%s); stopping so that the other workers take over",
                 task.exception(), exc_info=task.exception())
    os.kill(os.getpid(), signal.SIGTERM)
