"""storage/inbox.py: append, then wake only when the event is new."""

from __future__ import annotations

from storage.abc import InboxEvent
from storage.inbox import Inbox
from storage.memory import MemoryStore


async def test_a_new_event_wakes_a_repeat_does_not() -> None:
    store, woken = MemoryStore(), list[str]()
    await store.open()
    inbox = Inbox(store, woken.append)
    event = InboxEvent(id="a1", kind="message", payload={"text": "hi"})
    assert await inbox.post("k", event) is True
    assert await inbox.post("k", event) is False
    assert woken == ["k"]
    assert [e.id for e in await store.pending_events("k")] == ["a1"]
