"""CosmosStore specifics: id encoding, the item layout (one conversation item, ttl,
schema_version), crash between a commit and its follow-up hints, and many writers.

Runs against the session's Cosmos DB (the local wire server, see conftest.py); skipped with the
contract suite's reason when it cannot run. The raw items are read through the SDK.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from azure.cosmos.exceptions import CosmosHttpResponseError
from blockbuster import blockbuster_ctx

from storage.abc import (
    JSON,
    SCHEMA_VERSION,
    ConcurrencyError,
    ConversationRecord,
    InboxEvent,
    ItemTooLargeError,
    JobRecord,
    OutboxMessage,
)
from storage.cosmos import MAX_ID_LENGTH, CosmosStore, _log_retried_response, cosmos_id
from tests.storage.conftest import CosmosPeer
from tests.storage.jobs import add_job

MakeKey = Callable[[str], str]
NASTY_KEY = "19:abc@thread.skype;messageid=1/2?x#y"
LONG_KEY = "19:" + "x" * 380 + "@thread.tacv2;messageid=1700000000000"
DAY = 86400

OpenStore = Callable[..., Awaitable[CosmosStore]]


@pytest_asyncio.fixture
async def open_store(cosmos_peer: CosmosPeer) -> AsyncIterator[OpenStore]:
    """Opens CosmosStores on the session's container (each its own client); closes them after."""
    opened: list[CosmosStore] = []

    async def open_one(**options: Any) -> CosmosStore:
        store = CosmosStore(
            cosmos_peer.endpoint, cosmos_peer.key, cosmos_peer.database, cosmos_peer.container, **options
        )
        await store.open()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def store(open_store: OpenStore) -> CosmosStore:
    return await open_store()


async def raw_items(store: CosmosStore, key: str) -> list[JSON]:
    """Every item of the conversation's partition, as stored."""
    pager = store.container.query_items(
        "SELECT * FROM c WHERE c.pk = @pk",
        parameters=[{"name": "@pk", "value": store.partition(key)}],
        partition_key=store.partition(key),
    )
    return [dict(item) async for item in pager]


async def raw_conversation(store: CosmosStore, key: str) -> JSON:
    return dict(await store.container.read_item("conversation", partition_key=store.partition(key)))


def _job(key: str, job_id: str, **fields: Any) -> JobRecord:
    return JobRecord(id=job_id, conversation_key=key, tool="activate_line", arguments={"line": job_id}, **fields)


# --- id encoding ---


@pytest.mark.parametrize("raw", [NASTY_KEY, LONG_KEY, "a/b", "a\\b", "a?b", "a#b", "tab\there", "ünï ✓", "*2f", "~"])
def test_cosmos_id_is_valid(raw: str) -> None:
    encoded = cosmos_id("event:", raw)
    assert encoded.startswith("event:")
    assert len(encoded) <= MAX_ID_LENGTH
    assert not set("/\\?#") & set(encoded)
    assert encoded.isascii() and encoded.isprintable()
    assert cosmos_id("event:", raw) == encoded  # deterministic


def test_cosmos_id_keeps_teams_ids_readable() -> None:
    assert cosmos_id("", "19:abc@thread.tacv2") == "19:abc@thread.tacv2"
    assert cosmos_id("", NASTY_KEY).startswith("19:abc@thread.skype;messageid=1")


def test_cosmos_id_does_not_collide() -> None:
    similar = [
        "a/b",
        "a*2fb",
        "a?b",
        "a*3fb",
        "a b",
        "a+b",
        LONG_KEY,
        LONG_KEY + "1",
        LONG_KEY[:-1] + "8",  # long ones differing only at the end
        "x" * 249,
        "x" * 250,  # either side of the escaping/hashing boundary with "event:"
    ]
    encoded = {cosmos_id("event:", raw) for raw in similar}
    assert len(encoded) == len(similar)


@pytest.mark.parametrize("key", [NASTY_KEY, LONG_KEY], ids=["nasty", "long"])
async def test_nasty_keys_and_ids_round_trip(store: CosmosStore, make_key: MakeKey, key: str) -> None:
    key = key + make_key("")  # unique per run, still nasty
    event_id = NASTY_KEY + "-event/" + "e" * 300
    job_id = "job?#/" + "j" * 300
    reference = {"conversation": {"id": key}}

    await store.save_reference(key, reference)
    event = InboxEvent(id=event_id, kind="message", payload={"text": "hi"})
    assert await store.append_event(key, event) is True
    assert await store.append_event(key, event) is False
    assert await store.pending_events(key) == [event]
    committed = await store.commit(
        ConversationRecord(key=key, agent_state={"k": key}), processed=[event_id], new_jobs=[_job(key, job_id)]
    )
    assert await store.load(key) == committed
    assert await store.pending_events(key) == []
    assert await store.get_event(key, event_id) == event
    assert (await store.get_job(key, job_id)).id == job_id
    assert [j.id for j in await store.list_jobs(key)] == [job_id]
    assert key in {j.conversation_key for j in await store.unfinished_jobs()}
    assert await store.get_reference(key) == reference
    await store.write_items({key: {"v": 1}, key + "/dialog": {"v": 2}})
    assert await store.read_items([key, key + "/dialog"]) == {key: {"v": 1}, key + "/dialog": {"v": 2}}

    items = await raw_items(store, key)
    assert {i["type"] for i in items} == {"conversation", "event", "job", "reference"}
    for item in items:
        assert len(item["id"]) <= MAX_ID_LENGTH and not set("/\\?#") & set(item["id"])
        assert item["key"] == key  # the original key is kept


# --- item layout ---


async def test_every_item_has_schema_version_and_ttl(open_store: OpenStore, key: str) -> None:
    store = await open_store(conversation_ttl_days=7, item_ttl_days=2)
    await store.save_reference(key, {"serviceUrl": "https://x.example/"})
    await store.append_event(key, InboxEvent(id="e1", kind="message", payload={}))
    await store.commit(
        ConversationRecord(key=key),
        processed=["e1"],
        new_jobs=[_job(key, "queued"), _job(key, "done", status="succeeded")],
    )
    await add_job(store, _job(key, "running", status="running"))
    await store.write_items({key: {"v": 1}})

    by_id = {i["id"]: i for i in await raw_items(store, key)}
    assert set(by_id) == {"conversation", "reference", "event:e1", "job:queued", "job:done", "job:running"}
    assert all(i["schema_version"] == SCHEMA_VERSION for i in by_id.values())
    for item_id in ("conversation", "reference", "event:e1", "job:done"):
        assert by_id[item_id]["ttl"] == 7 * DAY, item_id
    assert "ttl" not in by_id["job:queued"] and "ttl" not in by_id["job:running"]  # unfinished jobs never expire

    await store.patch_job(key, "running", {"status": "failed"})
    finished = await store.container.read_item("job:running", partition_key=store.partition(key))
    assert finished["ttl"] == 7 * DAY

    item = await store.container.read_item("item", partition_key=cosmos_id("~item:", key))
    assert (item["ttl"], item["schema_version"], item["value"]) == (2 * DAY, SCHEMA_VERSION, {"v": 1})


async def test_container_has_ttl_enabled(store: CosmosStore) -> None:
    properties = await store.container.read()
    assert properties["defaultTtl"] == -1  # per-item ttl applies, items without one never expire
    assert properties["partitionKey"]["paths"] == ["/pk"]
    excluded = {p["path"] for p in properties["indexingPolicy"]["excludedPaths"]}
    assert {"/agent_state/*", "/payload/*", "/job/*"} <= excluded  # big blobs are not indexed


async def test_conversation_is_one_item_with_a_bounded_processed_list(store: CosmosStore, key: str) -> None:
    record = await store.load(key)
    for turn in range(1, 6):
        ids = [f"t{turn}-e{n}" for n in range(3)]
        for event_id in ids:
            await store.append_event(key, InboxEvent(id=event_id, kind="message", payload={}))
        record = await store.commit(
            record.evolve(agent_state={"turn": turn}, turns=turn, outbox=(OutboxMessage(f"o{turn}", {"n": turn}),)),
            processed=ids,
            new_jobs=[_job(key, f"job{turn}")],
        )
        raw = await raw_conversation(store, key)
        assert raw["_etag"] == record.etag
        assert raw["processed"] == ids  # only the latest commit's ids: older ones were flagged and dropped
        assert [j["id"] for j in raw["job_intents"]] == [f"job{turn}"]  # older intents are materialised

    conversations = [i for i in await raw_items(store, key) if i["type"] == "conversation"]
    assert len(conversations) == 1
    raw = conversations[0]
    assert raw["id"] == "conversation" and raw["key"] == key
    assert raw["agent_state"] == {"turn": 5} and raw["turns"] == 5
    assert raw["outbox"] == [{"id": "o5", "activity": {"n": 5}}] and raw["has_outbox"] is True
    assert raw["schema_version"] == SCHEMA_VERSION
    events = [i for i in await raw_items(store, key) if i["type"] == "event"]
    assert len(events) == 15 and all(e["processed"] is True for e in events)
    assert [j.id for j in await store.list_jobs(key)] == [f"job{n}" for n in range(1, 6)]


async def test_commit_is_complete_without_its_follow_up_writes(
    store: CosmosStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash right after the conditional write (events not flagged, jobs not materialised)."""
    await store.append_event(key, InboxEvent(id="e1", kind="message", payload={}))
    await store.append_event(key, InboxEvent(id="e2", kind="message", payload={}))

    async def nothing(*args: Any) -> None:
        return None

    async def fail(job: JSON) -> bool:
        return False

    with monkeypatch.context() as crashed:
        crashed.setattr(store, "_flag_processed", nothing)
        crashed.setattr(store, "_materialise", fail)
        committed = await store.commit(await store.load(key), processed=["e1"], new_jobs=[_job(key, "j1")])
        # Readers see the commit as a whole although no event or job item was written yet.
        assert [e.id for e in await store.pending_events(key)] == ["e2"]
        assert key in await store.conversations_with_work()
        assert [j.id for j in await store.list_jobs(key)] == ["j1"]
        assert (await store.get_job(key, "j1")).status == "queued"
        assert ("j1", key) in {(j.id, j.conversation_key) for j in await store.unfinished_jobs()}
    raw_event = await store.container.read_item("event:e1", partition_key=store.partition(key))
    assert raw_event["processed"] is False

    # A job read repairs: the job item appears; the next commit flags e1 and empties the lists.
    assert (await store.get_job(key, "j1")).status == "queued"
    await store.container.read_item("job:j1", partition_key=store.partition(key))
    assert await store.load(key) == committed  # repairs never touch the conversation item
    committed = await store.commit(committed, processed=["e2"])
    raw = await raw_conversation(store, key)
    assert raw["processed"] == ["e1", "e2"] and raw["job_intents"] == []  # e1 stays until its flag is seen
    assert (await store.container.read_item("event:e1", partition_key=store.partition(key)))["processed"] is True
    assert await store.pending_events(key) == []
    assert key not in await store.conversations_with_work()
    await store.commit(committed)
    assert (await raw_conversation(store, key))["processed"] == []


async def test_a_flag_lost_after_a_one_request_commit_keeps_the_event_processed(
    store: CosmosStore, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lean path (``load_turn`` then a commit with no read, its flags in the same batch): when the
    flag does not land (here: the event item changed since it was read, then a crash before the retry),
    the id stays in the conversation item's list, so the event is never pending again."""
    await store.append_event(key, InboxEvent(id="e1", kind="message", payload={}))
    await store.commit(await store.load(key))
    start = await store.load_turn(key)
    assert [e.id for e in start.events] == ["e1"]
    await store.container.patch_item("event:e1", partition_key=store.partition(key),
                                     patch_operations=[{"op": "set", "path": "/touched", "value": True}])

    async def nothing(*args: Any) -> None:
        return None

    monkeypatch.setattr(store, "_flag_processed", nothing)
    await store.commit(start.record.evolve(turns=1), processed=["e1"])
    assert (await store.container.read_item("event:e1", partition_key=store.partition(key)))["processed"] is False
    assert (await raw_conversation(store, key))["processed"] == ["e1"]  # the truth until the flag lands
    # The next round: e1 is not pending; its commit flags it in the same batch request (not the patch).
    start = await store.load_turn(key)
    assert start.events == [] and await store.pending_events(key) == []
    await store.commit(start.record.evolve(turns=2))
    assert (await store.container.read_item("event:e1", partition_key=store.partition(key)))["processed"] is True
    assert (await raw_conversation(store, key))["processed"] == ["e1"]  # kept: the flag was not seen yet
    # Seen flagged, the id moves to ``settled`` for one more commit, then leaves; never pending meanwhile.
    expected: list[tuple[int, list[str], list[str]]] = [(3, [], ["e1"]), (4, [], [])]
    for turns, listed, settled in expected:
        start = await store.load_turn(key)
        assert start.events == [] and await store.pending_events(key) == []
        await store.commit(start.record.evolve(turns=turns))
        raw = await raw_conversation(store, key)
        assert (raw["processed"], raw["settled"]) == (listed, settled)
    assert await store.pending_events(key) == [] and (await store.load_turn(key)).events == []


async def test_intent_never_overwrites_a_running_job(store: CosmosStore, key: str) -> None:
    committed = await store.commit(ConversationRecord(key=key), new_jobs=[_job(key, "j1")])
    running = await store.patch_job(key, "j1", {"status": "running", "attempt": 1})
    await store.commit(committed)  # re-materialises the old intent: must be a no-op
    assert await store.get_job(key, "j1") == running


async def test_jobs_stored_with_a_field_since_removed_still_load(store: CosmosStore, key: str) -> None:
    """Job items and intents written by an older version carry ``announced`` (never read, now gone)."""
    await store.commit(ConversationRecord(key=key), new_jobs=[_job(key, "item", status="running")])
    item = dict(await store.container.read_item("job:item", partition_key=store.partition(key)))
    item["job"]["announced"] = True
    await store.container.replace_item("job:item", item)
    conversation = await raw_conversation(store, key)  # an intent not materialised yet
    conversation["job_intents"] = [{**_job(key, "intent").to_json(), "announced": False}]
    await store.container.replace_item("conversation", conversation)

    assert (await store.get_job(key, "item")).status == "running"
    assert sorted(j.id for j in await store.list_jobs(key)) == ["intent", "item"]
    assert {(j.conversation_key, j.id) for j in await store.unfinished_jobs()} >= {(key, "intent"), (key, "item")}
    assert (await store.patch_job(key, "item", {"status": "succeeded"})).status == "succeeded"
    assert (await store.patch_job(key, "intent", {"progress": 0.5})).progress == 0.5
    assert "announced" not in (await store.container.read_item("job:item", partition_key=store.partition(key)))["job"]


async def test_stale_commit_writes_no_item(store: CosmosStore, key: str) -> None:
    stale = await store.commit(ConversationRecord(key=key, agent_state={"v": 1}))
    await store.commit(stale.evolve(agent_state={"v": 2}))
    before = await raw_items(store, key)
    with pytest.raises(ConcurrencyError):
        await store.commit(stale, new_jobs=[_job(key, "j1")])
    assert await raw_items(store, key) == before


# --- the event loop stays free ---


async def test_no_blocking_calls_on_the_event_loop(open_store: OpenStore, key: str) -> None:
    """blockbuster fails any sync I/O (file, socket, subprocess) made on the loop thread."""
    with blockbuster_ctx():
        store = await open_store()
        await store.save_reference(key, {"serviceUrl": "https://x.example/"})
        await store.append_event(key, InboxEvent(id="e1", kind="message", payload={}))
        record = await store.commit(await store.load(key), processed=["e1"], new_jobs=[_job(key, "j1")])
        await store.pending_events(key)
        await store.conversations_with_work()
        await store.patch_job(key, "j1", {"status": "succeeded"})
        await store.unfinished_jobs()
        await store.write_items({key: {"v": 1}})
        await store.read_items([key])
        await store.delete_items([key])
        await store.commit(record)
        await store.close()


# --- many writers ---


async def test_many_writers_lose_no_update(open_store: OpenStore, key: str) -> None:
    """10 writers on two clients (two app instances): turns, job updates and appends interleaved."""
    stores = [await open_store(), await open_store()]
    writers, rounds = 10, 3

    async def writer(w: int) -> int:
        store = stores[w % 2]
        conflicts = 0
        for r in range(rounds):
            assert await store.append_event(key, InboxEvent(id=f"w{w}-r{r}", kind="message", payload={}))
            while True:
                record = await store.load(key)
                pending = [e.id for e in await store.pending_events(key)]
                state = dict(record.agent_state or {})
                state["counter"] = state.get("counter", 0) + 1
                await asyncio.sleep(0)
                try:
                    await store.commit(
                        record.evolve(agent_state=state, turns=record.turns + 1),
                        processed=pending,
                        new_jobs=[_job(key, f"w{w}-r{r}")],
                    )
                    break
                except ConcurrencyError:
                    conflicts += 1
            await store.patch_job(key, f"w{w}-r{r}", {"status": "running", "attempt": 1})
        return conflicts

    conflicts = await asyncio.gather(*(writer(w) for w in range(writers)))
    store = stores[0]
    record = await store.load(key)
    assert record.agent_state == {"counter": writers * rounds}
    assert record.turns == writers * rounds
    assert sum(conflicts) > 0  # the writers really did collide
    assert await store.pending_events(key) == []
    expected_jobs = sorted(f"w{w}-r{r}" for w in range(writers) for r in range(rounds))
    assert sorted(await _ids(store.list_jobs(key))) == expected_jobs
    assert {j.status for j in await store.list_jobs(key)} == {"running"}  # no intent overwrote a patch
    assert len((await raw_conversation(store, key))["processed"]) <= writers  # bounded


async def _ids(jobs: Awaitable[Iterable[JobRecord]]) -> list[str]:
    return [j.id for j in await jobs]


# --- throttling ---


async def test_retry_hook_sees_every_response(
    store: CosmosStore, key: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The hook is wired into the client: pretend 404 is a retried status and read a missing item."""
    monkeypatch.setattr("storage.cosmos._RETRIED_STATUSES", frozenset({404}))
    with caplog.at_level(logging.WARNING, logger="storage.cosmos"):
        assert await store.get_reference(key) is None
    assert any("Cosmos DB answered 404 to GET" in r.getMessage() for r in caplog.records)


def test_throttled_responses_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    def response(status: int) -> Any:
        return SimpleNamespace(
            http_request=SimpleNamespace(method="POST", url="https://127.0.0.1/dbs/d/colls/c/docs"),
            http_response=SimpleNamespace(status_code=status, headers={"x-ms-retry-after-ms": "12"}),
        )

    with caplog.at_level(logging.WARNING, logger="storage.cosmos"):
        _log_retried_response(response(200))
        _log_retried_response(response(404))
        _log_retried_response(response(429))
    assert [r.getMessage() for r in caplog.records] == [
        "Cosmos DB answered 429 to POST https://127.0.0.1/dbs/d/colls/c/docs (retry after 12 ms); the SDK retries it"
    ]


@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # aiohttp on a 3 MB body: expected
async def test_the_service_413_for_an_oversized_item_is_item_too_large(open_store: OpenStore, key: str) -> None:
    """With no client-side cap, the request reaches the (wire) server, which answers 413 "Request size
    is too large" as Cosmos DB does: that is ItemTooLargeError (permanent), not an outage to retry."""
    store = await open_store(max_item_bytes=None)
    huge = "x" * (3 * 1024 * 1024)
    with pytest.raises(ItemTooLargeError) as refused:
        await store.commit(ConversationRecord(key=key, agent_state={"big": huge}))
    assert isinstance(refused.value.__cause__, CosmosHttpResponseError) and refused.value.__cause__.status_code == 413
    with pytest.raises(ItemTooLargeError):
        await store.append_event(key, InboxEvent(id="big", kind="message", payload={"text": huge}))
    assert not await store.has_event(key, "big")
    assert (await store.load(key)).etag is None
