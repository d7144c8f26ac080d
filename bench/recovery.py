"""5. Recovery time: SIGKILL the real app with N jobs in flight, restart, time until all run again.

The bot runs as a process with ``ACTIVATE_LINE_SECONDS`` long enough that no job ends during
the benchmark. Users in many conversations ask it to activate N lines; once the store says all
N jobs are ``running``, the process is SIGKILLed and started again on the same ``DATA_DIR``.
Recovery is the time from the restart (just before the process is spawned) until every job is
``running`` again with one more interruption recorded (the runner's mark for an attempt
resumed after a crash), polled in the store every 25 ms from this process (read-only SQLite).

Baseline: the same app started on an empty ``DATA_DIR`` (spawn to ``/healthz``), the floor
any restart pays before it can recover anything.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Progress, SignallingConnector, env_for_bot, post_until_acknowledged
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess

POLL = 0.025


def _counts(db_path: Path) -> tuple[int, int, int]:
    """(jobs, running, running-after-an-interruption)."""
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
            row = db.execute(
                "SELECT count(*), sum(status = 'running'), "
                "sum(status = 'running' AND json_extract(doc, '$.interruptions') >= 1) FROM jobs").fetchone()
    except sqlite3.Error:
        return 0, 0, 0
    return int(row[0] or 0), int(row[1] or 0), int(row[2] or 0)


async def _post_all(url: str, service_url: str, jobs: int, conversations: int, concurrency: int = 16) -> int:
    conv_ids = [new_conversation_id("recover") for _ in range(conversations)]
    gate = asyncio.Semaphore(concurrency)
    acknowledged = 0

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal acknowledged
        activity = message(f"activate line 555-{n % 10000:04d}", conversation_id=conv_ids[n % conversations],
                           service_url=service_url)
        async with gate:
            ok = await post_until_acknowledged(session, url, activity)  # not `+= await`: it loses increments
        acknowledged += ok

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(post(session, n) for n in range(jobs)))
    return acknowledged


def run(jobs: int, conversations: int, progress: Progress, weight: float, cold_starts: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs": jobs, "conversations": conversations}
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp, SignallingConnector() as connector:
        # Baseline: a cold start with nothing to recover.
        progress.set("recovery: cold start baseline")
        cold = []
        for attempt in range(cold_starts):
            empty = BotProcess(Path(tmp) / f"empty-{attempt}", env=env_for_bot())
            began = time.monotonic()
            empty.start(timeout=60)
            cold.append(time.monotonic() - began)
            empty.kill()
        out["cold_start"] = sorted(cold)[len(cold) // 2]  # the median

        bot = BotProcess(Path(tmp) / "ours", env=env_for_bot(ACTIVATE_LINE_SECONDS="3600"))
        db = bot.data_dir / "conversations.sqlite3"
        try:
            bot.start(timeout=60)
            progress.set(f"recovery: starting {jobs:,} jobs")
            began = time.monotonic()
            acknowledged = asyncio.run(_post_all(bot.messages_url, connector.url, jobs, conversations))
            deadline = time.monotonic() + 300
            while _counts(db)[1] < acknowledged and time.monotonic() < deadline:
                time.sleep(0.2)
            out["acknowledged"] = acknowledged
            out["setup_seconds"] = time.monotonic() - began
            _, running, _ = _counts(db)
            out["running_before_kill"] = running
            progress.advance(weight * 0.6, f"recovery: SIGKILL with {running:,} jobs running, restart")

            bot.kill()
            restarted = time.monotonic()
            bot.start(timeout=120)
            healthy = time.monotonic() - restarted
            deadline = restarted + 300
            recovered = None
            while time.monotonic() < deadline:
                _, _, resumed = _counts(db)
                if resumed >= running:
                    recovered = time.monotonic() - restarted
                    break
                time.sleep(POLL)
            out["healthy_seconds"] = healthy
            out["recovery_seconds"] = recovered
            out["resumed"] = _counts(db)[2]
            out["log"] = bot.log_files[-1].read_text(errors="replace")[-4000:] if recovered is None else ""
        finally:
            bot.kill()
        progress.advance(weight * 0.4)
    return out
