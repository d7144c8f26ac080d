"""The active worker's periodic chores: retention (stores without server-side TTL) and the sweep
for work a lost wake-up left behind. agent/worker.py starts them and cancels them on stop."""

from __future__ import annotations

import asyncio
import logging
import time

from agent.processor import ConversationProcessor
from runtime import metrics
from storage.abc import ConversationStore

log = logging.getLogger(__name__)


async def purge_periodically(store: ConversationStore, ttl_days: int, every: float = 3600.0) -> None:
    """Retention for stores without server-side TTL (SQLite): hourly, drop what expired."""
    while True:
        try:
            removed = await store.purge_expired(time.time() - ttl_days * 86400)
            if removed:
                log.info("retention: removed %d item(s) untouched for %d days", removed, ttl_days)
        except Exception:
            log.exception("retention purge failed; it runs again in an hour")
        await asyncio.sleep(every)


async def sweep_periodically(processor: ConversationProcessor, every: float) -> None:
    """The active worker's safety net for lost wake-ups (NOTIFY is fire-and-forget): look for
    conversations with pending events or unsent messages every ``every`` seconds."""
    while True:
        await asyncio.sleep(every)
        try:
            found = await processor.recover(sweep=True)
            if found:
                metrics.WAKEUPS.labels("sweep").inc(found)
        except Exception as exc:
            log.warning("looking for missed work failed (%s); looking again in %.0f s", exc, every)
