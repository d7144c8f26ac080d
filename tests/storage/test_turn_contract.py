"""The contract of the two round-trip seams of issue 17, on every store: ``load_turn`` and
``remove_from_outbox`` (Cosmos: one query; a conditional patch). They must mean exactly what the
calls they replace meant (``load`` + ``pending_events`` + ``get_reference``; a ``commit`` of the
outbox without the sent messages)."""

from __future__ import annotations

import pytest

from storage.abc import ConcurrencyError, ConversationStore, InboxEvent, OutboxMessage

REFERENCE = {"conversation": {"id": "c"}, "serviceUrl": "http://127.0.0.1:9/"}


def _event(event_id: str) -> InboxEvent:
    return InboxEvent(id=event_id, kind="message", payload={"text": event_id})


async def test_load_turn_is_load_pending_and_reference(store: ConversationStore, key: str) -> None:
    empty = await store.load_turn(key)
    assert empty.record.etag is None and empty.events == [] and empty.reference is None
    await store.save_reference(key, REFERENCE)
    for event_id in ("e1", "e2", "e3"):
        await store.append_event(key, _event(event_id))
    record = await store.commit(await store.load(key), processed=["e1"])
    start = await store.load_turn(key)
    assert start.record == record
    assert [e.id for e in start.events] == ["e2", "e3"] == [e.id for e in await store.pending_events(key)]
    assert start.reference == REFERENCE


async def test_remove_from_outbox_removes_just_those_messages(store: ConversationStore, key: str) -> None:
    outbox = tuple(OutboxMessage(f"m{n}", {"type": "message", "text": f"t{n}"}) for n in range(4))
    record = await store.commit((await store.load(key)).evolve(outbox=outbox, turns=3))
    removed = await store.remove_from_outbox(record, {"m0", "m2"})
    assert removed.outbox == (outbox[1], outbox[3]) and removed.etag != record.etag
    stored = await store.load(key)
    assert stored == removed and stored.turns == 3
    assert key in await store.conversations_with_work()
    emptied = await store.remove_from_outbox(removed, {"m1", "m3"})
    assert (await store.load(key)).outbox == () == emptied.outbox
    assert key not in await store.conversations_with_work()
    # The new etag is the stored one: the next commit succeeds with it.
    await store.commit(emptied.evolve(turns=4))


async def test_remove_from_outbox_is_conditional(store: ConversationStore, key: str) -> None:
    outbox = (OutboxMessage("m0", {"type": "message", "text": "t"}), OutboxMessage("m1", {"type": "message"}))
    record = await store.commit((await store.load(key)).evolve(outbox=outbox))
    moved = await store.commit(record.evolve(turns=1))  # another writer moved first
    with pytest.raises(ConcurrencyError):
        await store.remove_from_outbox(record, {"m0"})
    assert (await store.load(key)) == moved


async def test_a_turn_loaded_with_load_turn_commits_conditionally(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("e1"))
    await store.commit(await store.load(key))
    start = await store.load_turn(key)
    await store.commit((await store.load(key)).evolve(turns=5))  # someone else's commit in between
    with pytest.raises(ConcurrencyError):
        await store.commit(start.record.evolve(turns=1), processed=[e.id for e in start.events])
    assert [e.id for e in await store.pending_events(key)] == ["e1"]


async def test_many_rounds_leave_nothing_pending(store: ConversationStore, key: str) -> None:
    """The processed bookkeeping stays right over many rounds (Cosmos: the lists are pruned as the
    flags land), as this store instance and a reader that knows nothing of it see it."""
    await store.save_reference(key, REFERENCE)
    for n in range(12):
        await store.append_event(key, _event(f"e{n}"))
        start = await store.load_turn(key)
        assert [e.id for e in start.events] == [f"e{n}"]
        reply = OutboxMessage(f"e{n}#0", {"type": "message", "text": str(n)})
        record = await store.commit(start.record.evolve(outbox=(reply,), turns=n + 1),
                                    processed=[e.id for e in start.events])
        await store.remove_from_outbox(record, {reply.id})
    assert (await store.load_turn(key)).events == []
    assert await store.pending_events(key) == [] and await store.count_pending_events(key) == 0
    assert key not in await store.conversations_with_work()
    assert (await store.load(key)).turns == 12
