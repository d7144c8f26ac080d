"""3. State cost as one conversation grows: store time per turn and stored size, SQLite and Cosmos.

In-process, like tests/storage/test_bounded_state.py: the real ConversationProcessor and
AgentTurnRunner (offline model, the real AutoGen team and turn tools) on a store wrapped to
time every call. One user message per turn, each its own commit; every 50th message starts an
``activate_new_line`` job, finished at once the way the job runner finishes it (record marked
succeeded, ``job_finished`` event), and its announcement is processed as a round of its own.

At each checkpoint N the figures are the median over the 10 user turns ending at N (never a job
turn): ``commit`` = time in ``store.commit`` during the turn (the turn's atomic write plus the
outbox clean-up after sending), ``store`` = time in every store call of the turn, and the size
of the conversation item as stored (SQLite's ``doc``; the Cosmos item as JSON, system
properties included). The baseline of each figure is its value at turn 10.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from agent.tools import turn_tools
from bench.common import Progress
from jobs.activate_line import activate_new_line, make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner, finished_event
from storage.abc import JSON, ConversationStore, InboxEvent, JobRecord
from storage.sqlite import SqliteStore

JOB_EVERY = 50
WINDOW = 10
REFERENCE: JSON = {"conversation": {"id": "growth"}, "serviceUrl": "http://127.0.0.1:9/", "channelId": "msteams",
                   "bot": {"id": "bot-1"}, "user": {"id": "user-1"}}


class TimedStore:
    """Wraps a store: every coroutine method call is timed into ``spent[name]`` (seconds)."""

    def __init__(self, inner: ConversationStore) -> None:
        self._inner = inner
        self.spent: dict[str, float] = defaultdict(float)

    def take(self) -> dict[str, float]:
        spent, self.spent = dict(self.spent), defaultdict(float)
        return spent

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - began

        return timed


class CountingSender:
    def __init__(self) -> None:
        self.sent = 0

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        self.sent += 1
        return str(self.sent)

    async def typing(self, reference: JSON) -> None:
        return None


async def stored_size(store: ConversationStore, key: str) -> int:
    if isinstance(store, SqliteStore):
        async with store.db.execute("SELECT length(CAST(doc AS BLOB)) FROM conversations WHERE key = ?",
                                    (key,)) as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
    from storage.cosmos import CONVERSATION_ID, CosmosStore

    assert isinstance(store, CosmosStore)
    item = await store.container.read_item(CONVERSATION_ID, partition_key=store.partition(key))
    return len(json.dumps(dict(item), separators=(",", ":"), ensure_ascii=False).encode())


def _user_text(turn: int) -> str:
    if turn % JOB_EVERY == JOB_EVERY // 2:
        return f"activate line 555-{turn % 10000:04d}"
    if turn % 7 == 0:
        return f"my name is Grace{turn}"
    return f"turn {turn}: tell me something about the weather"


async def grow(store: ConversationStore, checkpoints: tuple[int, ...], tick: Callable[[int], None]) -> dict[int, Any]:
    """Drive one conversation to max(checkpoints) turns; figures per checkpoint."""
    timed = TimedStore(store)
    key = f"19:bench-{uuid.uuid4().hex[:10]}@thread.tacv2"
    registry = JobRegistry([make_activate_line_tool(20.0)])
    processors: list[ConversationProcessor] = []
    jobs_runner = JobRunner(timed, registry, lambda k: processors[0].wake(k))  # type: ignore[arg-type]
    runner = AgentTurnRunner(OfflineChatCompletionClient(tools=[activate_new_line]),
                             lambda scope: turn_tools(scope, registry, timed, jobs_runner))  # type: ignore[arg-type]
    started: list[JobRecord] = []

    async def schedule(job: JobRecord) -> None:
        started.append(job)

    processor = ConversationProcessor(timed, runner, CountingSender(), welcome=lambda: text_activity("hi"),  # type: ignore[arg-type]
                                      schedule_job=schedule)
    processors.append(processor)
    await store.save_reference(key, REFERENCE)
    windows = {n: range(max(1, n - WINDOW + 1), n + 1) for n in checkpoints}
    wanted = {t for r in windows.values() for t in r}
    samples: dict[int, tuple[float, float, float, dict[str, float]]] = {}
    figures: dict[int, Any] = {}
    for turn in range(1, max(checkpoints) + 1):
        await store.append_event(key, InboxEvent(id=f"activity-{turn}", kind="message",
                                                 payload={"text": _user_text(turn)}))
        timed.take()
        began = time.perf_counter()
        processor.wake(key)
        await processor.idle()
        elapsed = time.perf_counter() - began
        spent = timed.take()
        if turn in wanted:
            samples[turn] = (spent.get("commit", 0.0), sum(spent.values()), elapsed, spent)
        for job in started:  # finish at once, announce, and fold the announcement in (not a sample)
            # As the job runner records an outcome: a patch of the job the turn's commit created.
            done = await store.patch_job(key, job.id, {
                "status": "succeeded", "attempt": 1, "progress": 1.0, "finished_at": time.time(),
                "result": {"phone_number": job.arguments["phone_number"], "status": "active",
                           "message": f"Line {job.arguments['phone_number']} is active."}})
            await store.append_event(key, finished_event(done))
            processor.wake(key)
            await processor.idle()
        started.clear()
        if turn in windows:
            window = [samples[t] for t in windows[turn]]
            figures[turn] = {"commit": statistics.median(s[0] for s in window),
                             "store": statistics.median(s[1] for s in window),
                             "turn": statistics.median(s[2] for s in window), "size": await stored_size(store, key),
                             "by_call": {name: statistics.median(s[3].get(name, 0.0) for s in window)
                                         for name in sorted({n for s in window for n in s[3]})}}
            tick(turn)
    return figures


@contextlib.asynccontextmanager
async def opened(store: ConversationStore) -> AsyncIterator[ConversationStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def run(checkpoints: tuple[int, ...], progress: Progress, weight_sqlite: float, weight_cosmos: float) -> dict[str, Any]:
    out: dict[str, Any] = {"checkpoints": checkpoints}
    last = max(checkpoints)

    def ticker(label: str, weight: float) -> Callable[[int], None]:
        done = [0]

        def tick(turn: int) -> None:
            progress.advance(weight * (turn - done[0]) / last, f"state cost: {label}, turn {turn:,}/{last:,}")
            done[0] = turn

        return tick

    with tempfile.TemporaryDirectory(prefix="bench-state-") as tmp:
        progress.set(f"state cost: SQLite, {last:,} turns")

        async def sqlite_run() -> dict[int, Any]:
            async with opened(SqliteStore(Path(tmp) / "state.sqlite3")) as store:
                return await grow(store, checkpoints, ticker("SQLite", weight_sqlite))

        out["sqlite"] = asyncio.run(sqlite_run())

    from harness.peers import cosmos as cosmos_peer

    reason = cosmos_peer.unavailable_reason()
    if reason:
        out["cosmos"] = {"skipped": reason}
        progress.advance(weight_cosmos)
        return out
    progress.set(f"state cost: Cosmos server, {last:,} turns")
    with cosmos_peer.cosmos_server() as endpoint:
        from storage.cosmos import CosmosStore

        async def cosmos_run() -> dict[int, Any]:
            store = CosmosStore(endpoint, cosmos_peer.EMULATOR_KEY, "bench", f"state-{uuid.uuid4().hex[:8]}")
            async with opened(store):
                return await grow(store, checkpoints, ticker("Cosmos server", weight_cosmos))

        out["cosmos"] = asyncio.run(cosmos_run())
    return out
