"""Keeps each job's card up to date in place, within Teams' rate limits.

Updates are best-effort and throttled to one per ``min_interval`` per job (Teams asks for no
more than one edit every 2 s per message): a burst of progress collapses into one trailing
update that shows the latest state, and the final state is always shown. The card's
activity id is stored on the job record, so updates carry on after a restart.

The final state may wait out that interval; the completion message must not overtake it (the
card would still show "Running ... Cancel" under "Line ... is active"). So the job runner's wake
goes through :meth:`JobCardUpdater.after_final_card`: while a conversation has a card that has
shown progress, the processor is woken (and the completion sent) once the card's final update is
out. A job that ends before its card was ever updated is not held back (its card turns final
within the interval).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from bot.approval_cards import card_for_activity
from bot.sender import ProactiveSender
from jobs.approval import AWAITING
from storage.abc import ConversationStore, JobNotFoundError, JobRecord

log = logging.getLogger(__name__)

Wake = Callable[[str], None]


class JobCardUpdater:
    def __init__(self, store: ConversationStore, sender: ProactiveSender, min_interval: float = 2.0) -> None:
        self._store = store
        self._sender = sender
        self._min_interval = min_interval
        self._last_update: dict[str, float] = {}
        self._trailing: dict[str, asyncio.Task[None]] = {}
        # job id -> conversation key: cards that have shown progress and are not final yet
        self._live: dict[str, str] = {}
        self._held: dict[str, asyncio.TimerHandle] = {}  # conversation key -> its held wake's deadline
        self._wake: Wake | None = None

    def after_final_card(self, wake: Wake) -> Wake:
        """``wake``, held back while the conversation has a live card until its final update is out
        (at most the throttle interval plus a second, should that update never come)."""
        self._wake = wake

        def wake_after_final_card(key: str) -> None:
            if key not in self._live.values() or key in self._held:
                wake(key)
                return
            loop = asyncio.get_running_loop()
            self._held[key] = loop.call_later(self._min_interval + 1.0, self._release, key)

        return wake_after_final_card

    def _release(self, key: str) -> None:
        if (deadline := self._held.pop(key, None)) is not None:
            deadline.cancel()
            if self._wake is not None:
                self._wake(key)

    async def card_posted(self, conversation_key: str, job_id: str, activity_id: str | None) -> None:
        """The outbox delivered a job's card: remember where, then show the job's current state."""
        if not activity_id:
            log.warning("the channel returned no id for the card of job %s; it cannot be updated", job_id)
            return
        try:
            job = await self._store.patch_job(conversation_key, job_id, {"card_activity_id": activity_id})
        except JobNotFoundError:
            return
        self._last_update[job_id] = time.monotonic()
        if job.status not in ("queued", AWAITING) or job.progress is not None:
            await self.job_changed(job)

    async def job_changed(self, job: JobRecord) -> None:
        """JobRunner's progress listener: called on progress, retries and the final state."""
        if job.card_activity_id is None:
            if job.finished:
                self._release(job.conversation_key)
            return  # the card is not out yet; card_posted will show the latest state
        if job.finished:
            if (pending := self._trailing.pop(job.id, None)) is not None:
                pending.cancel()
            try:
                # Even the final state waits out the per-message interval (Teams throttles edits).
                wait = self._last_update.get(job.id, 0.0) + self._min_interval - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                await self._update(job)
            finally:
                self._last_update.pop(job.id, None)
                self._live.pop(job.id, None)
                self._release(job.conversation_key)  # now the completion may follow
            return
        wait = self._last_update.get(job.id, 0.0) + self._min_interval - time.monotonic()
        if wait <= 0:
            await self._update(job)
        elif job.id not in self._trailing:
            self._trailing[job.id] = asyncio.create_task(self._update_later(job, wait))

    async def _update_later(self, job: JobRecord, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            latest = await self._store.get_job(job.conversation_key, job.id)
        finally:
            self._trailing.pop(job.id, None)
        if not latest.finished:  # the final state is shown by job_changed itself
            await self._update(latest)

    async def _update(self, job: JobRecord) -> None:
        self._last_update[job.id] = time.monotonic()
        if not job.finished and job.status != AWAITING:  # a request waiting for days holds no wake back
            self._live[job.id] = job.conversation_key
        reference = await self._store.get_reference(job.conversation_key)
        if reference is None or job.card_activity_id is None:
            return
        try:
            await self._sender.update(reference, job.card_activity_id, card_for_activity(job))
        except Exception as exc:
            log.warning("could not update the card of job %s: %s", job.id, exc)

    async def close(self) -> None:
        for key in list(self._held):
            self._release(key)
        for task in list(self._trailing.values()):
            task.cancel()
        await asyncio.gather(*self._trailing.values(), return_exceptions=True)
