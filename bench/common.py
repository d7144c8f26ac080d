"""What every benchmark shares: the signalling recording connector, percentiles, progress, RSS."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from harness.connector import RecordingConnector  # noqa: E402


@dataclass(frozen=True)
class Arrival:
    """A message activity that reached the connector: when (both clocks) and what."""

    conversation_id: str | None
    monotonic: float
    wall: float
    text: str


Listener = Callable[[Arrival], None]


class SignallingConnector(RecordingConnector):
    """The test suite's RecordingConnector, plus a callback for every message POST it accepts.

    Recording is unchanged (the base class does it); the callback lets a load generator wait
    for a reply instead of polling. ``arrived`` is taken before the base class handles the
    request, so it is the moment the message reached the connector. The callback runs on the
    connector's thread: hand results over with ``loop.call_soon_threadsafe``.
    """

    def __init__(self, listener: Listener | None = None) -> None:
        super().__init__()
        self.listener = listener

    async def _handle(self, request: web.Request) -> web.Response:
        arrived, wall = time.monotonic(), time.time()
        response = await super()._handle(request)
        listener = self.listener
        if listener is not None and request.method == "POST" and response.status == 200:
            try:
                activity = json.loads(await request.read())  # aiohttp caches the body
            except ValueError:
                activity = None
            if isinstance(activity, dict) and activity.get("type") == "message":
                conversation = (activity.get("conversation") or {}).get("id")
                listener(Arrival(conversation, arrived, wall, str(activity.get("text") or "")))
        return response


async def post_until_acknowledged(session: aiohttp.ClientSession, url: str, activity: dict[str, Any],
                                   attempts: int = 5) -> bool:
    """Post like the channel does: redeliver (same activity id) until the bot answers 2xx."""
    for _ in range(attempts):
        try:
            async with session.post(url, json=activity) as response:
                await response.read()
                if 200 <= response.status < 300:
                    return True
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.5)
    return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc status")


def cpu_seconds(pid: int | str | None = "self") -> float:
    """User + system CPU time of a process so far, all threads (Linux /proc)."""
    with open(f"/proc/{pid or 'self'}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def children(pid: int) -> list[int]:
    """The pids of a process's live children (Linux /proc)."""
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as listing:
                out += [int(child) for child in listing.read().split()]
    except OSError:
        pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (e.g. a PostgreSQL server and its backends).

    A descendant that exits between two readings takes its CPU time with it: read it around a
    phase in which the connections stay open."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            total += cpu_seconds(current)
        except OSError:
            continue  # gone meanwhile
        stack += children(current)
    return total


class Progress:
    """One progress bar on stderr for the whole run: ``step(label)`` advances by one unit."""

    def __init__(self, total: float, width: int = 32) -> None:
        self.total = max(total, 1e-9)
        self.done = 0.0
        self.width = width
        self.label = ""
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._tty = sys.stderr.isatty()
        self._last_line = ""

    def set(self, label: str) -> None:
        with self._lock:
            self.label = label
        self._draw()

    def advance(self, amount: float, label: str | None = None) -> None:
        with self._lock:
            self.done = min(self.total, self.done + amount)
            if label is not None:
                self.label = label
        self._draw()

    def _draw(self) -> None:
        fraction = self.done / self.total
        filled = int(self.width * fraction)
        elapsed = time.monotonic() - self.started
        line = (f"bench [{'#' * filled}{'.' * (self.width - filled)}] {fraction * 100:3.0f}% "
                f"{elapsed:5.0f}s  {self.label}")
        if self._tty:
            print("\r" + line[:160].ljust(len(self._last_line)), end="", file=sys.stderr, flush=True)
        elif line != self._last_line:
            print(line, file=sys.stderr, flush=True)
        self._last_line = line

    def finish(self) -> None:
        with self._lock:
            self.done = self.total
            self.label = "done"
        self._draw()
        if self._tty:
            print(file=sys.stderr)


class NullProgress(Progress):
    def __init__(self) -> None:
        super().__init__(1)

    def _draw(self) -> None:
        pass

    def finish(self) -> None:
        pass


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms != ms:  # NaN
        return "n/a"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_ratio(value: float) -> str:
    if value != value:
        return "n/a"
    return f"{value:.2f}x"


def ratio(ours: float, base: float) -> float:
    return ours / base if base else float("nan")


def env_for_bot(**extra: str) -> dict[str, Any]:
    """Environment for a bot process: no model credentials (offline model), no .env surprises."""
    env = {name: "" for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_ENDPOINT",
                                 "AZURE_OPENAI_DEPLOYMENT", "MicrosoftAppId", "MicrosoftAppPassword",
                                 "COSMOS_ENDPOINT")}
    # Throughput, not abuse: one user floods many conversations, so the ingest limits are off.
    env.update({"RATE_LIMIT_USER_BURST": "0", "RATE_LIMIT_CONVERSATION_BURST": "0", "MAX_PENDING_EVENTS": "0"})
    # ... and so are the job caps (5 active jobs per user by default): the job benchmarks' one user starts
    # hundreds. Without this the 2026-12-01 run's notify and recovery rows measured refused jobs.
    env.update({"MAX_ACTIVE_JOBS_PER_USER": "0", "MAX_ACTIVE_JOBS_PER_CONVERSATION": "0"})
    env.update(extra)
    return env


def quiet_env() -> None:
    """The bench process itself: no proxies for loopback traffic."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(name, None)
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
