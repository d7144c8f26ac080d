"""The ConversationStore contract: the same assertions over every implementation.

The ``store`` fixture (conftest.py) is parametrised over all implementations. Queries that
span conversations (``conversations_with_work``, ``unfinished_jobs``) are checked by
membership of this test's own keys, so the suite also holds on a shared server.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from storage.abc import (
    MAX_ITEM_BYTES,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    FencedWriteError,
    InboxEvent,
    ItemTooLargeError,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
    StoreUnavailableError,
)
from tests.storage.jobs import add_job

MakeKey = Callable[[str], str]


def _event(event_id: str, kind: str = "message", **payload: Any) -> InboxEvent:
    return InboxEvent(id=event_id, kind=kind, payload=payload or {"text": f"hello {event_id}"})


def _job(key: str, job_id: str, **fields: Any) -> JobRecord:
    fields.setdefault("started_by", {"id": "29:user", "name": "Ada", "aadObjectId": "aad-ada", "tenantId": "t-1",
                                     "conversationType": "groupChat"})  # who started it persists, on every path
    return JobRecord(id=job_id, conversation_key=key, tool="activate_line", arguments={"line": job_id}, **fields)


async def _pending_ids(store: ConversationStore, key: str) -> list[str]:
    return [e.id for e in await store.pending_events(key)]


async def _increment(store: ConversationStore, key: str, max_attempts: int = 500) -> int:
    """load -> bump agent_state["counter"] -> commit, retrying on ConcurrencyError."""
    for attempt in range(max_attempts):
        record = await store.load(key)
        state = dict(record.agent_state or {})
        state["counter"] = state.get("counter", 0) + 1
        await asyncio.sleep(0)  # let the other writers interleave between load and commit
        try:
            await store.commit(record.evolve(agent_state=state, turns=record.turns + 1))
            return attempt
        except ConcurrencyError:
            continue
    raise AssertionError(f"no successful commit after {max_attempts} attempts")


# --- conversation references ---


async def test_reference_round_trips(store: ConversationStore, key: str) -> None:
    reference = {"conversation": {"id": key}, "serviceUrl": "https://smba.example/", "user": {"name": "Zoë"}}
    await store.save_reference(key, reference)
    assert await store.get_reference(key) == reference


async def test_reference_save_overwrites(store: ConversationStore, key: str) -> None:
    await store.save_reference(key, {"serviceUrl": "https://old.example/"})
    await store.save_reference(key, {"serviceUrl": "https://new.example/"})
    assert await store.get_reference(key) == {"serviceUrl": "https://new.example/"}


async def test_missing_reference_is_none(store: ConversationStore, key: str) -> None:
    assert await store.get_reference(key) is None


async def test_saving_reference_does_not_touch_record_etag(store: ConversationStore, key: str) -> None:
    committed = await store.commit(ConversationRecord(key=key, agent_state={"a": 1}))
    await store.save_reference(key, {"serviceUrl": "https://x.example/"})
    assert (await store.load(key)).etag == committed.etag


async def test_a_write_under_an_older_lease_epoch_is_fenced_off(store: ConversationStore, key: str) -> None:
    """Issue 18: the worker that took the partition over (epoch 7) wrote the conversation; the one
    that lost it (epoch 5) reloads and tries again: refused, nothing written. Without a fence
    (one process) and under the same or a newer epoch, commits go on as before."""
    await store.append_event(key, _event("e1"))
    taken = await store.commit(ConversationRecord(key=key, agent_state={"by": "new"}), fence=7)
    assert (await store.load(key)).fence == 7
    late = (await store.load(key)).evolve(agent_state={"by": "old"})
    with pytest.raises(FencedWriteError):
        await store.commit(late, processed=["e1"], fence=5)
    stored = await store.load(key)
    assert (stored.etag, stored.agent_state, stored.fence) == (taken.etag, {"by": "new"}, 7)
    assert await _pending_ids(store, key) == ["e1"]
    same = await store.commit(stored.evolve(turns=1), fence=7)
    newer = await store.commit(same.evolve(turns=2), fence=9)
    assert (await store.load(key)).fence == 9
    await store.commit(newer.evolve(turns=3))  # no lease: the stored epoch stays
    assert (await store.load(key)).fence == 9


# --- inbox ---


async def test_append_event_round_trips(store: ConversationStore, key: str) -> None:
    event = InboxEvent(id="a1", kind="job_finished", payload={"job": "j1", "note": "ünïcødé ✓"}, created_at=1234.5)
    assert await store.append_event(key, event) is True
    assert await store.pending_events(key) == [event]


async def test_duplicate_event_id_is_ignored(store: ConversationStore, key: str) -> None:
    first = _event("a1", text="first")
    assert await store.append_event(key, first) is True
    assert await store.append_event(key, _event("a1", kind="reset", text="second")) is False
    assert await store.pending_events(key) == [first]


async def test_duplicate_of_processed_event_is_ignored(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("a1"))
    record = await store.load(key)
    await store.commit(record, processed=["a1"])
    assert await store.append_event(key, _event("a1")) is False
    assert await store.pending_events(key) == []


async def test_same_event_id_in_two_conversations_is_two_events(store: ConversationStore, make_key: MakeKey) -> None:
    a, b = make_key("a"), make_key("b")
    assert await store.append_event(a, _event("x", text="for a")) is True
    assert await store.append_event(b, _event("x", text="for b")) is True
    await store.commit(await store.load(a), processed=["x"])
    assert await _pending_ids(store, a) == []
    assert [e.payload for e in await store.pending_events(b)] == [{"text": "for b"}]


async def test_pending_events_keep_arrival_order(store: ConversationStore, key: str) -> None:
    ids = [f"activity-{n}" for n in range(20)]
    random.Random(20).shuffle(ids)
    assert ids != sorted(ids)
    for event_id in ids:
        await store.append_event(key, _event(event_id))
    assert await _pending_ids(store, key) == ids


async def test_pending_events_of_unknown_conversation_is_empty(store: ConversationStore, key: str) -> None:
    assert await store.pending_events(key) == []


async def test_count_pending_events_counts_only_this_conversations_unprocessed_events(
        store: ConversationStore, make_key: MakeKey) -> None:
    a, b = make_key("a"), make_key("b")
    assert await store.count_pending_events(a) == 0
    for event_id in ("e1", "e2", "e3"):
        await store.append_event(a, _event(event_id))
    await store.append_event(a, _event("e1"))  # a duplicate adds nothing
    await store.append_event(b, _event("other"))
    assert await store.count_pending_events(a) == 3
    await store.commit(await store.load(a), processed=["e1", "e2"])
    assert await store.count_pending_events(a) == 1 == len(await store.pending_events(a))
    assert await store.count_pending_events(b) == 1


async def test_has_event(store: ConversationStore, make_key: MakeKey) -> None:
    a, b = make_key("a"), make_key("b")
    assert await store.has_event(a, "e1") is False
    await store.append_event(a, _event("e1"))
    assert await store.has_event(a, "e1") is True
    assert await store.has_event(b, "e1") is False
    await store.commit(await store.load(a), processed=["e1"])
    assert await store.has_event(a, "e1") is True  # processed events still count


async def test_get_event_returns_processed_and_pending_events(store: ConversationStore, key: str) -> None:
    assert await store.get_event(key, "job:x") is None
    event = InboxEvent(id="job:x", kind="job_finished", payload={"status": "succeeded", "content": "{\"ok\": 1}"})
    await store.append_event(key, event)
    assert await store.get_event(key, "job:x") == event
    await store.commit(await store.load(key), processed=["job:x"])
    assert await store.get_event(key, "job:x") == event


# --- the conversation record ---


async def test_annotate_event_changes_only_a_pending_events_payload(store: ConversationStore, key: str) -> None:
    """The stream a turn opened is noted on its event (issue 15): read back as pending, kept in order,
    nothing else changed; a processed or unknown event is not annotated."""
    await store.append_event(key, _event("e1"))
    await store.append_event(key, _event("e2"))
    record = await store.load(key)
    assert await store.annotate_event(key, "e2", "stream", {"id": "s-1", "at": 1.5}) is True
    assert await store.annotate_event(key, "e2", "stream", {"id": "s-2", "at": 2.5}) is True  # the latest wins
    pending = await store.pending_events(key)
    assert [e.id for e in pending] == ["e1", "e2"]
    assert pending[1].payload == {"text": "hello e2", "stream": {"id": "s-2", "at": 2.5}}
    assert pending[0].payload == {"text": "hello e1"}
    assert (await store.load(key)).etag == record.etag  # the record is not touched
    await store.commit(record, processed=["e1"])
    assert await store.annotate_event(key, "e1", "stream", {"id": "late"}) is False
    assert (await store.get_event(key, "e1")).payload == {"text": "hello e1"}  # type: ignore[union-attr]
    assert await store.annotate_event(key, "nope", "stream", {"id": "x"}) is False
    assert not await store.has_event(key, "nope")
    assert await store.count_pending_events(key) == 1


async def test_load_unknown_conversation_is_empty(store: ConversationStore, key: str) -> None:
    record = await store.load(key)
    assert record == ConversationRecord(key=key)
    assert record.etag is None and record.agent_state is None and record.outbox == () and record.turns == 0


async def test_commit_new_record_assigns_etag(store: ConversationStore, key: str) -> None:
    committed = await store.commit(ConversationRecord(key=key, agent_state={"n": 1}))
    assert committed.etag is not None
    assert committed.agent_state == {"n": 1}
    again = await store.commit(committed.evolve(agent_state={"n": 2}))
    assert again.etag is not None and again.etag != committed.etag


async def test_load_returns_committed_content(store: ConversationStore, key: str) -> None:
    state = {
        "type": "TeamState",
        "agent_states": {"assistant": {"messages": [{"role": "user", "content": "Grüße, 世界 🚀"}]}},
        "numbers": [1, 2.5, -3, None, True],
        "empty": {},
    }
    outbox = (
        OutboxMessage(id="o1", activity={"type": "message", "text": "déjà vu"}),
        OutboxMessage(id="o2", activity={"type": "typing"}),
    )
    committed = await store.commit(ConversationRecord(key=key, agent_state=state, outbox=outbox, turns=7))
    loaded = await store.load(key)
    assert loaded == committed
    assert loaded.agent_state == state
    assert loaded.outbox == outbox
    assert isinstance(loaded.outbox, tuple) and all(isinstance(m, OutboxMessage) for m in loaded.outbox)
    assert loaded.turns == 7


async def test_mutating_loaded_state_does_not_change_store(store: ConversationStore, key: str) -> None:
    await store.commit(ConversationRecord(key=key, agent_state={"items": [1]}))
    loaded = await store.load(key)
    assert loaded.agent_state is not None
    loaded.agent_state["items"].append(2)
    assert (await store.load(key)).agent_state == {"items": [1]}


# --- conditional write ---


async def test_stale_etag_raises_and_changes_nothing(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("e1"))
    stale = await store.commit(ConversationRecord(key=key, agent_state={"v": 1}))
    current = await store.commit(stale.evolve(agent_state={"v": 2}))
    with pytest.raises(ConcurrencyError) as caught:
        await store.commit(stale.evolve(agent_state={"v": "lost"}), processed=["e1"], new_jobs=[_job(key, "j1")])
    assert caught.value.key == key
    assert await store.load(key) == current
    assert await _pending_ids(store, key) == ["e1"]
    assert await store.list_jobs(key) == []


async def test_etag_none_when_record_exists_raises(store: ConversationStore, key: str) -> None:
    existing = await store.commit(ConversationRecord(key=key, agent_state={"v": 1}))
    with pytest.raises(ConcurrencyError):
        await store.commit(ConversationRecord(key=key, agent_state={"v": "overwrite"}))
    assert await store.load(key) == existing


async def test_made_up_etag_for_missing_record_raises(store: ConversationStore, key: str) -> None:
    with pytest.raises(ConcurrencyError):
        await store.commit(ConversationRecord(key=key, agent_state={}, etag="not-a-real-etag"))
    assert await store.load(key) == ConversationRecord(key=key)


# --- atomic commit ---


async def test_commit_marks_exactly_the_processed_events(store: ConversationStore, key: str) -> None:
    for event_id in ["e5", "e1", "e4", "e2", "e3"]:
        await store.append_event(key, _event(event_id))
    await store.commit(await store.load(key), processed=["e1", "e2"])
    assert await _pending_ids(store, key) == ["e5", "e4", "e3"]


async def test_commit_creates_new_jobs(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("e1"))
    jobs = [_job(key, "j1", created_at=1.0, call_id="call_1"), _job(key, "j2", created_at=2.0)]
    await store.commit(await store.load(key), processed=["e1"], new_jobs=jobs)
    assert await store.list_jobs(key) == jobs
    assert await store.get_job(key, "j1") == jobs[0]


async def test_commit_ignores_unknown_processed_ids(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("e1"))
    await store.commit(await store.load(key), processed=["never-appended"])
    assert await _pending_ids(store, key) == ["e1"]
    assert await store.has_event(key, "never-appended") is False


async def test_new_jobs_do_not_overwrite_existing_job(store: ConversationStore, key: str) -> None:
    await add_job(store, _job(key, "j1"))
    running = await store.patch_job(key, "j1", {"status": "running", "attempt": 1, "progress": 0.5})
    await store.commit(await store.load(key), new_jobs=[_job(key, "j1")])
    assert await store.get_job(key, "j1") == running


# --- conversations with work ---


async def test_conversations_with_work(store: ConversationStore, make_key: MakeKey) -> None:
    pending, outbox, idle, done, bare = (make_key(n) for n in ["pending", "outbox", "idle", "done", "bare"])
    await store.append_event(pending, _event("e1"))
    await store.commit(ConversationRecord(key=outbox, outbox=(OutboxMessage("o1", {"text": "hi"}),)))
    await store.commit(ConversationRecord(key=idle, agent_state={"x": 1}))
    await store.append_event(done, _event("e1"))
    await store.commit(ConversationRecord(key=done), processed=["e1"])
    await store.save_reference(bare, {"serviceUrl": "https://x.example/"})
    work = set(await store.conversations_with_work())
    assert {pending, outbox} <= work
    assert not {idle, done, bare} & work


async def test_drained_conversation_has_no_work(store: ConversationStore, key: str) -> None:
    await store.append_event(key, _event("e1"))
    sending = await store.commit(
        ConversationRecord(key=key, outbox=(OutboxMessage("o1", {"text": "hi"}),)), processed=["e1"]
    )
    assert key in await store.conversations_with_work()
    await store.commit(sending.evolve(outbox=()))
    assert key not in await store.conversations_with_work()


# --- jobs ---


async def test_get_unknown_job_raises(store: ConversationStore, key: str) -> None:
    with pytest.raises(JobNotFoundError) as caught:
        await store.get_job(key, "nope")
    assert isinstance(caught.value, LookupError)
    assert (caught.value.key, caught.value.job_id) == (key, "nope")


async def test_job_is_scoped_to_its_conversation(store: ConversationStore, make_key: MakeKey) -> None:
    a, b = make_key("a"), make_key("b")
    await add_job(store, _job(a, "j1"))
    with pytest.raises(JobNotFoundError):
        await store.get_job(b, "j1")
    assert await store.list_jobs(b) == []


async def test_job_record_round_trips_all_fields(store: ConversationStore, key: str) -> None:
    job = JobRecord(
        id="j-1",
        conversation_key=key,
        tool="activate_line",
        arguments={"msisdn": "+491701234567", "options": {"roaming": True, "tags": ["a", "ß"]}},
        status="failed",
        call_id="call_abc",
        attempt=3,
        max_attempts=5,
        progress=0.125,
        progress_text="Schritt 2/3 …",
        result={"partial": [1, 2.5, None], "nested": {"ok": False}},
        error="Timeout: upstream did not answer",
        cancel_requested=True,
        next_retry_at=1_700_000_123.25,
        created_at=1_700_000_000.5,
        updated_at=1_700_000_100.75,
        started_at=1_700_000_001.125,
        finished_at=1_700_000_099.0625,
        card_activity_id="1:card-activity",
        started_by={"id": "29:user", "name": "Ada Lovelace", "aadObjectId": "aad-ada", "tenantId": "tenant-1",
                    "conversationType": "groupChat"},
    )
    await store.commit(await store.load(key), new_jobs=[job])
    assert await store.get_job(key, "j-1") == job
    assert await store.list_jobs(key) == [job]


async def test_patch_job_overwrites_the_patched_fields(store: ConversationStore, key: str) -> None:
    queued = _job(key, "j1")
    await add_job(store, queued)
    finished = await store.patch_job(key, "j1", {"status": "succeeded", "result": {"done": True}, "progress": 1.0})
    assert finished == replace(queued, status="succeeded", result={"done": True}, progress=1.0,
                               updated_at=finished.updated_at)
    assert finished.updated_at >= queued.updated_at
    assert await store.get_job(key, "j1") == finished
    assert await store.list_jobs(key) == [finished]


async def test_list_jobs_oldest_first(store: ConversationStore, key: str) -> None:
    jobs = {n: _job(key, f"j{n}", created_at=1_700_000_000.0 + n) for n in (3, 1, 4, 2)}
    await add_job(store, *jobs.values())
    assert [j.id for j in await store.list_jobs(key)] == ["j1", "j2", "j3", "j4"]


async def test_unfinished_jobs_are_queued_or_running_across_conversations(
    store: ConversationStore, make_key: MakeKey
) -> None:
    a, b = make_key("a"), make_key("b")
    statuses = ["queued", "running", "succeeded", "failed", "cancelled"]
    for conv in (a, b):
        await add_job(store, *(_job(conv, f"{status}-job", status=status) for status in statuses))
    mine = [j for j in await store.unfinished_jobs() if j.conversation_key in (a, b)]
    assert sorted((j.conversation_key, j.id) for j in mine) == sorted(
        (conv, f"{s}-job") for conv in (a, b) for s in ("queued", "running")
    )
    assert all(not j.finished for j in mine)


async def test_finishing_a_job_removes_it_from_unfinished(store: ConversationStore, key: str) -> None:
    await add_job(store, _job(key, "j1", status="running"))
    await store.patch_job(key, "j1", {"status": "succeeded"})
    assert [j for j in await store.unfinished_jobs() if j.conversation_key == key] == []


# --- key/value items ---


async def test_items_round_trip(store: ConversationStore, key: str) -> None:
    items = {f"{key}/dialog": {"stack": [{"id": "main", "state": {"step": 2}}], "text": "naïve"}, f"{key}/user": {}}
    await store.write_items(items)
    assert await store.read_items(list(items)) == items


async def test_write_items_overwrites(store: ConversationStore, key: str) -> None:
    await store.write_items({key: {"v": 1}})
    await store.write_items({key: {"v": 2}})
    assert await store.read_items([key]) == {key: {"v": 2}}


async def test_missing_items_are_absent(store: ConversationStore, key: str) -> None:
    await store.write_items({f"{key}/present": {"v": 1}})
    assert await store.read_items([f"{key}/present", f"{key}/missing"]) == {f"{key}/present": {"v": 1}}


async def test_read_items_accepts_any_iterable(store: ConversationStore, key: str) -> None:
    await store.write_items({f"{key}/1": {"v": 1}, f"{key}/2": {"v": 2}})
    assert await store.read_items(f"{key}/{n}" for n in (1, 2)) == {f"{key}/1": {"v": 1}, f"{key}/2": {"v": 2}}


async def test_delete_items(store: ConversationStore, key: str) -> None:
    await store.write_items({f"{key}/a": {"v": 1}, f"{key}/b": {"v": 2}})
    await store.delete_items([f"{key}/a", f"{key}/never-written"])
    assert await store.read_items([f"{key}/a", f"{key}/b"]) == {f"{key}/b": {"v": 2}}


async def test_empty_item_operations(store: ConversationStore) -> None:
    assert await store.read_items([]) == {}
    await store.write_items({})
    await store.delete_items([])


# --- concurrency ---


async def test_concurrent_read_modify_write_loses_no_update(store: ConversationStore, key: str) -> None:
    await asyncio.gather(*(_increment(store, key) for _ in range(20)))
    record = await store.load(key)
    assert record.agent_state == {"counter": 20}
    assert record.turns == 20


async def test_concurrent_appends_are_idempotent(store: ConversationStore, key: str) -> None:
    ids = [f"activity-{n}" for n in range(50)]
    attempts = ids + ids[::5]  # 10 duplicates
    random.Random(50).shuffle(attempts)
    results = await asyncio.gather(*(store.append_event(key, _event(i)) for i in attempts))
    assert results.count(True) == 50
    pending = await _pending_ids(store, key)
    assert sorted(pending) == sorted(ids)


# --- retention: purge_expired (stores without server-side TTL) ---


@pytest.fixture
def purging_store(store: ConversationStore) -> ConversationStore:
    if type(store).purge_expired is ConversationStore.purge_expired:
        pytest.skip(f"{type(store).__name__} expires items by server-side TTL; purge_expired is a no-op there")
    return store


async def _cutoff() -> float:
    """A time after everything written so far and before anything written next."""
    await asyncio.sleep(0.02)
    cutoff = time.time()
    await asyncio.sleep(0.02)
    return cutoff


async def _idle_conversation(store: ConversationStore, key: str, job_status: str = "succeeded") -> None:
    """A conversation that had one turn and one background job, all done."""
    await store.save_reference(key, {"serviceUrl": "https://x.example/"})
    await store.append_event(key, _event("m1"))
    job = _job(key, "j1", status="queued")
    await store.commit(await store.load(key), processed=["m1"], new_jobs=[job])
    await store.patch_job(key, "j1", {"status": job_status})
    await store.append_event(key, _event("job:j1", kind="job_finished", status=job_status))
    await store.commit(await store.load(key), processed=["job:j1"])


async def _forgotten(store: ConversationStore, key: str) -> bool:
    return (
        await store.load(key) == ConversationRecord(key=key)
        and await store.get_reference(key) is None
        and not await store.has_event(key, "m1")
        and await store.list_jobs(key) == []
    )


async def test_purge_before_anything_was_written_deletes_nothing(
    purging_store: ConversationStore, key: str
) -> None:
    store = purging_store
    before = await _cutoff()
    await _idle_conversation(store, key)
    await store.write_items({f"{key}/dialog": {"v": 1}})
    record = await store.load(key)
    assert await store.purge_expired(before) == 0
    assert await store.load(key) == record
    assert await store.has_event(key, "m1") and await store.has_event(key, "job:j1")
    assert [j.id for j in await store.list_jobs(key)] == ["j1"]
    assert await store.read_items([f"{key}/dialog"]) == {f"{key}/dialog": {"v": 1}}


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
async def test_purge_forgets_an_idle_conversation(purging_store: ConversationStore, key: str, status: str) -> None:
    store = purging_store
    await _idle_conversation(store, key, status)
    assert await store.purge_expired(await _cutoff()) >= 5  # record, reference, 2 events, job
    assert await _forgotten(store, key)
    assert not await store.has_event(key, "job:j1")
    assert key not in await store.conversations_with_work()
    # A message after that starts the conversation afresh (the old id is no longer a duplicate).
    assert await store.append_event(key, _event("m1")) is True
    assert await _pending_ids(store, key) == ["m1"]


async def test_purge_deletes_old_processed_events_only(purging_store: ConversationStore, key: str) -> None:
    store = purging_store
    for event_id in ("old-done", "old-pending", "new-done"):
        await store.append_event(key, _event(event_id))
    await store.commit(await store.load(key), processed=["old-done"])
    cutoff = await _cutoff()
    await store.commit(await store.load(key), processed=["new-done"])
    await store.purge_expired(cutoff)
    assert not await store.has_event(key, "old-done")
    assert await store.has_event(key, "new-done")  # processed after the cutoff: still deduped
    assert await _pending_ids(store, key) == ["old-pending"]


async def test_purge_deletes_old_finished_jobs_only(purging_store: ConversationStore, key: str) -> None:
    store = purging_store
    await add_job(store, *(_job(key, f"old-{status}", status=status, created_at=1.0)
                           for status in ("queued", "running", "succeeded", "failed", "cancelled")))
    await add_job(store, _job(key, "touched", status="running", created_at=2.0))
    cutoff = await _cutoff()
    await store.patch_job(key, "touched", {"status": "succeeded"})  # finished after the cutoff
    await add_job(store, _job(key, "new-failed", status="failed", created_at=3.0))
    await store.purge_expired(cutoff)
    assert sorted(j.id for j in await store.list_jobs(key)) == ["new-failed", "old-queued", "old-running", "touched"]


async def test_purge_keeps_the_finish_event_of_an_unfinished_job(purging_store: ConversationStore, key: str) -> None:
    """The runner appends ``job:<id>`` before it records the end: a crash in between leaves the job
    running with its event processed. Recovery reads that event instead of running the job again."""
    store = purging_store
    await add_job(store, _job(key, "j1", status="running"))
    await store.append_event(key, _event("job:j1", kind="job_finished", status="succeeded"))
    await store.commit(await store.load(key), processed=["job:j1"])
    await store.purge_expired(await _cutoff())
    assert await store.get_event(key, "job:j1") is not None
    assert [j.status for j in await store.list_jobs(key)] == ["running"]


async def test_purge_keeps_conversations_with_recent_activity(
    purging_store: ConversationStore, make_key: MakeKey
) -> None:
    store = purging_store
    committed, referenced, messaged, job_written = keys = [make_key(n) for n in ("commit", "ref", "event", "job")]
    for key in keys:
        await _idle_conversation(store, key)
    await add_job(store, _job(job_written, "j2", status="running"))  # created before the cutoff, finished after
    cutoff = await _cutoff()
    await store.commit(await store.load(committed))
    await store.save_reference(referenced, {"serviceUrl": "https://y.example/"})
    await store.append_event(messaged, _event("m2"))
    await store.commit(await store.load(messaged), processed=["m2"])
    await store.patch_job(job_written, "j2", {"status": "succeeded"})  # a job write alone, no commit
    await store.purge_expired(cutoff)
    for key in keys:
        record = await store.load(key)
        assert record.etag is not None, key
        assert await store.get_reference(key) is not None, key
        assert not await store.has_event(key, "m1"), key  # old processed events still go
    assert await store.get_reference(referenced) == {"serviceUrl": "https://y.example/"}
    assert await store.has_event(messaged, "m2")
    assert [j.id for j in await store.list_jobs(job_written)] == ["j2"]


async def test_purging_never_removes_pending_events_unfinished_jobs_or_unsent_messages(
    purging_store: ConversationStore, make_key: MakeKey
) -> None:
    store = purging_store
    pending, queued, running, unsent = keys = [make_key(n) for n in ("pending", "queued", "running", "unsent")]
    for key in keys:
        await store.save_reference(key, {"serviceUrl": "https://x.example/"})
    await store.append_event(pending, _event("waiting"))
    for key, status in ((queued, "queued"), (running, "running")):
        await store.append_event(key, _event("m1"))
        await store.commit(await store.load(key), processed=["m1"], new_jobs=[_job(key, "j1", status=status)])
    outbox = (OutboxMessage("o1", {"text": "not sent yet"}),)
    await store.commit(ConversationRecord(key=unsent, agent_state={"kept": True}, outbox=outbox))
    records = {key: await store.load(key) for key in keys}

    await store.purge_expired(time.time() + 365 * 86400)  # everything is a year old by then

    assert await _pending_ids(store, pending) == ["waiting"]
    for key, status in ((queued, "queued"), (running, "running")):
        assert [(j.id, j.status) for j in await store.list_jobs(key)] == [("j1", status)]
        assert (await store.get_job(key, "j1")).status == status
    assert {(j.conversation_key, j.id) for j in await store.unfinished_jobs()} >= {(queued, "j1"), (running, "j1")}
    assert (await store.load(unsent)).outbox == outbox
    assert {pending, unsent} <= set(await store.conversations_with_work())
    for key in keys:  # nor the record and reference the pending work needs
        assert await store.load(key) == records[key]
        assert await store.get_reference(key) == {"serviceUrl": "https://x.example/"}


async def test_purge_deletes_items_not_written_since(purging_store: ConversationStore, key: str) -> None:
    store = purging_store
    await store.write_items({f"{key}/old": {"v": 1}, f"{key}/rewritten": {"v": 1}})
    cutoff = await _cutoff()
    await store.write_items({f"{key}/rewritten": {"v": 2}, f"{key}/new": {"v": 3}})
    await store.purge_expired(cutoff)
    assert await store.read_items([f"{key}/old", f"{key}/rewritten", f"{key}/new"]) == {
        f"{key}/rewritten": {"v": 2},
        f"{key}/new": {"v": 3},
    }


async def test_purge_returns_how_many_entries_it_deleted(purging_store: ConversationStore, key: str) -> None:
    store = purging_store
    await store.append_event(key, _event("e1"))
    await store.append_event(key, _event("e2"))
    await store.commit(await store.load(key), processed=["e1", "e2"], new_jobs=[_job(key, "j1", status="queued")])
    await store.write_items({f"{key}/dialog": {"v": 1}})
    cutoff = await _cutoff()
    assert await store.purge_expired(cutoff) == 3  # two events, one item; the job is unfinished
    assert await store.purge_expired(cutoff) == 0


async def test_patch_job_changes_only_the_given_fields(store: ConversationStore, key: str) -> None:
    await add_job(store, JobRecord(id="p1", conversation_key=key, tool="t", arguments={"a": 1}, status="running"))
    patched = await store.patch_job(key, "p1", {"progress": 0.5, "progress_text": "half"})
    assert (patched.progress, patched.progress_text, patched.status, patched.arguments) == (0.5, "half", "running",
                                                                                             {"a": 1})
    assert await store.get_job(key, "p1") == patched
    with pytest.raises(JobNotFoundError):
        await store.patch_job(key, "nope", {"progress": 1.0})


async def test_concurrent_patches_of_different_fields_all_survive(store: ConversationStore, key: str) -> None:
    await add_job(store, JobRecord(id="p2", conversation_key=key, tool="t", arguments={}))
    await asyncio.gather(
        *(store.patch_job(key, "p2", {"progress": n / 20}) for n in range(20)),
        store.patch_job(key, "p2", {"cancel_requested": True}),
        store.patch_job(key, "p2", {"card_activity_id": "card-1"}),
    )
    job = await store.get_job(key, "p2")
    assert job.cancel_requested and job.card_activity_id == "card-1" and job.progress is not None


# --- forgetting a conversation (a confirmed reset) ---


async def _said_and_done(store: ConversationStore, key: str) -> None:
    """A conversation with processed messages, a pending one, a finished job (event processed), a
    running job, and one running whose finish event is in (a crash before its record was marked)."""
    await store.save_reference(key, {"serviceUrl": "https://x.example/"})
    for event_id in ("m1", "m2"):
        await store.append_event(key, _event(event_id, text=f"secret {event_id}"))
    jobs = [_job(key, "done", status="queued"), _job(key, "running", status="queued"),
            _job(key, "crashed", status="queued")]
    await store.commit(await store.load(key), processed=["m1", "m2"], new_jobs=jobs)
    await store.patch_job(key, "done", {"status": "succeeded", "result": {"secret": "result"}})
    await store.patch_job(key, "running", {"status": "running"})
    await store.patch_job(key, "crashed", {"status": "running"})
    for job_id, status in (("done", "succeeded"), ("crashed", "succeeded")):
        await store.append_event(key, _event(f"job:{job_id}", kind="job_finished", status=status))
    await store.commit(await store.load(key), processed=["job:done", "job:crashed"])
    await store.append_event(key, _event("m3", text="said after the reset"))


async def test_forget_redacts_processed_events_and_drops_finished_jobs(store: ConversationStore, make_key: MakeKey,
                                                                       ) -> None:
    key, other = make_key("forget"), make_key("other")
    for k in (key, other):
        await _said_and_done(store, k)
    dialog, other_dialog = f"dialog/{key}", f"dialog/{other}"
    await store.write_items({dialog: {"v": 1}, other_dialog: {"v": 2}})
    record = await store.load(key)

    assert await store.forget_conversation(key, item_keys=[dialog]) == 5  # m1, m2, job:done; job done; item

    for event_id in ("m1", "m2", "job:done"):
        event = await store.get_event(key, event_id)
        assert event is not None and event.payload == {}, event_id  # the id stays: redelivery is still a no-op
        assert await store.append_event(key, _event(event_id)) is False
    crashed = await store.get_event(key, "job:crashed")  # the runner's crash recovery reads it
    assert crashed is not None and crashed.payload == {"status": "succeeded"}
    assert [(e.id, e.payload) for e in await store.pending_events(key)] == [("m3", {"text": "said after the reset"})]
    assert sorted((j.id, j.status) for j in await store.list_jobs(key)) == [("crashed", "running"),
                                                                             ("running", "running")]
    with pytest.raises(JobNotFoundError):
        await store.get_job(key, "done")
    assert await store.read_items([dialog, other_dialog]) == {other_dialog: {"v": 2}}
    assert await store.get_reference(key) == {"serviceUrl": "https://x.example/"}
    assert await store.load(key) == record
    # Another conversation is untouched.
    assert (await store.get_event(other, "m1")).payload == {"text": "secret m1"}  # type: ignore[union-attr]
    assert len(await store.list_jobs(other)) == 3


async def test_forget_is_idempotent(store: ConversationStore, key: str) -> None:
    await _said_and_done(store, key)
    await store.write_items({f"dialog/{key}": {"v": 1}})
    assert await store.forget_conversation(key, item_keys=[f"dialog/{key}"]) == 5
    assert await store.forget_conversation(key, item_keys=[f"dialog/{key}"]) == 0
    assert await store.forget_conversation(make_unknown := f"{key}-never-seen") == 0, make_unknown
# --- the item size limit (issue 13, finding 11) ------------------------------------------------


async def test_too_large_items_are_refused_with_a_distinct_error_and_nothing_written(
        store: ConversationStore, key: str) -> None:
    """Every store refuses what Cosmos DB refuses (over 2 MB) with ItemTooLargeError, a permanent
    failure the processor can tell from an outage; nothing of the refused write is stored."""
    huge = "x" * (MAX_ITEM_BYTES + 1000)
    await store.append_event(key, _event("e1"))
    small = await store.commit(ConversationRecord(key=key, agent_state={"v": 1}), processed=[],
                               new_jobs=[_job(key, "j2")])
    with pytest.raises(ItemTooLargeError):
        await store.commit(small.evolve(agent_state={"v": huge}), processed=["e1"], new_jobs=[_job(key, "j1")])
    assert (await store.load(key)).agent_state == {"v": 1}
    assert await _pending_ids(store, key) == ["e1"]
    with pytest.raises(JobNotFoundError):
        await store.get_job(key, "j1")
    with pytest.raises(ItemTooLargeError):
        await store.append_event(key, _event("e2", text=huge))
    assert not await store.has_event(key, "e2")
    with pytest.raises(ItemTooLargeError):
        await store.patch_job(key, "j2", {"result": {"message": huge}})
    assert (await store.get_job(key, "j2")).result is None
    # The conversation goes on: a normal commit after the refused one works.
    done = await store.commit(small.evolve(agent_state={"v": 2}), processed=["e1"])
    assert (await store.load(key)).agent_state == {"v": 2} and done.etag
    assert not isinstance(ItemTooLargeError("x", 1, 0), StoreUnavailableError)


# --- the conditional job transition (issue 16: an approval is decided once) ---


async def test_transition_job_changes_only_from_the_expected_status(store: ConversationStore, key: str) -> None:
    await add_job(store, JobRecord(id="t1", conversation_key=key, tool="t", arguments={}, status="awaiting_approval"))
    won = await store.transition_job(key, "t1", "awaiting_approval", {"status": "queued", "approval": {"by": "a"}})
    assert won is not None and (won.status, won.approval) == ("queued", {"by": "a"})
    assert await store.get_job(key, "t1") == won
    assert await store.transition_job(key, "t1", "awaiting_approval", {"status": "rejected"}) is None
    assert (await store.get_job(key, "t1")).status == "queued"  # the loser changed nothing
    with pytest.raises(JobNotFoundError):
        await store.transition_job(key, "nope", "awaiting_approval", {"status": "queued"})


async def test_concurrent_transitions_have_one_winner(store: ConversationStore, key: str) -> None:
    await add_job(store, JobRecord(id="t2", conversation_key=key, tool="t", arguments={}, status="awaiting_approval"))
    outcomes = await asyncio.gather(*(store.transition_job(key, "t2", "awaiting_approval",
                                                           {"status": "queued", "approval": {"by": f"p{n}"}})
                                      for n in range(8)))
    winners = [o for o in outcomes if o is not None]
    assert len(winners) == 1
    assert await store.get_job(key, "t2") == winners[0]


async def test_jobs_awaiting_approval_are_unfinished(store: ConversationStore, key: str) -> None:
    await add_job(store, JobRecord(id="t3", conversation_key=key, tool="t", arguments={}, status="awaiting_approval"),
                  JobRecord(id="t4", conversation_key=key, tool="t", arguments={}, status="rejected"))
    assert [j.id for j in await store.unfinished_jobs() if j.conversation_key == key] == ["t3"]
