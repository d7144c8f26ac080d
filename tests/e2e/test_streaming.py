"""Replies like a Teams AI agent (issue 15), seen from the recording connector: the Teams streaming
protocol in one-on-one chats, the AI label and feedback buttons on model-written messages, the
feedback invoke, and a stream that survives a SIGKILL.

One bot serves the protocol tests (``STREAM_MAX_SECONDS=4`` so the two-minute path takes seconds);
the crash tests start their own.
"""

from __future__ import annotations

import itertools
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.offline_model import DURABILITY
from harness import fake_openai as fm
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess, HttpEndpoint, http_request
from harness.connector import Recorded, RecordingConnector
from harness.fake_openai import FakeOpenAI
from tests.e2e.conftest import Launch

pytestmark = [pytest.mark.e2e]

INTERVAL = 1.0
MAX_SECONDS = 4.0


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def streaming_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BotProcess]:
    bot = BotProcess(tmp_path_factory.mktemp("streaming-bot"),
                     env={"STREAM_MAX_SECONDS": f"{MAX_SECONDS:g}", "STREAM_INTERVAL_SECONDS": f"{INTERVAL:g}",
                          "TOOL_MODULES": "jobs.activate_line,harness.sourced_tool"}).start()
    yield bot
    bot.kill()


@pytest.fixture
def sbot(streaming_bot: BotProcess, request: pytest.FixtureRequest) -> Iterator[BotProcess]:
    yield streaming_bot
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(streaming_bot.log_tail(120))


def say(bot: HttpEndpoint, conn: RecordingConnector, conv: str, text: str, *, conversation_type: str = "personal",
        activity_id: str | None = None) -> None:
    activity = message(text, conversation_id=conv, service_url=conn.url, channel_id="msteams",
                       conversation_type=conversation_type, activity_id=activity_id)
    status, body = bot.post_activity(activity)
    assert status == 201, body


def entity(activity: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    for e in (activity or {}).get("entities") or ():
        if e.get("type") == kind:
            return dict(e)
    return None


def ai_labelled(activity: dict[str, Any]) -> bool:
    ai = entity(activity, "https://schema.org/Message")
    return bool(ai and ai.get("additionalType") == ["AIGeneratedContent"]
                and (activity.get("channelData") or {}).get("feedbackLoopEnabled") is True)


def final_message(conn: RecordingConnector, conv: str, timeout: float = 20.0) -> Recorded:
    conn.wait_for(lambda c: any(e.activity and e.activity.get("type") == "message" for e in c.delivered(conv)),
                  timeout)
    return next(e for e in conn.delivered(conv) if e.activity and e.activity.get("type") == "message")


def assert_stream_protocol(chunks: list[Recorded]) -> str:
    """Sequence from 1 by one, the first without a stream id and every later one with the id it
    returned, informative before streaming, each streamed text extending the one before, and the
    next send never sooner than the interval after the previous one. Returns the stream id."""
    assert chunks, "nothing was streamed"
    infos = [entity(c.activity, "streaminfo") for c in chunks]
    assert all(c.activity and c.activity["type"] == "typing" for c in chunks)
    assert [i["streamSequence"] for i in infos if i] == list(range(1, len(chunks) + 1))
    assert infos[0] is not None and "streamId" not in infos[0] and infos[0]["streamType"] == "informative"
    stream_id = chunks[0].response_id
    assert stream_id and all(i and i["streamId"] == stream_id for i in infos[1:])
    kinds = [i["streamType"] for i in infos if i]
    assert kinds == sorted(kinds, key=lambda k: k != "informative"), kinds  # no update after the text began
    texts = [c.activity["text"] for c in chunks if c.activity and entity(c.activity, "streaminfo")
             and entity(c.activity, "streaminfo")["streamType"] == "streaming"]  # type: ignore[index]
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(texts)), texts
    gaps = [b.time - a.time for a, b in itertools.pairwise(chunks)]
    assert all(gap >= INTERVAL * 0.9 for gap in gaps), gaps  # our pacing (a floor), not our speed
    return stream_id


def test_a_personal_chat_streams_the_answer_and_one_labelled_message_closes_it(
        sbot: BotProcess, conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "think for 3 seconds")
    final = final_message(conn, conv)
    chunks = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"]
    stream_id = assert_stream_protocol(chunks)
    assert len(chunks) >= 3, [c.activity for c in chunks]  # "Thinking…", then at least two texts
    assert chunks[0].activity and chunks[0].activity["text"] == "Thinking…"
    assert final.activity is not None and final.activity["text"] == "I thought about it for 3 seconds."
    assert entity(final.activity, "streaminfo") == {"type": "streaminfo", "streamType": "final",
                                                   "streamId": stream_id}  # no sequence on the final
    assert ai_labelled(final.activity)
    assert final.time > chunks[-1].time
    time.sleep(0.5)
    assert conn.texts(conv) == ["I thought about it for 3 seconds."]  # one message, nothing after it
    assert not conn.activities("typing", conv)[len(chunks):]


@pytest.mark.parametrize("conversation_type", ["groupChat", "channel"])
def test_group_chats_and_channels_get_typing_and_one_message(sbot: BotProcess, conn: RecordingConnector,
                                                             conversation_type: str) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "think for 2 seconds", conversation_type=conversation_type)
    final = final_message(conn, conv)
    assert conn.stream_sends(conv) == []
    assert conn.activities("typing", conv), "no typing indicator"
    assert final.activity is not None and ai_labelled(final.activity)
    assert final.activity["text"] == "I thought about it for 2 seconds."


def test_a_fast_answer_streams_nothing_and_fixed_texts_carry_no_label(sbot: BotProcess,
                                                                      conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "my name is Ada")
    final = final_message(conn, conv)
    say(sbot, conn, conv, "help")  # a command: the bot's own text, not the model's
    conn.wait_for_messages(2, conv)
    time.sleep(0.3)
    assert conn.stream_sends(conv) == [] and conn.activities("typing", conv) == []
    assert final.activity is not None and ai_labelled(final.activity)
    assert entity(final.activity, "streaminfo") is None
    help_message = conn.messages(conv)[1]
    assert not ai_labelled(help_message) and entity(help_message, "https://schema.org/Message") is None


def test_403_ends_the_stream_and_the_whole_answer_arrives_as_a_new_message(sbot: BotProcess,
                                                                           conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    conn.fail_stream(1, 403, stream_type="streaming", code="ContentStreamNotAllowed")
    say(sbot, conn, conv, "think for 3 seconds")
    final = final_message(conn, conv)
    [refused] = conn.failed
    assert refused.status == 403 and entity(refused.activity, "streaminfo")["streamType"] == "streaming"  # type: ignore[index]
    sent = conn.stream_sends(conv)
    assert [entity(e.activity, "streaminfo")["streamType"] for e in sent] == ["informative"]  # type: ignore[index]
    assert all(e.time < refused.time for e in sent)  # nothing streamed after the 403
    assert final.activity is not None and entity(final.activity, "streaminfo") is None
    assert final.activity["text"] == "I thought about it for 3 seconds." and ai_labelled(final.activity)
    assert len(conn.messages(conv)) == 1


def test_429_waits_and_the_stream_goes_on(sbot: BotProcess, conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    conn.fail_stream(1, 429, stream_type="streaming", code="Throttled", headers={"Retry-After": "1"})
    say(sbot, conn, conv, "think for 4 seconds")
    final = final_message(conn, conv)
    [throttled] = conn.failed
    assert throttled.status == 429
    chunks = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"]
    stream_id = assert_stream_protocol(chunks)  # the refused send used no sequence number
    assert any(c.time > throttled.time + 0.9 for c in chunks), "nothing streamed after the 429"
    assert entity(final.activity, "streaminfo") == {"type": "streaminfo", "streamType": "final", "streamId": stream_id}


def test_the_time_limit_closes_the_stream_and_the_rest_follows(sbot: BotProcess, conn: RecordingConnector) -> None:
    """STREAM_MAX_SECONDS (Teams: two minutes) is 4 s here; the answer takes about 10 s to write."""
    conv = new_conversation_id()
    say(sbot, conn, conv, "explain durability")
    conn.wait_for(lambda c: len(c.messages(conv)) >= 2, timeout=30)
    closing, rest = conn.messages(conv)
    chunks = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"]
    stream_id = assert_stream_protocol(chunks)
    assert entity(closing, "streaminfo") == {"type": "streaminfo", "streamType": "final", "streamId": stream_id}
    assert closing["text"].endswith(" …") and entity(rest, "streaminfo") is None
    assert chunks[-1].time - chunks[0].time <= MAX_SECONDS + INTERVAL
    shown = closing["text"].removesuffix(" …")
    assert chunks[-1].activity and chunks[-1].activity["text"] == shown  # closed with what was shown
    assert rest["text"].startswith("…") and shown + rest["text"][1:] == DURABILITY  # the whole answer, once
    assert ai_labelled(closing) and ai_labelled(rest)


def test_a_tool_is_announced_and_its_sources_become_citations(sbot: BotProcess, conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "look up durability")
    final = final_message(conn, conv)
    chunks = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"]
    assert chunks and chunks[0].activity and chunks[0].activity["text"] == "Starting look_up…"
    assert final.activity is not None and "[1]" in final.activity["text"] and "[2]" in final.activity["text"]
    ai = entity(final.activity, "https://schema.org/Message")
    assert ai is not None and ai["additionalType"] == ["AIGeneratedContent"]
    first, second = ai["citation"]  # only the two the text cites, of the 25 the tool returned
    assert first == {"@type": "Claim", "position": 1, "appearance": {
        "@type": "DigitalDocument", "name": "Durable execution", "abstract": "What survives a crash.",
        "url": "https://example.com/durable", "keywords": ["durability", "a keyword far longer than t…", "inbox"]}}
    assert second["position"] == 2
    assert second["appearance"]["name"] == "The outbox  pattern"  # control characters gone
    assert "url" not in second["appearance"]  # a javascript: URL is dropped
    assert len(second["appearance"]["abstract"]) == 160


def invoke_feedback(bot: BotProcess, conn: RecordingConnector, conv: str, reply_to: str | None,
                    value: Any) -> tuple[int, str]:
    activity = message("", conversation_id=conv, service_url=conn.url, channel_id="msteams",
                       reply_to_id=reply_to)
    activity.update(type="invoke", name="message/submitAction", value=value)
    activity["from"]["aadObjectId"] = "aad-ada"
    activity.pop("text")
    return bot.post_activity(activity)


def stored_feedback(bot: BotProcess, conv: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"conversation": f"msteams:{conv}"})
    status, body = http_request(f"{bot.base_url}/feedback?{query}")
    assert status == 200, body
    return list(json.loads(body)["feedback"])


def like(comment: Any = "") -> dict[str, Any]:
    return {"actionName": "feedback", "actionValue": {"reaction": "like",
                                                     "feedback": json.dumps({"feedbackText": comment})}}


def test_feedback_is_stored_with_the_message_it_is_about(sbot: BotProcess, conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "think for 2 seconds")
    answer = final_message(conn, conv)
    assert answer.response_id
    status, body = invoke_feedback(sbot, conn, conv, answer.response_id, like("Clear and short"))
    assert status == 200, body
    [entry] = stored_feedback(sbot, conv)
    assert entry["message_id"] == answer.response_id and entry["reaction"] == "like"
    assert entry["comment"] == "Clear and short"
    assert entry["by"] == {"aadObjectId": "aad-ada", "id": "user-1", "name": "Ada"}
    assert abs(entry["at"] - time.time()) < 60
    # The same person changes their mind: one entry, the latest.
    dislike = {"actionName": "feedback", "actionValue": {"reaction": "dislike", "feedback": ""}}
    assert invoke_feedback(sbot, conn, conv, answer.response_id, dislike)[0] == 200
    [entry] = stored_feedback(sbot, conv)
    assert entry["reaction"] == "dislike" and entry["comment"] == ""
    metrics = http_request(f"{sbot.base_url}/metrics")[1]
    assert 'teams_agent_feedback_total{outcome="like"}' in metrics
    assert 'teams_agent_feedback_total{outcome="dislike"}' in metrics


def test_hostile_feedback_gets_a_clear_answer_and_damages_nothing(sbot: BotProcess, conn: RecordingConnector) -> None:
    conv = new_conversation_id()
    say(sbot, conn, conv, "my name is Ada")
    answer = final_message(conn, conv)
    assert answer.response_id
    # A message the bot never sent, none at all, a malformed value: refused, nothing stored.
    assert invoke_feedback(sbot, conn, conv, "made-up-id", like("x"))[0] == 404
    assert invoke_feedback(sbot, conn, conv, "x" * 300, like("x"))[0] == 400
    for value in ({"actionName": "feedback", "actionValue": {"reaction": "love"}}, {"actionName": "other"},
                  "not an object", {"actionName": "feedback", "actionValue": {"reaction": "like", "feedback": 7}}):
        status, body = invoke_feedback(sbot, conn, conv, answer.response_id, value)
        assert status == 400, (value, body)
        assert "Traceback" not in body
    assert stored_feedback(sbot, conv) == []
    # A huge comment is clipped, with control characters removed.
    status, _ = invoke_feedback(sbot, conn, conv, answer.response_id, like("\u202ebad\x00" + "a" * 100_000))
    assert status == 200
    [entry] = stored_feedback(sbot, conv)
    assert entry["comment"] == "bad" + "a" * 997 + "…"
    say(sbot, conn, conv, "what is my name?")  # the conversation goes on
    assert conn.wait_for_texts(2, conv)[1] == "Your name is Ada."


def test_an_openai_model_streams_through_the_same_protocol(launch: Launch, conn: RecordingConnector,
                                                           fake: FakeOpenAI) -> None:
    """The OpenAI path: the request asks for a stream (with usage), the fake server answers with
    server-sent events word by word, and the words reach Teams as growing chunks."""
    answer = "Streaming works through the real OpenAI client, one word after another, to the very end."
    fake.set_responder(lambda request: fm.text(answer, chunk_delay=0.25))
    bot = launch({"OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": fake.openai_base_url, "OPENAI_MODEL": "e2e-model",
                  "NO_PROXY": "127.0.0.1,localhost"})
    conv = new_conversation_id()
    say(bot, conn, conv, "tell me something")
    final = final_message(conn, conv)
    [request] = fake.chat_requests()
    assert request.body is not None and request.body["stream"] is True
    assert request.body["stream_options"] == {"include_usage": True}  # the budgets still count tokens
    chunks = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"]
    stream_id = assert_stream_protocol(chunks)
    texts = [c.activity["text"] for c in chunks[1:] if c.activity]
    assert len(texts) >= 2 and all(answer.startswith(t) for t in texts), texts
    assert final.activity is not None and final.activity["text"] == answer and ai_labelled(final.activity)
    assert entity(final.activity, "streaminfo") == {"type": "streaminfo", "streamType": "final", "streamId": stream_id}


# --- a stream that survives a crash ---
@pytest.mark.parametrize("backend", ["sqlite", "cosmos"], indirect=True)  # the note is a store write
def test_sigkill_mid_stream_the_rerun_turn_finishes_that_stream(launch: Launch, conn: RecordingConnector,
                                                                 tmp_path: Path) -> None:
    conv = new_conversation_id()
    bot = launch({"CRASH_AT": "stream_chunk_sent:2"})
    say(bot, conn, conv, "think for 4 seconds")
    bot.wait_exited(20)
    assert not bot.alive, "the process never reached crash point stream_chunk_sent"
    before = conn.stream_sends(conv)
    assert len(before) == 3 and conn.messages(conv) == []  # "Thinking…" and two chunks, then the crash
    stream_id = before[0].response_id
    bot.extra_env.pop("CRASH_AT")
    bot.start()
    final = final_message(conn, conv)
    time.sleep(1.0)
    assert conn.texts(conv) == ["I thought about it for 4 seconds."]  # one complete answer, no second one
    assert entity(final.activity, "streaminfo") == {"type": "streaminfo", "streamType": "final", "streamId": stream_id}
    assert final.activity is not None and ai_labelled(final.activity)
    after = [e for e in conn.stream_sends(conv) if e.activity and e.activity["type"] == "typing"][len(before):]
    assert after == []  # the re-run turn opened no second stream


def test_sigkill_mid_stream_then_teams_refuses_the_final_one_plain_message(launch: Launch, conn: RecordingConnector,
                                                                           tmp_path: Path) -> None:
    conv = new_conversation_id()
    bot = launch({"CRASH_AT": "stream_chunk_sent:1"})
    say(bot, conn, conv, "think for 3 seconds")
    bot.wait_exited(20)
    assert not bot.alive
    conn.fail_stream(1, 403, stream_type="final", code="ContentStreamNotAllowed")  # the stream is gone
    bot.extra_env.pop("CRASH_AT")
    bot.start()
    final = final_message(conn, conv)
    time.sleep(1.0)
    [refused] = conn.failed
    assert refused.status == 403 and entity(refused.activity, "streaminfo")["streamType"] == "final"  # type: ignore[index]
    assert conn.texts(conv) == ["I thought about it for 3 seconds."]
    assert final.activity is not None and entity(final.activity, "streaminfo") is None and ai_labelled(final.activity)
