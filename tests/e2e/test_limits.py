"""Abuse limits on the real app: a flood of messages (rate limits, the inbox cap) and the daily token budget.

Hostile: one user posts 150 messages at once; a group chat is flooded by one member while others
talk; a slow agent is buried under messages; a real model (the fake OpenAI server) is asked until
the conversation's daily budget is spent.
"""

from __future__ import annotations

import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from harness.activities import message
from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from harness.fake_openai import FakeOpenAI
from storage.abc import ConversationStore
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_models import telecom_model
from tests.test_ops import scrape, scrape_until, value

pytestmark = pytest.mark.e2e

USER_NOTICE = "You're sending me messages faster than I can keep up with"
CONVERSATION_NOTICE = "This conversation is sending me messages faster than I can keep up with"
INBOX_NOTICE = "I'm still working through the earlier messages"
BUDGET_NOTICE = "has used up today's model budget"


@pytest.fixture
def backend() -> str:
    """The buckets live in the process, not the store: SQLite only (the inbox cap runs on both, below)."""
    return "sqlite"


def flood(bot: BotProcess, conn: RecordingConnector, conv: str, count: int, *, user_id: str = "user-1",
          conversation_type: str = "personal") -> float:
    """``count`` messages from one user, all at once (50 connections); returns how long the posting took."""
    activities = [message(f"my name is U{n}", conversation_id=conv, service_url=conn.url, user_id=user_id,
                          conversation_type=conversation_type) for n in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=50) as pool:
        statuses = [status for status, _ in pool.map(bot.post_activity, activities)]
    took = time.monotonic() - started
    assert statuses == [201] * count  # a refused message is answered (politely), not an HTTP error
    return took


def replies(conn: RecordingConnector, conv: str) -> list[str]:
    """The agent's answers to the flood's messages."""
    return [t for t in conn.texts(conv) if re.fullmatch(r"Nice to meet you, U\d+\. I'll remember that\.", t)]


def notices(conn: RecordingConnector, conv: str, phrase: str) -> list[str]:
    return [t for t in conn.texts(conv) if phrase in t]


def settle(stored: StoreProbe, key: str) -> None:
    """Wait until the agent has folded every accepted message (nothing pending) and its replies went out."""

    async def busy(store: ConversationStore) -> bool:
        return bool(await store.count_pending_events(key) or (await store.load(key)).outbox)

    deadline = time.monotonic() + 60
    while stored.run(busy) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)


def stored_messages(data_dir: Path, key: str) -> int:
    with sqlite3.connect(data_dir / "conversations.sqlite3") as db:
        return int(db.execute("SELECT count(*) FROM events WHERE key = ? AND kind = 'message'", (key,)).fetchone()[0])


def test_a_flood_from_one_user_is_stopped_early_with_one_notice(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                                stored: StoreProbe, tmp_path: Path) -> None:
    """The default limits (no RATE_LIMIT_* set): of 150 messages at once at most 20 reach the agent."""
    took = flood(bot, conn, conv, 150)
    print(f"150 messages posted in {took:.2f} s")
    key = f"emulator:{conv}"
    settle(stored, key)
    answered = replies(conn, conv)
    assert 1 <= len(answered) <= 20, len(answered)
    assert stored_messages(tmp_path, key) == len(answered)  # the refused ones were not even stored
    [notice] = notices(conn, conv, USER_NOTICE)
    assert "wait" in notice
    samples = scrape_until(bot, lambda s: value(s, "teams_agent_rate_limited_total", scope="user") > 0)
    assert value(samples, "teams_agent_rate_limited_total", scope="user") == 150 - len(answered)
    assert value(samples, "teams_agent_turns_total", outcome="ok") == len(answered)

    time.sleep(3.5)  # RATE_LIMIT_USER_PER_MINUTE=20: a token every 3 s
    say(bot, conn, conv, "my name is Again")
    conn.wait_for(lambda c: "Nice to meet you, Again. I'll remember that." in c.texts(conv), timeout=15)
    assert len(notices(conn, conv, USER_NOTICE)) == 1  # still the one notice


@pytest.mark.parametrize("bot_env", [{"RATE_LIMIT_USER_BURST": "3", "RATE_LIMIT_USER_PER_MINUTE": "1",
                                      "RATE_LIMIT_CONVERSATION_BURST": "5",
                                      "RATE_LIMIT_CONVERSATION_PER_MINUTE": "1"}])
def test_in_a_group_chat_one_flooder_does_not_silence_the_others_but_the_conversation_limit_holds(
        bot: BotProcess, conn: RecordingConnector, conv: str, stored: StoreProbe) -> None:
    flood(bot, conn, conv, 20, user_id="user-ada", conversation_type="groupChat")
    key = f"emulator:{conv}"
    settle(stored, key)
    assert len(replies(conn, conv)) == 3  # Ada's burst
    assert len(notices(conn, conv, USER_NOTICE)) == 1

    def post(user_id: str, text: str) -> None:
        status, body = bot.post_activity(message(text, conversation_id=conv, service_url=conn.url, user_id=user_id,
                                                 conversation_type="groupChat"))
        assert status == 201, body

    post("user-bob", "my name is Bob")  # Bob has his own bucket
    post("user-bob", "my name is Bobby")  # the conversation's 5th
    conn.wait_for(lambda c: "Nice to meet you, Bobby. I'll remember that." in c.texts(conv), timeout=15)
    post("user-bob", "my name is Robert")  # Bob still has a token, the conversation has none
    conn.wait_for(lambda c: bool(notices(c, conv, CONVERSATION_NOTICE)), timeout=15)
    post("user-carol", "my name is Carol")  # same stretch: refused without another notice
    settle(stored, key)
    texts = conn.texts(conv)
    assert "Nice to meet you, Bob. I'll remember that." in texts
    assert not any("Robert" in t or "Carol" in t for t in texts)
    assert len(notices(conn, conv, CONVERSATION_NOTICE)) == 1 and len(notices(conn, conv, USER_NOTICE)) == 1
    _, samples = scrape(bot)
    assert value(samples, "teams_agent_rate_limited_total", scope="user") == 17
    assert value(samples, "teams_agent_rate_limited_total", scope="conversation") == 2


class TestInboxCap:
    """A slow agent (the offline model "thinks") and a conversation that keeps posting: the inbox is capped."""

    @pytest.fixture
    def backend(self, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture
    def bot_env(self) -> dict[str, str]:
        return {"MAX_PENDING_EVENTS": "2", "RATE_LIMIT_USER_BURST": "0", "RATE_LIMIT_CONVERSATION_BURST": "0"}

    @pytest.mark.parametrize("backend", ["sqlite", "cosmos"], indirect=True)
    def test_a_full_inbox_refuses_messages_until_the_agent_caught_up(self, bot: BotProcess, conn: RecordingConnector,
                                                                    conv: str, stored: StoreProbe) -> None:
        say(bot, conn, conv, "think for 3 seconds")
        say(bot, conn, conv, "my name is A")
        say(bot, conn, conv, "my name is B")  # two pending: refused, told
        say(bot, conn, conv, "my name is C")  # refused, silently
        conn.wait_for(lambda c: "Nice to meet you, A. I'll remember that." in c.texts(conv), timeout=20)
        settle(stored, f"emulator:{conv}")
        say(bot, conn, conv, "my name is D")  # the agent caught up: taken in again
        conn.wait_for(lambda c: "Nice to meet you, D. I'll remember that." in c.texts(conv), timeout=15)
        texts = conn.texts(conv)
        assert texts[0].startswith(INBOX_NOTICE) and len(notices(conn, conv, INBOX_NOTICE)) == 1
        assert texts[1:] == ["I thought about it for 3 seconds.", "Nice to meet you, A. I'll remember that.",
                             "Nice to meet you, D. I'll remember that."]
        _, samples = scrape(bot)
        assert value(samples, "teams_agent_rate_limited_total", scope="inbox") == 2


# --- the daily token budget, with a real model client and the fake OpenAI server ---------------------


@pytest.fixture
def model_bot_env(fake: FakeOpenAI) -> dict[str, str]:
    blank = {name: "" for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_DEPLOYMENT", "AZURE_OPENAI_API_KEY",
                                   "OPENAI_TIMEOUT_SECONDS", "OPENAI_MAX_RETRIES", "AGENT_SYSTEM_PROMPT",
                                   "AGENT_SYSTEM_PROMPT_FILE")}
    return {**blank, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": fake.openai_base_url, "OPENAI_MODEL": "e2e-model",
            "NO_PROXY": "127.0.0.1,localhost", "ACTIVATE_LINE_SECONDS": "1"}


def test_a_spent_conversation_budget_stops_the_model_until_midnight_utc(
        launch: Launch, model_bot_env: dict[str, str], conn: RecordingConnector, conv: str,
        fake: FakeOpenAI) -> None:
    """The fake server reports 15 tokens a request: a 40-token budget allows three turns."""
    bot = launch({**model_bot_env, "DAILY_TOKEN_BUDGET_PER_CONVERSATION": "40"})
    assert isinstance(bot, BotProcess)
    for n in range(3):
        say(bot, conn, conv, f"question {n}")
        conn.wait_for_texts(n + 1, conv)
    assert conn.texts(conv) == ["echo: question 0", "echo: question 1", "echo: question 2"]
    say(bot, conn, conv, "question 3")  # 45 of 40 used
    say(bot, conn, conv, "question 4")
    texts = conn.wait_for_texts(5, conv)
    assert all(BUDGET_NOTICE in t and "renews at midnight UTC" in t for t in texts[3:]), texts
    assert len(fake.chat_requests()) == 3  # the model was not asked again
    other = f"{conv}-other"  # a conversation's budget is its own
    say(bot, conn, other, "hello")
    assert conn.wait_for_texts(1, other) == ["echo: hello"]
    samples = scrape_until(bot, lambda s: value(s, "teams_agent_model_tokens_total", kind="prompt") >= 40)
    assert value(samples, "teams_agent_model_tokens_total", kind="prompt") == 40
    assert value(samples, "teams_agent_model_tokens_total", kind="completion") == 20
    assert value(samples, "teams_agent_budget_exhausted_total", scope="conversation") == 2


def test_a_job_result_arriving_on_a_spent_budget_is_told_plainly(
        launch: Launch, model_bot_env: dict[str, str], conn: RecordingConnector, conv: str,
        fake: FakeOpenAI) -> None:
    fake.set_responder(telecom_model)
    bot = launch({**model_bot_env, "DAILY_TOKEN_BUDGET_PER_CONVERSATION": "30"})
    say(bot, conn, conv, "please activate line 555-0100")  # tool call + reflection: 30 tokens, all of it
    assert conn.wait_for_texts(1, conv)[0].startswith("I've started activating line 555-0100")
    _, note, outcome = conn.wait_for_texts(3, conv, timeout=20)
    assert "model budget is used up" in note and "midnight UTC" in note
    assert outcome.startswith("Background job `") and "(`activate_new_line`) succeeded" in outcome
    assert "555-0100" in outcome
    assert len(fake.chat_requests()) == 2
