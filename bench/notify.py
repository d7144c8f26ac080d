"""2. Completion notification latency: a job finishes -> its proactive message reaches the connector.

The real bot runs as a process with a short ``ACTIVATE_LINE_SECONDS``; users in many
conversations ask it to activate lines, at a steady rate (open loop). A job's end is its
record's ``finished_at`` (the moment the tool returned, read from the store after the run); the
notification is the "✅ Line … is active (job `id`)" message, timed when it reaches the
recording connector. Both are wall-clock times on the same machine.

Baseline, same load and connector: the bare echo bot's ``notify <seconds> <tag>``, a timer
followed by ``continue_conversation`` (no store, no agent), timed from when the timer fired.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Arrival, Progress, SignallingConnector, env_for_bot, percentile, post_until_acknowledged
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess

_DONE = re.compile(r"is active \(job `(?P<id>[0-9a-f]+)`\)")
_ECHO_DONE = re.compile(r"^done (?P<tag>\S+) (?P<finished>[0-9.]+)$")


async def open_loop(url: str, service_url: str, conversations: int, jobs: int, rate: float,
                    text: Callable[[int], str]) -> tuple[int, float]:
    """Post ``jobs`` messages at ``rate`` per second, round-robin over the conversations.

    Returns (acknowledged posts, seconds it took)."""
    conv_ids = [new_conversation_id("notify") for _ in range(conversations)]
    acknowledged = 0
    started = time.monotonic()

    async def post(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal acknowledged
        activity = message(text(n), conversation_id=conv_ids[n % conversations], service_url=service_url)
        # Not ``acknowledged += await ...``: that reads the count before the await, so concurrent posts
        # lost increments (the quick run's "notifications delivered 40/39").
        ok = await post_until_acknowledged(session, url, activity)
        acknowledged += ok

    async with aiohttp.ClientSession() as session:
        tasks = []
        for n in range(jobs):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post(session, n)))
        await asyncio.gather(*tasks)
    return acknowledged, time.monotonic() - started


def _finished_at(db_path: Path) -> dict[str, float]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT doc FROM jobs").fetchall()
    out = {}
    for (doc,) in rows:
        job = json.loads(doc)
        if job.get("finished_at"):
            out[job["id"]] = float(job["finished_at"])
    return out


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def run(jobs: int, conversations: int, rate: float, job_seconds: float, progress: Progress,
        weight: float) -> dict[str, Any]:
    out: dict[str, Any] = {"jobs": jobs, "conversations": conversations, "rate": rate, "job_seconds": job_seconds}
    arrivals: list[Arrival] = []

    def collect(arrival: Arrival) -> None:
        arrivals.append(arrival)

    with tempfile.TemporaryDirectory(prefix="bench-notify-") as tmp, SignallingConnector(collect) as connector:
        # --- ours ---
        progress.set(f"notifications: ours, {jobs} jobs over {conversations} conversations")
        ours = BotProcess(Path(tmp) / "ours", env=env_for_bot(ACTIVATE_LINE_SECONDS=str(job_seconds)))
        try:
            ours.start(timeout=60)
            counter = iter(range(10**6))
            acknowledged, _ = asyncio.run(open_loop(
                ours.messages_url, connector.url, conversations, jobs, rate,
                lambda n: f"activate line 555-{next(counter) % 10000:04d}"))

            def done_ids() -> set[str]:
                return {m.group("id") for a in list(arrivals) if (m := _DONE.search(a.text))}

            _wait(lambda: len(done_ids()) >= acknowledged, timeout=120 + jobs * job_seconds)
            time.sleep(0.5)
            finished = _finished_at(ours.data_dir / "conversations.sqlite3")
        finally:
            ours.kill()
        first: dict[str, float] = {}
        for a in arrivals:
            if (m := _DONE.search(a.text)) and m.group("id") not in first:
                first[m.group("id")] = a.wall
        ours_lat = [first[j] - finished[j] for j in first if j in finished]
        out["ours"] = {"acknowledged": acknowledged, "delivered": len(first), "latencies": ours_lat,
                       "p50": percentile(ours_lat, 50), "p99": percentile(ours_lat, 99),
                       "max": max(ours_lat, default=float("nan"))}
        progress.advance(weight * 0.6)

        # --- baseline: the echo bot's timer + continue_conversation ---
        progress.set("notifications: echo baseline")
        arrivals.clear()
        echo = BotProcess(Path(tmp) / "echo", env=env_for_bot(), script="bench/echo_bot.py")
        try:
            echo.start(timeout=60)
            tags = [uuid.uuid4().hex[:12] for _ in range(jobs)]
            acknowledged, _ = asyncio.run(open_loop(
                echo.messages_url, connector.url, conversations, jobs, rate,
                lambda n: f"notify {job_seconds} {tags[n]}"))
            _wait(lambda: sum(1 for a in list(arrivals) if _ECHO_DONE.match(a.text)) >= acknowledged,
                  timeout=60 + jobs * job_seconds)
        finally:
            echo.kill()
        echo_lat = [a.wall - float(m.group("finished")) for a in arrivals if (m := _ECHO_DONE.match(a.text))]
        out["echo"] = {"acknowledged": acknowledged, "delivered": len(echo_lat), "latencies": echo_lat,
                       "p50": percentile(echo_lat, 50), "p99": percentile(echo_lat, 99),
                       "max": max(echo_lat, default=float("nan"))}
        progress.advance(weight * 0.4)
    return out
