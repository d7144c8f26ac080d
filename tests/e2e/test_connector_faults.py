"""The Bot Connector misbehaving while replies and proactive messages go out."""

from __future__ import annotations

import time

import pytest

from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from tests.e2e.test_conversation import say

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"ACTIVATE_LINE_SECONDS": "1", "CONNECTOR_TIMEOUT_SECONDS": "1"}


def test_429_with_retry_after_is_honoured_and_delivered_once(bot: BotProcess, conn: RecordingConnector,
                                                             conv: str) -> None:
    conn.fail_next(2, 429, {"Retry-After": "1"})
    started = time.monotonic()
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(1, conv, timeout=15)
    assert time.monotonic() - started >= 1.0  # waited as told, at least once
    time.sleep(0.5)
    assert conn.texts(conv) == ["Nice to meet you, Ada. I'll remember that."]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_5xx_is_retried_with_backoff(bot: BotProcess, conn: RecordingConnector, conv: str, status: int) -> None:
    conn.fail_next(3, status)
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(1, conv, timeout=20)
    time.sleep(0.5)
    assert conn.texts(conv) == ["Nice to meet you, Ada. I'll remember that."]
    assert len(conn.failed) >= 3


def test_a_long_outage_loses_nothing_and_keeps_order(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    conn.fail_next(10_000, 503)
    say(bot, conn, conv, "my name is Ada")
    say(bot, conn, conv, "activate line 555-0100")  # its completion arrives during the outage
    say(bot, conn, conv, "what is my name?")
    time.sleep(4)
    assert conn.texts(conv) == []
    conn.fail_next(0, 200)
    conn.wait_for(lambda c: any("is active" in t for t in c.texts(conv)) and "Your name is Ada." in c.texts(conv),
                  timeout=40)
    texts = conn.texts(conv)
    assert texts[0] == "Nice to meet you, Ada. I'll remember that."
    assert texts[1].startswith("I've started activating line 555-0100")
    assert len(texts) == len(set(texts)) == 4


def test_a_hanging_connector_times_out_and_the_message_still_arrives(bot: BotProcess, conn: RecordingConnector,
                                                                     conv: str) -> None:
    conn.set_delay(3)  # longer than CONNECTOR_TIMEOUT_SECONDS
    say(bot, conn, conv, "my name is Ada")
    time.sleep(2.5)
    conn.set_delay(0)
    conn.wait_for_texts(1, conv, timeout=20)
    time.sleep(4)
    # A connector that processes a request after the bot gave up on it yields a copy per timed-out
    # attempt (the Bot Connector has no idempotency key): at-least-once, never lost.
    timeouts = bot.log_tail(200).count("did not answer within 1 s")
    assert timeouts >= 1
    assert 1 <= conn.texts(conv).count("Nice to meet you, Ada. I'll remember that.") <= 1 + timeouts


@pytest.mark.parametrize("status", [403, 404])
def test_a_conversation_the_bot_was_removed_from_is_not_retried(bot: BotProcess, conn: RecordingConnector,
                                                               conv: str, status: int) -> None:
    conn.fail_next(1, status)  # the reply (a turn this fast sends no typing indicator first)
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for(lambda c: len(c.failed) >= 1, timeout=10)
    time.sleep(2)
    assert len(conn.failed) == 1  # no retry
    assert "not retrying" in bot.log_tail(100) and f"{status}" in bot.log_tail(100)
    say(bot, conn, conv, "what is my name?")  # the conversation itself is not stuck
    assert conn.wait_for_texts(1, conv) == ["Your name is Ada."]
