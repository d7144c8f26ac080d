"""The processor's side of a streamed reply (issue 15), with a fake stream: the stream id noted on
the event is what a redone or re-run turn closes, never a second stream."""

from __future__ import annotations

from typing import Any

from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from runtime.protocol import STREAM_NOTE, StreamOutcome, StreamStarted
from storage.abc import JSON, ConversationRecord, InboxEvent
from storage.memory import MemoryStore
from tests.agent.test_processor import FakeSender

KEY = "msteams:a:1"
REFERENCE = {"channelId": "msteams", "conversation": {"id": "a:1", "conversationType": "personal"},
             "serviceUrl": "http://127.0.0.1:9/"}


class FakeStream:
    def __init__(self, on_started: StreamStarted, stream_id: str) -> None:
        self._on_started, self.stream_id, self.texts = on_started, stream_id, list[str]()

    def informative(self, text: str) -> None:
        pass

    def text(self, so_far: str) -> None:
        self.texts.append(so_far)

    async def finish(self) -> StreamOutcome:
        await self._on_started(self.stream_id)  # as if the first send had opened it
        return StreamOutcome(stream_id=self.stream_id)


class FakeStreams:
    def __init__(self) -> None:
        self.opened: list[FakeStream] = []

    def streams_to(self, reference: JSON) -> bool:
        return (reference.get("conversation") or {}).get("conversationType") == "personal"

    def open(self, reference: JSON, on_started: StreamStarted) -> FakeStream:
        self.opened.append(FakeStream(on_started, f"s-{len(self.opened) + 1}"))
        return self.opened[-1]


def processor(store: MemoryStore, sender: FakeSender, streams: FakeStreams) -> ConversationProcessor:
    runner = AgentTurnRunner(OfflineChatCompletionClient(), lambda scope: [])
    return ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"), max_backoff=0.05,
                                 streams=streams)


def stream_of(activity: JSON) -> Any:
    return [e for e in activity.get("entities", ()) if e.get("type") == "streaminfo"]


async def test_a_redone_turn_closes_the_stream_the_first_run_opened() -> None:
    store, sender, streams = MemoryStore(), FakeSender(), FakeStreams()
    await store.save_reference(KEY, REFERENCE)
    await store.append_event(KEY, InboxEvent(id="m1", kind="message", payload={"text": "my name is Ada"}))
    original_commit = store.commit
    raced = False

    async def racing_commit(record: ConversationRecord, **kwargs: Any) -> ConversationRecord:
        nonlocal raced
        if not raced:  # another writer moves first, once: the turn is redone
            raced = True
            await original_commit(await store.load(KEY), processed=[])
        return await original_commit(record, **kwargs)

    store.commit = racing_commit  # type: ignore[method-assign]
    p = processor(store, sender, streams)
    p.wake(KEY)
    await p.idle()
    assert [s.stream_id for s in streams.opened] == ["s-1"]  # the redo opened none
    assert streams.opened[0].texts[-1] == "Nice to meet you, Ada. I'll remember that."
    [reply] = sender.sent
    assert stream_of(reply) == [{"type": "streaminfo", "streamType": "final", "streamId": "s-1"}]
    assert (await store.get_event(KEY, "m1")).payload[STREAM_NOTE]["id"] == "s-1"  # type: ignore[union-attr]


async def test_a_stream_noted_long_ago_is_not_closed_the_answer_goes_plain() -> None:
    store, sender, streams = MemoryStore(), FakeSender(), FakeStreams()
    await store.save_reference(KEY, REFERENCE)
    await store.append_event(KEY, InboxEvent(id="m1", kind="message", payload={
        "text": "my name is Ada", STREAM_NOTE: {"id": "s-old", "at": 1.0}}))  # a crash, days before
    p = processor(store, sender, streams)
    p.wake(KEY)
    await p.idle()
    assert streams.opened == []
    [reply] = sender.sent
    assert stream_of(reply) == [] and reply["text"] == "Nice to meet you, Ada. I'll remember that."
