"""JobCardUpdater: each job's card is edited in place at most once per interval, on a fake clock.

``bot.job_cards`` reads ``time.monotonic`` and waits with ``asyncio.sleep``; the test swaps both
for a :class:`FakeClock` that only moves when the test advances it, so the throttling is checked
exactly and without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import types
from typing import Any

import pytest

from bot import job_cards
from bot.job_cards import JobCardUpdater
from storage.abc import JSON, JobRecord
from storage.memory import MemoryStore
from tests.storage.jobs import add_job

KEY = "msteams:19:cards@thread.v2"
REFERENCE: JSON = {"conversation": {"id": "19:cards@thread.v2"}, "serviceUrl": "https://smba.example/"}
INTERVAL = 2.0


class FakeClock:
    """Monotonic time that stands still until :meth:`advance`; sleepers wake when their time comes."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if delay <= 0:
            await asyncio.sleep(0)
            return
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.now + delay, future))
        await future

    async def advance(self, seconds: float) -> None:
        await settle()  # tasks created meanwhile start their sleeps first
        self.now += seconds
        for entry in [s for s in self._sleepers if s[0] <= self.now]:
            self._sleepers.remove(entry)
            if not entry[1].done():
                entry[1].set_result(None)
        await settle()


async def settle() -> None:
    """Let every task that can run, run (a few store calls deep)."""
    for _ in range(20):
        await asyncio.sleep(0)


class FakeSender:
    def __init__(self, clock: FakeClock, fail: bool = False) -> None:
        self.clock, self.fail = clock, fail
        self.updates: list[tuple[float, str, JSON]] = []

    async def update(self, reference: JSON, activity_id: str, activity: JSON) -> None:
        assert reference == REFERENCE
        if self.fail:
            raise ConnectionError("Bot Connector: 502")
        self.updates.append((self.clock.now, activity_id, activity))

    def summaries(self) -> list[str]:
        return [activity["summary"] for _, _, activity in self.updates]

    def facts(self, index: int = -1) -> dict[str, str]:
        card = self.updates[index][2]["attachments"][0]["content"]
        return {f["title"]: f["value"] for block in card["body"] if block["type"] == "FactSet" for f in block["facts"]}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(job_cards, "time", types.SimpleNamespace(monotonic=fake.monotonic))
    fake_asyncio = types.SimpleNamespace(**{name: getattr(asyncio, name) for name in ("create_task", "gather", "Task")})
    fake_asyncio.sleep = fake.sleep
    monkeypatch.setattr(job_cards, "asyncio", fake_asyncio)
    return fake


@pytest.fixture
async def store() -> MemoryStore:
    store = MemoryStore()
    await store.save_reference(KEY, REFERENCE)
    await add_job(store, JobRecord(id="j1", conversation_key=KEY, tool="activate_line", arguments={"line": "1"}))
    return store


async def updater(store: MemoryStore, sender: FakeSender) -> JobCardUpdater:
    return JobCardUpdater(store, sender, min_interval=INTERVAL)  # type: ignore[arg-type]


async def progress(store: MemoryStore, cards: JobCardUpdater, fraction: float, **changes: Any) -> JobRecord:
    job = await store.patch_job(KEY, "j1", {"status": "running", "progress": fraction, **changes})
    await cards.job_changed(job)
    return job


async def test_a_posted_card_is_remembered_on_the_job_and_a_queued_one_is_not_edited(
        store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "j1", "activity-1")
    assert (await store.get_job(KEY, "j1")).card_activity_id == "activity-1"  # updates go on after a restart
    assert sender.updates == []  # the card as posted already shows the queued job


async def test_a_card_posted_after_the_job_started_shows_its_state_an_interval_later(
        store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await store.patch_job(KEY, "j1", {"status": "running", "progress": 0.3})
    await cards.card_posted(KEY, "j1", "activity-1")
    await clock.advance(INTERVAL - 0.1)
    assert sender.updates == []  # Teams allows one edit per message every 2 s: posting was the first
    await clock.advance(0.1)
    assert [(at, activity_id) for at, activity_id, _ in sender.updates] == [(clock.now, "activity-1")]
    assert sender.facts()["Progress"].endswith("30%")


async def test_a_card_without_an_id_cannot_be_updated(store: MemoryStore, clock: FakeClock,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    with caplog.at_level(logging.WARNING, logger="bot.job_cards"):
        await cards.card_posted(KEY, "j1", None)
    assert "returned no id for the card of job j1" in caplog.text
    await progress(store, cards, 0.5)
    assert sender.updates == [] and (await store.get_job(KEY, "j1")).card_activity_id is None


async def test_a_burst_of_progress_collapses_into_one_trailing_update_with_the_latest_state(
        store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "j1", "activity-1")
    posted = clock.now
    for n in range(1, 6):
        await clock.advance(0.1)
        await progress(store, cards, n / 10, progress_text=f"step {n}")
    assert sender.updates == []  # within the interval of the card's posting
    await clock.advance(INTERVAL)
    assert len(sender.updates) == 1 and sender.updates[0][0] - posted >= INTERVAL
    assert sender.facts()["Step"] == "step 5" and sender.facts()["Progress"].endswith("50%")

    await clock.advance(INTERVAL)  # a quiet interval later, the next change goes out at once
    await progress(store, cards, 0.6)
    assert len(sender.updates) == 2 and sender.facts()["Progress"].endswith("60%")
    gaps = [b[0] - a[0] for a, b in zip(sender.updates, sender.updates[1:], strict=False)]
    assert all(gap >= INTERVAL for gap in gaps)


async def test_the_final_state_is_always_shown_and_nothing_older_after_it(store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "j1", "activity-1")
    await progress(store, cards, 0.4)  # trailing update pending
    done = await store.patch_job(KEY, "j1", {"status": "succeeded", "progress": 1.0,
                                             "result": {"message": "Line 1 is active."}})
    finishing = asyncio.create_task(cards.job_changed(done))
    for _ in range(3):
        await clock.advance(INTERVAL)
    await asyncio.wait_for(finishing, 1)
    assert sender.summaries()[-1].endswith(": succeeded")
    assert all(not summary.endswith(": running") for summary in sender.summaries())  # the pending one was dropped
    card = sender.updates[-1][2]["attachments"][0]["content"]
    assert "actions" not in card  # no Cancel on a finished job


async def test_a_failing_update_is_logged_not_raised(store: MemoryStore, clock: FakeClock,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    sender = FakeSender(clock, fail=True)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "j1", "activity-1")
    await clock.advance(INTERVAL)
    with caplog.at_level(logging.WARNING, logger="bot.job_cards"):
        await progress(store, cards, 0.5)
    assert "could not update the card of job j1" in caplog.text


async def test_close_cancels_pending_updates(store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "j1", "activity-1")
    await progress(store, cards, 0.5)
    await cards.close()
    await clock.advance(10 * INTERVAL)
    assert sender.updates == []


async def test_an_unknown_job_is_ignored(store: MemoryStore, clock: FakeClock) -> None:
    sender = FakeSender(clock)
    cards = await updater(store, sender)
    await cards.card_posted(KEY, "no-such-job", "activity-1")
    assert sender.updates == []
