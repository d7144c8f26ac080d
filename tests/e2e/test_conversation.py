"""The durable core seen from outside: the real app process, Emulator-style activities."""

from __future__ import annotations

import time

import pytest

from harness.activities import conversation_update, message, teams_channel_mention
from harness.botproc import BotProcess, HttpEndpoint
from harness.connector import RecordingConnector
from tests.e2e.conftest import StoreProbe

pytestmark = [pytest.mark.e2e, pytest.mark.cluster]


def say(bot: HttpEndpoint, conn: RecordingConnector, conv: str, text: str, **kwargs: object) -> dict[str, object]:
    activity = message(text, conversation_id=conv, service_url=conn.url, **kwargs)  # type: ignore[arg-type]
    status, body = bot.post_activity(activity)
    assert status == 201, body
    return activity


def test_welcome_when_a_user_joins_not_for_the_bot_alone(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    status, _ = bot.post_activity(conversation_update(members_added=["bot-1"], conversation_id=conv,
                                                      service_url=conn.url))
    assert status == 200
    status, _ = bot.post_activity(conversation_update(members_added=["user-1", "bot-1"], conversation_id=conv,
                                                      service_url=conn.url))
    assert status == 200
    [welcome] = conn.wait_for_messages(1, conv)
    [card] = welcome["attachments"]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert "Hi!" in card["content"]["body"][0]["text"]
    time.sleep(0.5)
    assert len(conn.messages(conv)) == 1


def test_reply_goes_to_the_conversation_with_a_typing_indicator(bot: BotProcess, conn: RecordingConnector,
                                                                 conv: str) -> None:
    # A turn slower than FIRST_INDICATOR_DELAY (agent/processor.py) shows typing first.
    say(bot, conn, conv, "think for 1 seconds")
    [reply] = conn.wait_for_texts(1, conv)
    assert "thought about it" in reply
    assert conn.messages(conv)[0]["conversation"]["id"] == conv
    assert conn.activities(type="typing", conversation_id=conv), "no typing indicator was sent"


def test_a_fast_turn_sends_no_typing_indicator(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "hello there")
    [reply] = conn.wait_for_texts(1, conv)
    assert "offline model" in reply
    assert not conn.activities(type="typing", conversation_id=conv), "a turn that answered at once sent typing"


def test_state_is_carried_across_turns_and_restarts(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "my name is Grace")
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(2, conv)[1] == "Your name is Grace."
    bot.terminate()
    bot.start()
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(3, conv)[2] == "Your name is Grace."


def test_a_redelivered_activity_is_answered_once(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    activity = say(bot, conn, conv, "my name is Ada")
    status, _ = bot.post_activity(activity)
    assert status == 201
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "what is my name?")  # a later message proves the duplicate was not queued behind
    texts = conn.wait_for_texts(2, conv)
    time.sleep(0.5)
    assert texts == ["Nice to meet you, Ada. I'll remember that.", "Your name is Ada."]
    assert len(conn.texts(conv)) == 2


def test_sigkill_between_ingest_and_reply_loses_nothing(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "think for 3 seconds")  # acknowledged: 201 means it is in the inbox
    time.sleep(0.5)
    bot.kill()  # mid-turn: the model is still "thinking", nothing committed
    assert conn.messages(conv) == []
    bot.start()
    [reply] = conn.wait_for_texts(1, conv, timeout=15)
    assert reply == "I thought about it for 3 seconds."
    time.sleep(1)
    assert len(conn.texts(conv)) == 1


def test_sigkill_with_a_reply_waiting_in_the_outbox(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    conn.fail_next(1000, 503)  # the connector is down: the committed reply stays in the outbox
    say(bot, conn, conv, "my name is Linus")
    conn.wait_for(lambda c: len(c.failed) >= 2, timeout=10)
    bot.kill()
    conn.fail_next(0, 200)
    bot.start()
    [reply] = conn.wait_for_texts(1, conv, timeout=15)
    assert reply == "Nice to meet you, Linus. I'll remember that."
    time.sleep(1)
    assert len(conn.texts(conv)) == 1


def test_mention_is_stripped_in_a_teams_channel(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    activity = teams_channel_mention("my name is Bob", conversation_id=conv, service_url=conn.url)
    status, body = bot.post_activity(activity)
    assert status == 201, body
    [reply] = conn.wait_for_texts(1, conv)
    assert reply == "Nice to meet you, Bob. I'll remember that."


def test_help_and_reset_with_confirmation(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "help")
    assert "offline model" in conn.wait_for_texts(2, conv)[1]
    say(bot, conn, conv, "reset")
    assert "Reset?" in conn.wait_for_texts(3, conv)[2]
    say(bot, conn, conv, "no")
    assert conn.wait_for_texts(4, conv)[3] == "OK, I kept everything."
    say(bot, conn, conv, "/reset")
    conn.wait_for_texts(5, conv)
    bot.kill()  # the pending confirmation is durable dialog state
    bot.start()
    say(bot, conn, conv, "yes")
    assert "forgotten" in conn.wait_for_texts(6, conv)[5]
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(7, conv)[6] == "You haven't told me your name yet."


def test_another_message_ends_the_reset_question_and_is_answered(bot: BotProcess, conn: RecordingConnector,
                                                                  conv: str) -> None:
    """While "Reset?" is pending, `jobs` runs and a question goes to the agent; nothing is reset."""
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "reset")
    assert "Reset?" in conn.wait_for_texts(2, conv)[1]
    say(bot, conn, conv, "jobs")
    conn.wait_for(lambda c: any("No background jobs" in str(m.get("attachments")) for m in c.messages(conv)))
    say(bot, conn, conv, "reset")
    assert "Reset?" in conn.wait_for_texts(3, conv)[2]
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(4, conv)[3] == "Your name is Ada."
    say(bot, conn, conv, "yes")  # the question was dropped: this is no confirmation
    conn.wait_for_texts(5, conv)
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(6, conv)[5] == "Your name is Ada."
    assert not any("forgotten" in t for t in conn.texts(conv)), conn.texts(conv)


def test_unknown_slash_command_gets_a_helpful_answer(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "/frobnicate")
    [reply] = conn.wait_for_texts(1, conv)
    assert "don't know the command" in reply and "`help`" in reply


@pytest.mark.parametrize(
    ("body", "content_type", "status", "phrase"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b'{"type": "message", "text": "hi"}', "application/json", 400, "conversation.id"),
        (b'{"type": "message", "conversation": {"id": "c"}}', "application/json", 400, "serviceUrl"),
        (b'{"type": 7, "conversation": {"id": "c"}, "serviceUrl": "http://x"}', "application/json", 400, "'type'"),
        (b'{"type": "message"}', "text/plain", 415, "application/json"),
        (b'{"text": "' + b"x" * 300_000 + b'"}', "application/json", 413, "limit"),
    ],
)
def test_bad_input_gets_a_clear_4xx_and_stores_nothing(bot: BotProcess, stored: StoreProbe, body: bytes,
                                                      content_type: str, status: int, phrase: str) -> None:
    got, text = bot.post_activity({}, raw_body=body, content_type=content_type)
    assert got == status, text
    assert phrase in text
    assert stored.stored_item_count() == 0


def test_health(bot: BotProcess) -> None:
    assert bot.get("/healthz") == (200, '{"status": "ok"}')


def test_sigterm_finishes_the_turn_in_flight_and_a_restart_loses_nothing(bot: BotProcess, conn: RecordingConnector,
                                                                        conv: str) -> None:
    say(bot, conn, conv, "think for 2 seconds")
    time.sleep(0.5)
    assert bot.terminate() == 0, bot.log_tail()  # graceful: the turn in flight completes first
    assert conn.texts(conv) == ["I thought about it for 2 seconds."]
    bot.start()
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(2, conv)
    time.sleep(0.5)
    assert conn.texts(conv) == ["I thought about it for 2 seconds.", "Nice to meet you, Ada. I'll remember that."]
