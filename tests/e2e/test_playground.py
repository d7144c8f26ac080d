"""The real app process driven by Microsoft's Agents Playground (a local Teams emulator), headless.

The Playground sends genuine Teams-shaped activities (``msteams``, Teams channelData, mention
entities, channel thread ids ``CHANNEL;messageid=N``) and hosts the Bot Connector the bot
replies to, so these tests cover what the hand-made activities of ``test_conversation.py``
cannot: that the bot understands what Teams-like clients really send, and that its replies
and proactive messages are accepted and shown.
"""

from __future__ import annotations

import re
import time

import pytest

from harness.playground import Playground, message_text, playground_available

pytestmark = pytest.mark.e2e

_UNAVAILABLE = playground_available()
if _UNAVAILABLE is not None:
    pytest.skip(_UNAVAILABLE, allow_module_level=True)


@pytest.fixture
def bot_env() -> dict[str, str]:
    """Overrides conftest's: the background job of ``activate line`` takes 3 seconds."""
    return {"ACTIVATE_LINE_SECONDS": "3"}


def quiet_then_texts(pg: Playground, conversation_id: str, settle: float = 0.5) -> list[str]:
    """The conversation's texts once nothing more has arrived for ``settle`` seconds."""
    time.sleep(settle)
    return pg.texts(conversation_id)


def test_install_in_personal_chat_welcomes_once(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.install(personal)
    [welcome] = pg.wait_for_messages(1, personal)
    assert "Hi!" in message_text(welcome)
    assert welcome["attachments"][0]["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert welcome["from"]["id"] == pg.bot_id
    # The Playground sends installationUpdate *and* conversationUpdate(membersAdded): one welcome.
    assert {a["type"] for a in pg.activities_to_bot(conversation_id=personal)} == {
        "installationUpdate",
        "conversationUpdate",
    }
    assert len(quiet_then_texts(pg, personal, 1.0)) == 1


def test_a_message_gets_a_reply_with_typing(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.send(personal, "think for 1 seconds")  # slower than FIRST_INDICATOR_DELAY: typing first
    [reply] = pg.wait_for_messages(1, personal)
    assert "thought about it for 1 seconds" in reply["text"]
    assert pg.events("typing", personal), "no typing indicator reached the Playground"


def test_the_name_is_remembered(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.send(personal, "my name is Ada")
    pg.wait_for_text(personal, "Nice to meet you, Ada. I'll remember that.")
    pg.send(personal, "what is my name?")
    pg.wait_for_text(personal, "Your name is Ada.")
    assert quiet_then_texts(pg, personal) == ["Nice to meet you, Ada. I'll remember that.", "Your name is Ada."]


def test_activate_line_answers_now_and_reports_completion_proactively(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.install(personal)
    pg.wait_for_messages(1, personal)  # the welcome, so it cannot interleave below
    pg.send(personal, "activate line 555-0100")
    ack = pg.wait_for_text(personal, lambda t: t.startswith("I've started activating line 555-0100"))
    match = re.search(r"\(job `(\w+)`\)", ack["text"])
    assert match, ack["text"]
    job_id = match.group(1)
    pg.wait_for_text(personal, f"✅ Line 555-0100 is active (job `{job_id}`).", timeout=20)
    time.sleep(0.5)
    texts = pg.texts(personal, cards=False)  # the live job card is checked in test_job_cards
    assert texts == [ack["text"], f"✅ Line 555-0100 is active (job `{job_id}`)."]
    # It came on its own: the user sent nothing after the request.
    assert [a["text"] for a in pg.activities_to_bot("message", personal)] == ["activate line 555-0100"]


def test_group_chat_reply_to_a_mention_with_the_mention_stripped(pg: Playground) -> None:
    group = pg.chats.group
    pg.send(group, "my name is Bob", mention_bot=True)
    pg.wait_for_text(group, "Nice to meet you, Bob. I'll remember that.")
    [sent] = pg.activities_to_bot("message", group)
    assert sent["text"] == f"<at>{pg.bot_name}</at> my name is Bob"
    assert sent["conversation"]["conversationType"] == "groupChat"
    pg.send(group, "my name is Zed")  # no mention: the Playground does not forward it
    pg.send(group, "what is my name?", mention_bot=True)
    pg.wait_for_text(group, "Your name is Bob.")
    assert quiet_then_texts(pg, group) == ["Nice to meet you, Bob. I'll remember that.", "Your name is Bob."]


def test_team_channel_reply_in_the_thread_with_the_mention_stripped(pg: Playground) -> None:
    channel = pg.chats.channel
    post = pg.send(channel, "my name is Bob", mention_bot=True)
    assert post.post_conversation_id == f"{channel};messageid={post.message_id}"
    pg.wait_for_text(post.conversation_id, "Nice to meet you, Bob. I'll remember that.")
    [sent] = pg.activities_to_bot("message", post.conversation_id)
    assert sent["conversation"]["conversationType"] == "channel"
    assert sent["channelData"]["team"]["id"] == pg.chats.team
    # A reply in the same thread, and a command (exact match needed) prove the mention was stripped.
    pg.send(post.conversation_id, "what is my name?", mention_bot=True)
    pg.wait_for_text(post.conversation_id, "Your name is Bob.")
    pg.send(post.conversation_id, "help", mention_bot=True)
    pg.wait_for_text(post.conversation_id, lambda t: "offline model" in t and "`reset`" in t)
    assert len(quiet_then_texts(pg, post.conversation_id)) == 3


def test_reset_confirmation_in_a_group_chat(pg: Playground) -> None:
    """The yes/no prompt is one Adaptive Card whose Yes / No are Action.Submit (the Playground
    supports no imBack); pressing No keeps, a mentioned "yes" confirms."""
    group = pg.chats.group
    pg.send(group, "my name is Bob", mention_bot=True)
    pg.wait_for_messages(1, group)
    pg.send(group, "reset", mention_bot=True)
    buttons = pg.wait_for_text(group, lambda t: "Reset?" in t)  # one card: the question and its buttons
    [card] = buttons["attachments"]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    actions = card["content"]["actions"]
    assert [(a["type"], a["title"]) for a in actions] == [("Action.Submit", "Yes"), ("Action.Submit", "No")]
    assert [a["data"] for a in actions] == [{"say": "yes"}, {"say": "no"}]
    pg.submit(group, buttons["messageId"], actions[1]["data"])  # what pressing No sends in the Playground
    pg.wait_for_text(group, "OK, I kept everything.")
    pg.send(group, "reset", mention_bot=True)
    pg.wait_for(lambda p: sum("Reset?" in message_text(m) for m in p.messages(group)) == 2)
    pg.send(group, "Yes", mention_bot=True)  # typing the answer works as well
    pg.wait_for_text(group, lambda t: "forgotten" in t)
    pg.send(group, "what is my name?", mention_bot=True)
    pg.wait_for_text(group, "You haven't told me your name yet.")


def test_no_typing_indicator_after_a_command_answered_inline(pg: Playground) -> None:
    personal = pg.chats.personal
    pg.send(personal, "help")
    [answer] = pg.wait_for_messages(1, personal)
    time.sleep(1.0)
    answered_at = next(e.time for e in pg.events("createMessage", personal))
    late_typing = [e for e in pg.events("typing", personal) if e.time > answered_at]
    assert late_typing == [], f"typing shown after the answer {answer['text'][:40]!r}"
