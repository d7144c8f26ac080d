"""The Teams stream on its own (bot/streaming.py), with a fake channel and short intervals: what it
sends and when it stops. The protocol against the recording connector is tests/e2e/test_streaming.py."""

from __future__ import annotations

import asyncio

from agent.outgoing import MAX_TEXT_UNITS, ai_message
from bot.streaming import MAX_INFORMATIVE_CHARS, FinalMessages, TeamsReplyStreams, TeamsStream
from runtime.protocol import DeliveryError
from storage.abc import JSON

REFERENCE = {"channelId": "msteams", "conversation": {"id": "a:1", "conversationType": "personal"}}


class Channel:
    def __init__(self, failures: list[DeliveryError] | None = None) -> None:
        self.sent: list[JSON] = []
        self.failures = failures or []

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(activity)
        return "stream-1" if len(self.sent) == 1 else f"id-{len(self.sent)}"

    async def typing(self, reference: JSON) -> None:
        return None


def stream(channel: Channel, started: list[str]) -> TeamsStream:
    async def on_started(stream_id: str) -> None:
        started.append(stream_id)

    return TeamsStream(channel, REFERENCE, on_started, first_delay=0.05, interval=0.05, max_seconds=60)


async def test_a_turn_that_ends_before_the_first_delay_sends_nothing() -> None:
    channel, started = Channel(), list[str]()
    s = stream(channel, started)
    s.text("Hello")
    outcome = await s.finish()
    assert channel.sent == [] and started == [] and outcome.stream_id is None


async def test_the_stream_id_is_recorded_before_any_text_and_updates_only_extend() -> None:
    channel, started = Channel(), list[str]()
    s = stream(channel, started)
    s.informative("x" * 5000)
    s.text("Hello")
    await asyncio.sleep(0.08)
    assert started == ["stream-1"] and [a["entities"][0]["streamType"] for a in channel.sent] == ["informative"]
    assert len(channel.sent[0]["text"]) == MAX_INFORMATIVE_CHARS
    s.text("Goodbye")  # not an extension of what was shown: ignored
    await asyncio.sleep(0.1)
    s.text("Hello world")
    await asyncio.sleep(0.1)
    outcome = await s.finish()
    assert [a["text"] for a in channel.sent[1:]] == ["Hello", "Hello world"][-len(channel.sent[1:]):]
    assert channel.sent[-1]["text"] == "Hello world"
    assert [a["entities"][0]["streamSequence"] for a in channel.sent] == list(range(1, len(channel.sent) + 1))
    assert outcome.stream_id == "stream-1"


async def test_text_too_long_for_one_message_is_no_longer_streamed_the_final_carries_it() -> None:
    channel, started = Channel(), list[str]()
    s = stream(channel, started)
    await asyncio.sleep(0.08)
    s.text("a" * 100)
    await asyncio.sleep(0.1)
    s.text("a" * (MAX_TEXT_UNITS + 1))
    await asyncio.sleep(0.15)
    outcome = await s.finish()
    assert max(len(a["text"]) for a in channel.sent) == 100
    assert outcome.stream_id == "stream-1"  # still open: the final message closes it


async def test_a_permanent_refusal_ends_the_stream_and_the_answer_goes_plain() -> None:
    channel, started = Channel(), list[str]()
    s = stream(channel, started)
    await asyncio.sleep(0.08)
    channel.failures.append(DeliveryError("403 ContentStreamNotAllowed", permanent=True))
    s.text("Hello")
    await asyncio.sleep(0.15)
    s.text("Hello world")
    await asyncio.sleep(0.1)
    outcome = await s.finish()
    assert len(channel.sent) == 1 and outcome.stream_id is None


async def test_a_final_message_teams_refuses_is_sent_once_more_without_its_stream() -> None:
    channel = Channel([DeliveryError("403 ContentStreamNotAllowed", permanent=True)])
    seen: list[str] = []

    async def on_ai_sent(reference: JSON, message_ids: list[str]) -> None:
        seen.extend(message_ids)

    sent_id = await FinalMessages(channel, on_ai_sent).send(REFERENCE, ai_message("All done.", stream_id="s-9"))
    [plain] = channel.sent
    assert plain["text"] == "All done." and all(e["type"] != "streaminfo" for e in plain["entities"])
    assert sent_id is not None and sorted(seen) == sorted({sent_id, "s-9"})  # feedback may name either


async def test_a_conversation_that_refuses_its_first_stream_is_not_streamed_to_again() -> None:
    channel = Channel([DeliveryError("403 ContentStreamNotAllowed", permanent=True)])
    streams = TeamsReplyStreams(channel, first_delay=0.01, interval=0.05)
    assert streams.streams_to(REFERENCE)

    async def on_started(stream_id: str) -> None:
        raise AssertionError("no stream was opened")

    s = streams.open(REFERENCE, on_started)
    await asyncio.sleep(0.05)
    assert (await s.finish()).stream_id is None
    assert not streams.streams_to(REFERENCE)  # typing and one message from now on, in this process
    assert streams.streams_to({**REFERENCE, "conversation": {"id": "a:2", "conversationType": "personal"}})


async def test_a_throttled_update_waits_then_sends_the_latest_text_with_the_same_sequence_number() -> None:
    channel, started = Channel(), list[str]()
    s = stream(channel, started)
    await asyncio.sleep(0.08)  # the informative update opened the stream
    channel.failures.append(DeliveryError("429 Throttled", permanent=False, retry_after=0.2))
    s.text("Hello")
    await asyncio.sleep(0.1)  # the chunk was refused; waiting out Retry-After
    s.text("Hello again")
    assert len(channel.sent) == 1
    await asyncio.sleep(0.3)
    outcome = await s.finish()
    assert [a["text"] for a in channel.sent] == ["Thinking…", "Hello again"]  # "Hello" was never shown
    assert [a["entities"][0]["streamSequence"] for a in channel.sent] == [1, 2]
    assert outcome.stream_id == "stream-1"
