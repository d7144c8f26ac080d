"""Ingest limits (bot/rate_limits.py) with a hand-driven clock: buckets, one notice per stretch, inbox cap."""

from __future__ import annotations

import pytest

from bot import rate_limits
from bot.rate_limits import IngestLimits, Refusal
from runtime import metrics
from runtime.config import ConfigError, Settings
from runtime.protocol import Requester
from storage.abc import InboxEvent
from storage.memory import MemoryStore

KEY = "msteams:19:group@thread.v2"
ADA = Requester(id="29:ada", name="Ada", aad_object_id="aad-ada", conversation_type="groupChat")
BOB = Requester(id="29:bob", name="Bob", aad_object_id="aad-bob", conversation_type="groupChat")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limits(clock: Clock, store: MemoryStore | None = None, **numbers: int) -> IngestLimits:
    settings = {"user_burst": 3, "user_per_minute": 60, "conversation_burst": 5, "conversation_per_minute": 60,
                "max_pending_events": 0, **numbers}
    return IngestLimits(store or MemoryStore(), clock=clock, **settings)  # type: ignore[arg-type]


async def outcomes(limit: IngestLimits, who: Requester, count: int, key: str = KEY) -> list[Refusal | None]:
    return [await limit.refuse(key, who) for _ in range(count)]


async def test_a_burst_is_taken_then_refused_with_one_notice_and_the_bucket_refills() -> None:
    clock = Clock()
    limit = limits(clock)
    got = await outcomes(limit, ADA, 10)
    assert got[:3] == [None, None, None]
    refused = got[3:]
    assert all(r is not None and r.scope == "user" for r in refused)
    notices = [r.notice for r in refused if r is not None and r.notice]
    assert len(notices) == 1 and "faster than I can keep up" in notices[0] and "wait a second" in notices[0]
    clock.now += 1.0  # one token back (60 a minute)
    assert await limit.refuse(KEY, ADA) is None
    refusal = await limit.refuse(KEY, ADA)
    assert refusal is not None and refusal.notice is None  # the same stretch: no second notice
    clock.now += 3.0  # refilled to the full burst: the stretch is over
    assert await outcomes(limit, ADA, 3) == [None, None, None]
    refusal = await limit.refuse(KEY, ADA)
    assert refusal is not None and refusal.notice  # a new stretch gets its own notice


async def test_a_steady_flood_is_told_once_however_long_it_lasts() -> None:
    clock = Clock()
    limit = limits(clock, user_per_minute=60)
    told = 0
    for _ in range(600):  # ten a second for a minute
        clock.now += 0.1
        refusal = await limit.refuse(KEY, ADA)
        told += bool(refusal and refusal.notice)
    assert told == 1


async def test_another_sender_has_their_own_bucket_but_the_conversation_bucket_holds() -> None:
    clock = Clock()
    limit = limits(clock)
    assert [r is None for r in await outcomes(limit, ADA, 6)] == [True] * 3 + [False] * 3
    assert await outcomes(limit, BOB, 2) == [None, None]  # Bob is not limited by Ada's bucket
    refusal = await limit.refuse(KEY, BOB)  # but the conversation has had its 5
    assert refusal is not None and refusal.scope == "conversation" and refusal.notice
    assert "This conversation" in refusal.notice
    # Bob elsewhere: his own bucket still has a token (the conversation's refusal took none of his).
    assert await limit.refuse("msteams:a:personal", BOB) is None
    refusal = await limit.refuse("msteams:a:personal", BOB)
    assert refusal is not None and refusal.scope == "user"


async def test_the_sender_is_the_aad_object_id_else_the_channel_account() -> None:
    clock = Clock()
    limit = limits(clock, conversation_burst=0)
    same_person = Requester(id="29:ada-other-account", aad_object_id="aad-ada")
    await outcomes(limit, ADA, 3)
    assert (await limit.refuse("msteams:other", same_person)) is not None
    no_aad = Requester(id="emulator-user")
    assert await outcomes(limit, no_aad, 3) == [None, None, None]
    assert (await limit.refuse(KEY, no_aad)) is not None


@pytest.mark.parametrize("off", [{"user_burst": 0}, {"user_per_minute": 0}])
async def test_zero_turns_a_bucket_off(off: dict[str, int]) -> None:
    limit = limits(Clock(), None, conversation_burst=0, **off)
    assert await outcomes(limit, ADA, 100) == [None] * 100


async def test_a_full_inbox_refuses_messages_until_the_agent_caught_up() -> None:
    store = MemoryStore()
    limit = limits(Clock(), store, user_burst=0, conversation_burst=0, max_pending_events=3)
    for n in range(3):
        assert await limit.refuse(KEY, ADA) is None
        await store.append_event(KEY, InboxEvent(id=f"m{n}", kind="message", payload={"text": "hi"}))
    first, second = await outcomes(limit, ADA, 2)
    assert first is not None and first.scope == "inbox" and first.notice and "earlier messages" in first.notice
    assert second == Refusal("inbox", None)
    await store.commit(await store.load(KEY), processed=["m0"])  # the agent took one
    assert await limit.refuse(KEY, ADA) is None
    await store.append_event(KEY, InboxEvent(id="m3", kind="message", payload={"text": "hi"}))
    refusal = await limit.refuse(KEY, ADA)
    assert refusal is not None and refusal.notice  # full again: a new stretch, told again
    assert await limit.refuse("msteams:other", ADA) is None  # another conversation's inbox is its own


@pytest.mark.parametrize("sole_ingest", [False, True])
async def test_the_sole_ingest_counts_the_inbox_once_and_spends_the_room_it_left(sole_ingest: bool) -> None:
    """ROLE=all without PostgreSQL: one count, then the cap is reached on the same message as when counting
    each time; with several instances (sole_ingest off) every message is counted."""
    store = MemoryStore()
    counts = []
    counted = store.count_pending_events

    async def count_pending_events(key: str) -> int:
        counts.append(key)
        return await counted(key)

    store.count_pending_events = count_pending_events  # type: ignore[method-assign]
    limit = IngestLimits(store, user_burst=0, conversation_burst=0, max_pending_events=4, sole_ingest=sole_ingest)
    await store.append_event(KEY, InboxEvent(id="old", kind="message", payload={"text": "hi"}))  # before a restart
    for n in range(3):
        assert await limit.refuse(KEY, ADA) is None
        await store.append_event(KEY, InboxEvent(id=f"m{n}", kind="message", payload={"text": "hi"}))
    refusal = await limit.refuse(KEY, ADA)
    assert refusal is not None and refusal.scope == "inbox"  # 4 pending: full, in both modes
    assert len(counts) == (2 if sole_ingest else 4)  # the first message, then the one that finds it full


async def test_refusals_are_counted_by_scope() -> None:
    before = {scope: metrics.RATE_LIMITED.labels(scope)._value.get() for scope in ("user", "conversation")}
    limit = limits(Clock())
    await outcomes(limit, ADA, 5)  # 2 refused by Ada's bucket
    await outcomes(limit, BOB, 3)  # 2 taken, then the conversation's 5 are gone
    assert metrics.RATE_LIMITED.labels("user")._value.get() - before["user"] == 2
    assert metrics.RATE_LIMITED.labels("conversation")._value.get() - before["conversation"] == 1


async def test_refilled_buckets_are_forgotten_so_memory_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rate_limits, "MAX_TRACKED", 100)
    clock = Clock()
    limit = limits(clock)
    for n in range(1000):
        await limit.refuse(f"conv-{n}", Requester(id=f"user-{n}"))
        clock.now += 0.5  # each bucket (burst 3, 1 a second) is full again 1 s after its message
    assert len(limit.users) <= 200 and len(limit.conversations) <= 200
    # A sender who is limited right now is not forgotten by the pruning.
    await outcomes(limit, ADA, 4)
    for n in range(300):
        await limit.refuse(f"more-{n}", Requester(id=f"other-{n}"))
    assert (await limit.refuse(KEY, ADA)) is not None


def test_the_settings_have_documented_defaults_and_refuse_negative_numbers() -> None:
    settings = Settings.from_env({}, dotenv=None)
    assert (settings.rate_limit_user_burst, settings.rate_limit_user_per_minute) == (10, 20)
    assert (settings.rate_limit_conversation_burst, settings.rate_limit_conversation_per_minute) == (30, 60)
    assert settings.max_pending_events == 50
    assert (settings.daily_token_budget_per_tenant, settings.daily_token_budget_per_conversation) == (0, 200_000)
    assert Settings.from_env({"RATE_LIMIT_USER_BURST": "0"}, dotenv=None).rate_limit_user_burst == 0
    with pytest.raises(ConfigError, match="MAX_PENDING_EVENTS"):
        Settings.from_env({"MAX_PENDING_EVENTS": "-1"}, dotenv=None)
