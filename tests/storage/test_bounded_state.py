"""The stored conversation stops growing: 2,000 user turns and 200 finished jobs in one conversation.

Drives the real :class:`ConversationProcessor` and :class:`AgentTurnRunner` (offline model, the
real AutoGen team, the real turn tools with ``activate_new_line``) on the SQLite and Cosmos
stores, and measures the stored conversation item as the store holds it: SQLite's ``doc``
column, Cosmos's raw item JSON read through the SDK (system properties included). Every 10th
message starts a job; each job is then finished the way the job runner finishes it (the record
marked succeeded with ``patch_job``, a ``job_finished`` inbox event from :func:`finished_event`).

Events are appended ten at a time, then the processor is woken and awaited, so a round commits
ten or eleven events at once (the 2,000 turns are all there; only the commit count drops).
The sizes are printed (``-s``, or ``-rA`` for the captured output of a passed test).

On a store without server-side TTL (SQLite) the test then purges what was written before
turn 1,000, as the app's hourly purge would once that half is older than the retention period,
and checks the conversation carries on. Last, an SQLite file from before retention is upgraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio

from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from agent.tools import turn_tools
from jobs.activate_line import activate_new_line, make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner, finished_event
from storage.abc import JSON, ConversationStore, InboxEvent, JobRecord
from storage.sqlite import SqliteStore
from tests.storage.conftest import Backend, CosmosPeer, backend_params, opened
from tests.storage.jobs import save_job

TURNS = 2000
BATCH = 10
JOB_EVERY = 10  # the 5th message of every ten activates a line: 200 jobs
CHECKPOINTS = (10, 100, 500, 1000, 1500, 2000)
NAME_TURN, ASK_TURN = 1990, 2000
HALFWAY = 1000
MAX_BYTES = 256 * 1024  # Cosmos DB's item limit is 2 MB: stay far below it
REFERENCE: JSON = {"conversation": {"id": "growth"}, "serviceUrl": "http://127.0.0.1:9/", "channelId": "msteams"}


class RecordingSender:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        self.texts.append(str(activity.get("text", "")))
        return str(len(self.texts))

    async def typing(self, reference: JSON) -> None:
        return None


def user_text(turn: int) -> str:
    if turn == NAME_TURN:
        return "my name is Grace"
    if turn == ASK_TURN:
        return "what is my name?"
    if turn % JOB_EVERY == 5:
        return f"activate line 555-01{turn // JOB_EVERY % 100:02d}"
    return f"turn {turn}: tell me something about the weather"


@pytest_asyncio.fixture(params=backend_params("sqlite", "cosmos"))
async def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    """An opened SQLite or Cosmos store. On the local Cosmos server it gets its own container,
    so the thousands of items it leaves do not slow the other tests' cross-partition queries."""
    backend: Backend = request.param
    peer = request.getfixturevalue(backend.peer_fixture) if backend.peer_fixture else None
    if isinstance(peer, CosmosPeer) and not os.environ.get("COSMOS_TEST_ENDPOINT"):
        peer = replace(peer, container=f"growth-{uuid.uuid4().hex[:12]}")
    async with opened(backend.factory(tmp_path, peer)) as store:
        yield store


async def stored_size(store: ConversationStore, key: str) -> int:
    """Bytes of the conversation item as stored."""
    if isinstance(store, SqliteStore):
        async with store.db.execute(
            "SELECT length(CAST(doc AS BLOB)) FROM conversations WHERE key = ?", (key,)
        ) as cursor:
            row = await cursor.fetchone()
        assert row is not None
        return int(row[0])
    from storage.cosmos import CONVERSATION_ID, CosmosStore

    assert isinstance(store, CosmosStore)
    item = await store.container.read_item(CONVERSATION_ID, partition_key=store.partition(key))
    return len(json.dumps(dict(item), separators=(",", ":"), ensure_ascii=False).encode())


def succeeded(job: JobRecord) -> JobRecord:
    """The job as the runner leaves it after a successful activation."""
    number = job.arguments["phone_number"]
    result = {"phone_number": number, "status": "active", "job_id": job.id,
              "message": f"✅ Line {number} is active (job `{job.id}`)."}
    return job.evolve(status="succeeded", attempt=1, result=result, progress=1.0, progress_text="Line active",
                      started_at=time.time(), finished_at=time.time())


@pytest.mark.slow
async def test_stored_conversation_levels_off_over_2000_turns_and_200_jobs(
    durable_store: ConversationStore, make_key: Callable[[str], str]
) -> None:
    store, key, sender = durable_store, make_key("growth"), RecordingSender()
    registry = JobRegistry([make_activate_line_tool(20.0)])
    processors: list[ConversationProcessor] = []
    job_runner = JobRunner(store, registry, lambda k: processors[0].wake(k))
    runner = AgentTurnRunner(OfflineChatCompletionClient(tools=[activate_new_line]),
                             lambda scope: turn_tools(scope, registry, store, job_runner))
    started: list[JobRecord] = []

    async def schedule(job: JobRecord) -> None:  # stands in for APScheduler: the test finishes the jobs
        started.append(job)

    processor = ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"),
                                      schedule_job=schedule, max_backoff=0.05)
    processors.append(processor)
    await store.save_reference(key, REFERENCE)

    async def process() -> None:
        processor.wake(key)
        await processor.idle()

    sizes: dict[int, tuple[int, float]] = {}
    halfway = 0.0
    began = time.perf_counter()
    for first in range(1, TURNS + 1, BATCH):
        for turn in range(first, first + BATCH):
            await store.append_event(key, InboxEvent(id=f"activity-{turn}", kind="message",
                                                     payload={"text": user_text(turn)}))
        await process()
        # The jobs this batch started finish now; their events are folded in with the next batch.
        for job in started:
            done = await save_job(store, succeeded(job))
            await store.append_event(key, finished_event(done))
        started.clear()
        last = first + BATCH - 1
        if last in CHECKPOINTS:
            sizes[last] = (await stored_size(store, key), time.perf_counter() - began)
        if last == HALFWAY:
            halfway = time.time()
    name_answer = sender.texts[-1]
    await process()  # announce the last job
    elapsed = time.perf_counter() - began

    backend = type(store).__name__
    print(f"\n{backend}: stored conversation item after N user turns ({elapsed:.1f} s in all)")
    print(f"{'turns':>6} {'bytes':>8} {'KiB':>7} {'elapsed s':>10}")
    for turn, (size, at) in sizes.items():
        print(f"{turn:>6} {size:>8} {size / 1024:>7.1f} {at:>10.1f}")

    record = await store.load(key)
    jobs = await store.list_jobs(key)
    assert record.turns == TURNS + len(jobs)
    assert len(jobs) == TURNS // JOB_EVERY and all(j.status == "succeeded" for j in jobs)
    assert await store.pending_events(key) == [] and record.outbox == ()
    assert len(sender.texts) == TURNS + len(jobs)  # one reply per message and per finished job
    assert name_answer == "Your name is Grace."
    assert sender.texts[-1] == f"✅ Line {jobs[-1].arguments['phone_number']} is active (job `{jobs[-1].id}`)."

    assert sizes[2000][0] <= 1.2 * sizes[500][0], f"the stored conversation keeps growing: {sizes}"
    assert sizes[2000][0] < MAX_BYTES, f"the stored conversation is too big: {sizes[2000][0]} bytes"

    if type(store).purge_expired is ConversationStore.purge_expired:
        return  # expiry is server-side (Cosmos DB item ttl)
    purged = await store.purge_expired(halfway)
    print(f"purge_expired(time of turn {HALFWAY}) deleted {purged} entries")
    # Turns up to 1,000, the jobs finished by then and their announcements (all but the last).
    assert purged == HALFWAY + 2 * (HALFWAY // JOB_EVERY) - 1
    assert not await store.has_event(key, f"activity-{HALFWAY}")
    assert await store.has_event(key, f"activity-{HALFWAY + 1}")
    assert len(await store.list_jobs(key)) == (TURNS - HALFWAY) // JOB_EVERY
    assert await store.load(key) == record and await store.get_reference(key) == REFERENCE
    await store.append_event(key, InboxEvent(id="activity-after-purge", kind="message",
                                             payload={"text": "what is my name?"}))
    await process()
    assert sender.texts[-1] == "Your name is Grace."


# --- SQLite files written before retention existed ---

#: The tables as the first release created them: no ``updated_at`` outside ``conversations``.
_SCHEMA_BEFORE_RETENTION = """
CREATE TABLE conversations (key TEXT PRIMARY KEY, etag TEXT NOT NULL, doc TEXT NOT NULL,
    has_outbox INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL);
CREATE TABLE conversation_references (key TEXT PRIMARY KEY, reference TEXT NOT NULL);
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, id TEXT NOT NULL,
    kind TEXT NOT NULL, payload TEXT NOT NULL, created_at REAL NOT NULL,
    processed INTEGER NOT NULL DEFAULT 0, UNIQUE (key, id));
CREATE INDEX events_pending ON events (processed, key);
CREATE TABLE jobs (key TEXT NOT NULL, id TEXT NOT NULL, status TEXT NOT NULL, created_at REAL NOT NULL,
    doc TEXT NOT NULL, PRIMARY KEY (key, id));
CREATE INDEX jobs_status ON jobs (status);
CREATE TABLE items (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO conversations VALUES ('k', 'etag-1', '{"agent_state": {"a": 1}, "outbox": [], "turns": 1}', 0, 1.0);
INSERT INTO conversation_references VALUES ('k', '{"serviceUrl": "https://x.example/"}');
INSERT INTO events (key, id, kind, payload, created_at, processed) VALUES ('k', 'done', 'message', '{}', 1.0, 1);
INSERT INTO events (key, id, kind, payload, created_at, processed) VALUES ('k', 'waiting', 'message', '{}', 1.0, 0);
INSERT INTO jobs VALUES ('k', 'j1', 'succeeded',
    1.0, '{"id": "j1", "conversation_key": "k", "tool": "t", "arguments": {}, "status": "succeeded"}');
INSERT INTO items VALUES ('dialog/x', '{"v": 1}');
"""


def _write_old_file(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(_SCHEMA_BEFORE_RETENTION)
        db.commit()


async def test_an_sqlite_file_from_before_retention_is_upgraded_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    await asyncio.to_thread(_write_old_file, path)
    before_upgrade = time.time()
    store = SqliteStore(path)
    await store.open()
    try:
        assert (await store.load("k")).agent_state == {"a": 1}
        # The old rows count from the upgrade: nothing is purged for being written before it.
        assert await store.purge_expired(before_upgrade) == 0
        assert await store.has_event("k", "done") and await store.list_jobs("k") != []
        # New writes work with the added columns; a second open does not add them again.
        await store.save_reference("k", {"serviceUrl": "https://y.example/"})
        await store.write_items({"dialog/y": {"v": 2}})
        await store.close()
        await store.open()
        # Once the retention period has passed, the old rows expire like any other.
        assert await store.purge_expired(time.time() + 1) == 4  # event "done", job j1, two items
        assert [e.id for e in await store.pending_events("k")] == ["waiting"]
        assert await store.get_reference("k") == {"serviceUrl": "https://y.example/"}
    finally:
        await store.close()
