"""Azure Cosmos DB store (``azure.cosmos.aio``; the sync client would block the event loop).

Layout: one container, partition key ``/pk``. A conversation's items all share one logical
partition, ``pk`` = the encoded conversation key (:func:`cosmos_id`); every item keeps the
original key in ``key`` and carries ``type`` and ``schema_version``.

=====================  ============================================================
item id                what it holds
=====================  ============================================================
``conversation``       agent state, outbox, turns, **processed** (event ids) and
                       **job_intents** (job records): the only item ``commit`` writes
``event:<id>``         one inbox event; ``arrival`` orders the inbox, ``processed``
                       is a lazily-set hint (see below)
``job:<id>``           one job record (``job``), plus ``status``/``created_at`` to query
``reference``          the conversation reference for proactive sends
=====================  ============================================================

Dialog-state items (``read_items`` ...) live in their own partitions: ``pk`` =
``~item:<encoded key>``, id ``item`` (one point read/write each, no hot partition).

**Why commit is atomic.** Cosmos has no multi-item transaction this code can rely on
(transactional batch exists, but the wire-protocol test server runs a batch without rollback), so
everything a commit changes is in the conversation item, written with one conditional
``replace_item(etag=..., match_condition=IfNotModified)`` (``create_item`` when the record is
new; 412/409/404 mean someone else moved first: :class:`ConcurrencyError`):

* *Processed events.* An event is processed iff its id is in the conversation item's
  ``processed`` list **or** its event item says ``processed: true``. The commit adds the ids
  (only those whose event item exists, as the contract wants for unknown ids) to the list.
  After the write succeeds the event items are patched to ``processed: true``; that patch is a
  hint, not the truth, so a crash before it loses nothing.
* *Keeping ``processed`` bounded.* Each commit learns which ids of its list are already flagged
  (or gone, e.g. expired): from the item and events this process last read at the record's
  etag (:meth:`CosmosStore.load_turn`, one query), else by reading the stored item and querying
  the event items. Those ids move to ``settled`` for one more commit, then leave; the rest are
  kept and flagged again. So the lists hold the ids of the last two commits or so. Dropping is
  safe because the flag was durable before the id left the lists; readers therefore read the
  conversation item **before** querying event items (``pending_events``), or both in one query
  (``load_turn``, where ``settled`` keeps the id a commit longer than its flag needs), so they
  never see "not in the lists" together with an older "not flagged".
* *One request per commit.* The commit's conditional replace and the flags of the events this
  process read go in one batch request, the replace first (:meth:`CosmosStore._write_and_flag`).
  On Cosmos DB a batch is a transaction; the wire-protocol test server runs it without
  rollback, which is the order this design always relied on (write, then hints).
* *The outbox.* Sent messages leave with a conditional patch (``remove /outbox/<n>``, etag
  checked), not a rewrite of the whole item (:meth:`CosmosStore.remove_from_outbox`).
* *New jobs.* ``new_jobs`` are written into ``job_intents`` in the same write. Right after
  it, and lazily on the next commit or on any job read (``get_job``, ``list_jobs``,
  ``unfinished_jobs``), each intent is materialised with ``create_item`` on ``job:<id>``
  (409 = already there, which also means an existing job is never overwritten); a commit drops
  an intent from the list once its job item exists. Job readers merge intents whose item is
  still missing, so a job is visible from the moment its commit succeeded.

Inbox order: ``arrival`` is a hybrid clock in microseconds: wall time, bumped to stay strictly
increasing within this process (two appends in one process are always ordered by call order;
appends from different instances are ordered by their clocks, ties by event id). Integers stay
below 2**53, so they survive Cosmos's double-precision numbers.

Expiry: event items, finished job items, the reference and the conversation item carry
``ttl`` = ``conversation_ttl_days`` days, renewed by every write, so an idle conversation
disappears; unfinished jobs never expire. Cosmos applies item ``ttl`` only when the
container has TTL enabled (``default_ttl=-1`` as :meth:`CosmosStore.open` creates it).

Consistency: the account must give this client read-your-writes across instances for the
conversation partition (Strong, or the default Session consistency in a single write region).

Throttling (429) and transient errors are retried by the SDK (``retry_total`` and
``retry_backoff_max``); every throttled response is logged as a warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import platform
import string
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from azure.core import MatchConditions
from azure.core.exceptions import AzureError
from azure.cosmos import PartitionKey, exceptions
from azure.cosmos.aio import ContainerProxy, CosmosClient
from azure.identity.aio import DefaultAzureCredential

from runtime.protocol import finished_event_id
from storage.abc import (
    JSON,
    MAX_ITEM_BYTES,
    SCHEMA_VERSION,
    ConcurrencyError,
    ConversationRecord,
    ConversationStore,
    InboxEvent,
    ItemTooLargeError,
    JobNotFoundError,
    JobRecord,
    OutboxMessage,
    StoreError,
    TurnStart,
    check_item_size,
    translate_errors,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
A = TypeVar("A")

CONVERSATION_ID = "conversation"
REFERENCE_ID = "reference"
ITEM_ID = "item"
EVENT_PREFIX = "event:"
JOB_PREFIX = "job:"
#: Starts with ``~``, which no escaped or hashed conversation key starts with: disjoint partitions.
ITEM_PK_PREFIX = "~item:"

#: Cosmos DB limits an item id to 255 characters.
MAX_ID_LENGTH = 255
#: Characters kept as they are in ids; everything else (including the forbidden ``/ \\ ? #``,
#: the escape character ``*`` and the hash separator ``~``) is written as ``*XX`` per UTF-8 byte.
_SAFE_ID_CHARS = frozenset(string.ascii_letters + string.digits + "-_.:;@=,+")
_UNFINISHED = ("queued", "running", "awaiting_approval")
#: Status codes that mean "the server is busy or flaky": the SDK retries them; we log them.
_RETRIED_STATUSES = frozenset({408, 429, 449, 503})
#: Index only what queries filter on: agent state and payloads are large, and every indexed
#: term costs request units on each write. Queries may still project or test the excluded parts.
INDEXING_POLICY: dict[str, Any] = {
    "indexingMode": "consistent",
    "includedPaths": [{"path": "/*"}],
    "excludedPaths": [
        {"path": f"/{name}/*"}
        for name in ("agent_state", "outbox", "job_intents", "payload", "job", "reference", "value")
    ]
    + [{"path": '/"_etag"/?'}],
}
#: At most this many requests in flight for fan-out reads/writes of one call.
_FANOUT = 16
#: Cosmos DB allows at most 10 operations in one patch request.
_MAX_PATCH_OPERATIONS = 10
#: Conversations whose last-seen item this process remembers (see :class:`_Seen`).
_SEEN_CONVERSATIONS = 1024


@dataclass
class _Seen:
    """What this process last read or wrote of a conversation item, valid only while the item still has
    ``etag``: a commit whose record carries that etag needs no read before its conditional write (the
    write itself checks the etag), and knows which events were unflagged without a query."""

    etag: str
    processed: list[str]
    settled: list[str]
    intents: list[JSON]
    #: event id -> its event item, for every event not flagged processed when ``load_turn`` read the item
    #: (the query returns all of them); None after a commit: which flags landed since is not known here
    unflagged: dict[str, JSON] | None = None


def _escape(raw: str) -> str:
    return "".join(ch if ch in _SAFE_ID_CHARS else "".join(f"*{b:02x}" for b in ch.encode()) for ch in raw)


def cosmos_id(prefix: str, raw: str) -> str:
    """A valid, deterministic Cosmos id for ``raw``, injective in practice.

    Short values are escaped reversibly (readable: Teams ids keep their ``19:...@thread``
    shape); values too long keep a readable escaped head and end in ``~`` + sha256 of the
    original. ``~`` never occurs in an escaped value, so the two forms cannot collide.
    """
    escaped = prefix + _escape(raw)
    if len(escaped) <= MAX_ID_LENGTH:
        return escaped
    digest = hashlib.sha256(raw.encode()).hexdigest()
    head = escaped[: MAX_ID_LENGTH - len(digest) - 1]
    return f"{head}~{digest}"


class _ArrivalClock:
    """Strictly increasing microsecond timestamps within the process (a hybrid logical clock)."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self._last = max(time.time_ns() // 1000, self._last + 1)
            return self._last


_arrival_clock = _ArrivalClock()


def _done(conversation: JSON | None) -> set[str]:
    """The ids a conversation item marks processed (``processed`` and ``settled``)."""
    if not conversation:
        return set()
    return {*conversation.get("processed", ()), *conversation.get("settled", ())}


def _pending(events: Iterable[JSON], done: set[str]) -> list[JSON]:
    """Unflagged event items not marked processed by the conversation item, oldest first."""
    return sorted((d for d in events if d["event_id"] not in done), key=lambda d: (d["arrival"], d["event_id"]))


def _is_status(error: exceptions.CosmosHttpResponseError, *codes: int) -> bool:
    return error.status_code in codes


def _log_retried_response(response: Any) -> None:
    """``raw_response_hook``: sees every HTTP attempt, so each throttled one is reported."""
    status = getattr(response.http_response, "status_code", None)
    if status in _RETRIED_STATUSES:
        request = response.http_request
        retry_after = response.http_response.headers.get("x-ms-retry-after-ms")
        log.warning(
            "Cosmos DB answered %s to %s %s (retry after %s ms); the SDK retries it",
            status,
            request.method,
            request.url,
            retry_after,
        )


@translate_errors(AzureError, OSError)
class CosmosStore(ConversationStore):
    """:class:`ConversationStore` on one Cosmos DB container (see the module docstring)."""

    def __init__(
        self,
        endpoint: str,
        key: str | None,
        database: str,
        container: str,
        conversation_ttl_days: int | None = 30,
        *,
        connection_verify: bool | None = None,
        item_ttl_days: int | None = None,
        retry_total: int = 9,
        retry_backoff_max: int = 30,
        max_item_bytes: int | None = MAX_ITEM_BYTES,
    ) -> None:
        """``key`` None = Entra ID (DefaultAzureCredential). ``connection_verify=False`` skips TLS
        checks (the SDK already does for ``localhost``/``127.0.0.1``, e.g. the emulator).
        ``item_ttl_days`` expires dialog-state items (None: never). ``max_item_bytes``: items larger
        are refused before they are sent (None: only the service's own 2 MB limit, its 413)."""
        self._max_item_bytes = max_item_bytes
        self._endpoint = endpoint
        self._key = key
        self._database_name = database
        self._container_name = container
        self._ttl = conversation_ttl_days * 86400 if conversation_ttl_days else None
        self._item_ttl = item_ttl_days * 86400 if item_ttl_days else None
        self._connection_verify = connection_verify
        self._retry_total = retry_total
        self._retry_backoff_max = retry_backoff_max
        self._client: CosmosClient | None = None
        self._credential: Any = None
        self._container: ContainerProxy | None = None
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    # --- lifecycle ---
    async def open(self) -> None:
        """Connect; create the database and container if missing (needs a key or control-plane rights)."""
        credential: Any = self._key
        if credential is None:  # built off the loop: it looks at the environment and files
            self._credential = credential = await asyncio.to_thread(DefaultAzureCredential)
        options: dict[str, Any] = {
            "retry_total": self._retry_total,
            "retry_backoff_max": self._retry_backoff_max,
            "raw_response_hook": _log_retried_response,
        }
        if self._connection_verify is not None:
            options["connection_verify"] = self._connection_verify
        # The client's constructor builds its user agent from platform.platform(), which runs
        # `uname -p` in a subprocess on first use: do that (cached afterwards) off the loop.
        await asyncio.to_thread(platform.platform)
        self._client = CosmosClient(self._endpoint, credential=credential, **options)
        try:
            database = self._client.get_database_client(self._database_name)
            container = database.get_container_client(self._container_name)
            for attempt in range(5):
                try:
                    properties = await container.read()
                    break
                except exceptions.CosmosResourceNotFoundError:
                    pass
                try:
                    database = await self._client.create_database_if_not_exists(self._database_name)
                    container = await database.create_container_if_not_exists(
                        self._container_name,
                        partition_key=PartitionKey(path="/pk"),
                        default_ttl=-1,
                        indexing_policy=INDEXING_POLICY,
                    )
                except exceptions.CosmosResourceExistsError:
                    # Several instances starting at once: another created the database or the
                    # container between our read and our create. Read again (it may still be creating).
                    await asyncio.sleep(0.2 * (attempt + 1))
            else:
                raise StoreError(f"container {self._container_name!r} could not be read or created (it kept "
                                 "appearing and disappearing; is something deleting it?)")
        except BaseException:
            await self.close()
            raise
        paths = (properties.get("partitionKey") or {}).get("paths")
        if paths != ["/pk"]:
            await self.close()
            raise StoreError(f"container {self._container_name!r} has partition key {paths}, expected ['/pk']")
        if properties.get("defaultTtl") is None:
            log.warning("container %r has TTL disabled: idle conversations will never expire", self._container_name)
        self._container = container

    async def close(self) -> None:
        client, credential = self._client, self._credential
        self._client = self._credential = self._container = None
        if client is not None:
            await client.close()
        if credential is not None:
            await credential.close()

    @property
    def container(self) -> ContainerProxy:
        if self._container is None:
            raise StoreError("CosmosStore used before open()")
        return self._container

    # --- helpers ---
    @staticmethod
    def partition(key: str) -> str:
        """The partition key value of a conversation."""
        return cosmos_id("", key)

    def _base(self, key: str, item_id: str, kind: str, ttl: int | None) -> JSON:
        doc: JSON = {
            "id": item_id,
            "pk": self.partition(key),
            "type": kind,
            "key": key,
            "schema_version": SCHEMA_VERSION,
        }
        if ttl is not None:
            doc["ttl"] = ttl
        return doc

    def _check_size(self, what: str, doc: JSON) -> None:
        if self._max_item_bytes is not None:
            check_item_size(what, json.dumps(doc), self._max_item_bytes)

    async def _write(self, what: str, write: Awaitable[T]) -> T:
        """One write; the service's 413 ("Request size is too large") is :class:`ItemTooLargeError`."""
        try:
            return await write
        except exceptions.CosmosHttpResponseError as error:
            if _is_status(error, 413):
                raise ItemTooLargeError(what, None, MAX_ITEM_BYTES) from error
            raise

    async def _read(self, pk: str, item_id: str) -> JSON | None:
        try:
            return dict(await self.container.read_item(item_id, partition_key=pk))
        except exceptions.CosmosResourceNotFoundError:
            return None

    async def _read_conversation(self, pk: str) -> JSON | None:
        return await self._read(pk, CONVERSATION_ID)

    async def _query(self, query: str, pk: str | None = None, **params: Any) -> list[Any]:
        """Run a parameterised query; with ``pk`` in that partition (the query must filter on ``@pk``)."""
        if pk is not None:
            params["pk"] = pk
        parameters: list[dict[str, Any]] = [{"name": f"@{n}", "value": v} for n, v in params.items()]
        if pk is not None:
            pager = self.container.query_items(query, parameters=parameters, partition_key=pk)
        else:  # cross-partition
            pager = self.container.query_items(query, parameters=parameters)
        return [item async for item in pager]

    @staticmethod
    async def _map(fn: Callable[[A], Awaitable[T]], args: Iterable[A]) -> list[T]:
        """``[await fn(a) for a in args]``, concurrently but at most :data:`_FANOUT` at a time."""
        gate = asyncio.Semaphore(_FANOUT)

        async def one(arg: A) -> T:
            async with gate:
                return await fn(arg)

        return list(await asyncio.gather(*(one(a) for a in args)))

    # --- references ---
    async def save_reference(self, key: str, reference: JSON) -> None:
        doc = self._base(key, REFERENCE_ID, "reference", self._ttl)
        doc["reference"] = reference
        await self.container.upsert_item(doc)

    async def get_reference(self, key: str) -> JSON | None:
        doc = await self._read(self.partition(key), REFERENCE_ID)
        return doc["reference"] if doc else None

    # --- inbox ---
    def _event_doc(self, key: str, event: InboxEvent) -> JSON:
        doc = self._base(key, cosmos_id(EVENT_PREFIX, event.id), "event", self._ttl)
        doc.update(
            event_id=event.id,
            kind=event.kind,
            payload=event.payload,
            created_at=event.created_at,
            arrival=_arrival_clock.next(),
            processed=False,
        )
        return doc

    @staticmethod
    def _event_from_doc(doc: JSON) -> InboxEvent:
        return InboxEvent(id=doc["event_id"], kind=doc["kind"], payload=doc["payload"], created_at=doc["created_at"])

    async def append_event(self, key: str, event: InboxEvent) -> bool:
        doc = self._event_doc(key, event)  # stamps arrival now, in call order
        what = f"event {event.id!r} of conversation {key!r}"
        self._check_size(what, doc)
        try:
            await self._write(what, self.container.create_item(doc))
        except exceptions.CosmosResourceExistsError:
            return False
        return True

    async def has_event(self, key: str, event_id: str) -> bool:
        return await self.get_event(key, event_id) is not None

    async def get_event(self, key: str, event_id: str) -> InboxEvent | None:
        doc = await self._read(self.partition(key), cosmos_id(EVENT_PREFIX, event_id))
        return self._event_from_doc(doc) if doc else None

    async def annotate_event(self, key: str, event_id: str, name: str, value: Any) -> bool:
        """Read, change, replace with the item's etag (a 412: another writer moved, redo)."""
        pk, item_id = self.partition(key), cosmos_id(EVENT_PREFIX, event_id)
        while True:
            doc = await self._read(pk, item_id)
            if doc is None or doc.get("processed"):
                return False
            conversation = await self._read(pk, CONVERSATION_ID)  # marked processed by a commit, not yet here
            if conversation and event_id in conversation.get("processed", ()):
                return False
            new_doc = {k: v for k, v in doc.items() if not k.startswith("_")}
            new_doc["payload"] = {**doc["payload"], name: value}
            what = f"event {event_id!r} of conversation {key!r}"
            self._check_size(what, new_doc)
            if await self._replace_unchanged(what, item_id, new_doc, doc["_etag"]):
                return True

    async def _replace_unchanged(self, what: str, item_id: str, doc: JSON, etag: str) -> bool:
        """Replace the item if it still has ``etag``; False (412) when another writer moved first: read again."""
        try:
            await self._write(what, self.container.replace_item(item_id, doc, etag=etag,
                                                                match_condition=MatchConditions.IfNotModified))
        except exceptions.CosmosHttpResponseError as error:
            if _is_status(error, 412):
                return False
            raise
        return True

    async def pending_events(self, key: str) -> list[InboxEvent]:
        pk = self.partition(key)
        # The conversation item first: see "Keeping processed bounded" in the module docstring.
        conversation = await self._read(pk, CONVERSATION_ID)
        done = _done(conversation)
        docs = await self._query("SELECT * FROM c WHERE c.pk = @pk AND c.type = 'event' AND c.processed = false", pk=pk)
        return [self._event_from_doc(d) for d in _pending(docs, done)]

    async def count_pending_events(self, key: str) -> int:
        # One query for the conversation item's lists and the unflagged events' ids (the ingest's inbox cap
        # reads it for every message): a cap, so a count one commit old at worst is good enough.
        rows = await self._query(
            "SELECT c.id, c.type, c.event_id, c.processed, c.settled FROM c WHERE c.pk = @pk AND "
            "(c.id = @conversation OR (c.type = 'event' AND c.processed = false))",
            pk=self.partition(key), conversation=CONVERSATION_ID)
        done = _done(next((r for r in rows if r.get("type") == "conversation"), None))
        return sum(r.get("type") == "event" and r["event_id"] not in done for r in rows)

    async def _event_flags(self, pk: str, event_ids: Iterable[str]) -> dict[str, bool]:
        """event id -> its ``processed`` flag, for the ids whose event item exists."""
        wanted = sorted(set(event_ids))
        if not wanted:
            return {}
        rows = await self._query(
            "SELECT c.event_id, c.processed FROM c "
            "WHERE c.pk = @pk AND c.type = 'event' AND ARRAY_CONTAINS(@ids, c.event_id)",
            pk=pk,
            ids=wanted,
        )
        return {r["event_id"]: bool(r.get("processed")) for r in rows}

    async def _flag_processed(self, pk: str, event_ids: Iterable[str]) -> None:
        """Best effort: the conversation item's list stays authoritative until this lands."""

        async def flag(event_id: str) -> None:
            try:
                await self.container.patch_item(
                    cosmos_id(EVENT_PREFIX, event_id),
                    partition_key=pk,
                    patch_operations=[{"op": "set", "path": "/processed", "value": True}],
                )
            except exceptions.CosmosResourceNotFoundError:
                pass  # expired or deleted: nothing left to flag
            except AzureError as error:
                log.warning("could not flag event %r processed (the next commit retries): %s", event_id, error)

        await self._map(flag, event_ids)

    # --- the conversation record ---
    @staticmethod
    def _record_from_doc(key: str, doc: JSON) -> ConversationRecord:
        return ConversationRecord(
            key=key,
            etag=doc["_etag"],
            agent_state=doc.get("agent_state"),
            outbox=tuple(OutboxMessage(m["id"], m["activity"]) for m in doc.get("outbox", ())),
            turns=doc.get("turns", 0),
            schema_version=doc.get("schema_version", SCHEMA_VERSION),
            fence=doc.get("fence", 0),
        )

    async def load(self, key: str) -> ConversationRecord:
        doc = await self._read(self.partition(key), CONVERSATION_ID)
        return self._record_from_doc(key, doc) if doc else ConversationRecord(key=key)

    async def load_turn(self, key: str) -> TurnStart:
        """One query: the conversation item, the reference and the unflagged events (one partition).

        Read together, so the pending events are judged against the conversation item as it was with
        them; ``settled`` (below) keeps an id one commit longer in the item than its flag needs, so a
        query that saw the item after an id left it has also seen that event flagged."""
        pk = self.partition(key)
        docs = await self._query(
            "SELECT * FROM c WHERE c.pk = @pk AND (c.id = @conversation OR c.id = @reference OR "
            "(c.type = 'event' AND c.processed = false))",
            pk=pk, conversation=CONVERSATION_ID, reference=REFERENCE_ID)
        conversation = next((d for d in docs if d.get("type") == "conversation"), None)
        reference = next((d for d in docs if d.get("type") == "reference"), None)
        events = [d for d in docs if d.get("type") == "event"]
        if conversation is None:
            record = ConversationRecord(key=key)
        else:
            record = self._record_from_doc(key, conversation)
            self._remember(key, _Seen(conversation["_etag"], list(conversation.get("processed", ())),
                                      list(conversation.get("settled", ())),
                                      list(conversation.get("job_intents", ())),
                                      {d["event_id"]: d for d in events}))
        pending = [self._event_from_doc(d) for d in _pending(events, _done(conversation))]
        return TurnStart(record, pending, reference["reference"] if reference else None)

    def _remember(self, key: str, seen: _Seen) -> None:
        self._seen[key] = seen
        self._seen.move_to_end(key)
        while len(self._seen) > _SEEN_CONVERSATIONS:
            self._seen.popitem(last=False)

    async def commit(
        self,
        record: ConversationRecord,
        *,
        processed: Sequence[str] = (),
        new_jobs: Sequence[JobRecord] = (),
        fence: int | None = None,
    ) -> ConversationRecord:
        record = record.fenced(fence)  # issue 18: refuses a worker that lost the conversation
        key, pk = record.key, self.partition(record.key)
        seen = self._seen.get(key)
        if seen is not None and record.etag is not None and seen.etag == record.etag:
            # This process read (or wrote) the item at this etag: no read; the conditional write checks it.
            old_processed, old_intents = seen.processed, seen.intents  # the old ``settled`` ids leave now
            if seen.unflagged is not None:  # every unflagged event as read with the item
                unflagged = dict(seen.unflagged)
                flags = await self._event_flags(pk, [i for i in dict.fromkeys(processed) if i not in unflagged])
                flags.update({i: False for i in unflagged})
            else:  # the flags are not known: ask, as below
                unflagged = {}
                flags = await self._event_flags(pk, [*old_processed, *processed])

            def is_unflagged(event_id: str) -> bool:
                return flags.get(event_id) is False
        else:
            stored = await self._read(pk, CONVERSATION_ID)
            if (stored["_etag"] if stored else None) != record.etag:
                raise ConcurrencyError(key)
            old_processed = list(stored.get("processed", ())) if stored else []
            old_intents = list(stored.get("job_intents", ())) if stored else []
            unflagged = {}
            flags = await self._event_flags(pk, [*old_processed, *processed])

            def is_unflagged(event_id: str) -> bool:
                return flags.get(event_id) is False

        # Prune the processed list and add this commit's ids. An id whose flag is durable moves to
        # ``settled`` for one more commit, then leaves (the module docstring, "Keeping processed bounded").
        still_unflagged = [i for i in old_processed if is_unflagged(i)]
        settled = [i for i in old_processed if not is_unflagged(i)]
        added = [i for i in dict.fromkeys(processed) if is_unflagged(i) and i not in still_unflagged]
        processed_list = still_unflagged + added

        # Intents already committed may be materialised now; keep those that could not be.
        materialised = await self._map(self._materialise, old_intents)
        intents = [j for j, done in zip(old_intents, materialised, strict=True) if not done]
        known = {j["id"] for j in intents}
        for job in new_jobs:
            if job.id not in known:
                known.add(job.id)
                intents.append(job.to_json())

        doc = self._base(key, CONVERSATION_ID, "conversation", self._ttl)
        doc.update(
            agent_state=record.agent_state,
            outbox=[{"id": m.id, "activity": m.activity} for m in record.outbox],
            has_outbox=bool(record.outbox),
            turns=record.turns,
            fence=record.fence,
            processed=processed_list,
            settled=settled,
            job_intents=intents,
            updated_at=time.time(),
        )
        self._check_size(f"conversation {key!r}", doc)
        for job in new_jobs:
            self._check_size(f"job {job.id!r}", self._job_doc(job))
        # The flags this process holds the event items for go in the same request, after the write.
        flag_now = [unflagged[i] for i in processed_list if i in unflagged]
        flagged: set[str] = set()
        written: JSON
        try:
            if record.etag is None:
                written = dict(await self.container.create_item(doc))
            elif not flag_now:
                written = dict(await self.container.replace_item(
                    CONVERSATION_ID, doc, etag=record.etag, match_condition=MatchConditions.IfNotModified
                ))
            else:
                written, flagged = await self._write_and_flag(pk, doc, record.etag, flag_now)
        except (
            exceptions.CosmosAccessConditionFailedError,  # 412: etag moved
            exceptions.CosmosResourceExistsError,  # 409: created by someone else
            exceptions.CosmosResourceNotFoundError,  # 404: deleted (expired) meanwhile
        ):
            self._seen.pop(key, None)
            raise ConcurrencyError(key) from None
        except exceptions.CosmosHttpResponseError as error:
            if _is_status(error, 413):
                raise ItemTooLargeError(f"conversation {key!r}", None, MAX_ITEM_BYTES) from error
            raise

        # After the commit: the hints, best effort (the next commit or job read repeats them).
        try:
            await self._flag_processed(pk, [i for i in processed_list if i not in flagged])
            await self._map(self._materialise, intents)
        except AzureError as error:  # the commit stands; only the hints are late
            log.warning("after committing %r: %s (the next commit or job read repeats it)", key, error)
        self._remember(key, _Seen(written["_etag"], processed_list, settled, intents))
        return record.evolve(etag=written["_etag"])

    async def _write_and_flag(self, pk: str, doc: JSON, etag: str, events: list[JSON]) -> tuple[JSON, set[str]]:
        """One batch request: the conditional replace of the conversation item first, then each event item
        replaced with ``processed: true`` (conditional on the etag it was read with).

        On Cosmos DB a batch is a transaction: all or nothing. The wire-protocol test server runs the
        operations in order and stops at the first failure without undoing the earlier ones, so there the
        flags are what they always were here, hints written after the commit. Either way the commit
        stands exactly when the first operation succeeded. Returns the written item and the flagged ids."""
        operations: list[Any] = [("replace", (CONVERSATION_ID, doc), {"if_match_etag": etag})]
        for event in events:
            body = {k: v for k, v in event.items() if not k.startswith("_")}
            body["processed"] = True
            operations.append(("replace", (event["id"], body), {"if_match_etag": event["_etag"]}))
        try:
            results = list(await self.container.execute_item_batch(operations, partition_key=pk))
        except exceptions.CosmosBatchOperationError as error:
            results = list(error.operation_responses or [])
            first = int(results[0]["statusCode"]) if results else int(error.status_code or 500)
            if first in (404, 409, 412):  # the commit itself failed: someone else moved first
                self._seen.pop(str(doc["key"]), None)
                raise ConcurrencyError(str(doc["key"])) from None
            if first == 413:
                raise ItemTooLargeError(f"conversation {doc['key']!r}", None, MAX_ITEM_BYTES) from error
            if first >= 400 and first != 424:
                raise
            if first == 424:  # a flag failed and the service undid the whole batch: write without the flags
                replaced = await self.container.replace_item(CONVERSATION_ID, doc, etag=etag,
                                                             match_condition=MatchConditions.IfNotModified)
                return dict(replaced), set()
        written: JSON = dict(results[0].get("resourceBody") or {})
        written.setdefault("_etag", results[0].get("eTag"))
        flagged = {e["event_id"] for e, r in zip(events, results[1:], strict=False) if int(r["statusCode"]) < 400}
        return written, flagged

    async def remove_from_outbox(self, record: ConversationRecord, ids: Iterable[str], *,
                                 fence: int | None = None) -> ConversationRecord:
        """A conditional patch that removes the sent messages (not a rewrite of the whole item)."""
        gone = set(ids)
        indexes = [n for n, m in enumerate(record.outbox) if m.id in gone]
        if not indexes:
            return record
        fenced = record.fenced(fence)  # issue 18: refuses a worker that lost the conversation
        remaining = tuple(m for m in record.outbox if m.id not in gone)
        operations: list[dict[str, Any]] = [{"op": "remove", "path": f"/outbox/{n}"} for n in reversed(indexes)]
        operations.append({"op": "set", "path": "/has_outbox", "value": bool(remaining)})
        if fenced.fence != record.fence:
            operations.append({"op": "set", "path": "/fence", "value": fenced.fence})
        if record.etag is None or len(operations) > _MAX_PATCH_OPERATIONS:
            return await super().remove_from_outbox(record, gone, fence=fence)  # a commit: one full write
        try:
            written = await self.container.patch_item(CONVERSATION_ID, partition_key=self.partition(record.key),
                                                      patch_operations=operations, etag=record.etag,
                                                      match_condition=MatchConditions.IfNotModified)
        except (exceptions.CosmosAccessConditionFailedError, exceptions.CosmosResourceNotFoundError):
            self._seen.pop(record.key, None)
            raise ConcurrencyError(record.key) from None
        seen = self._seen.get(record.key)
        if seen is not None and seen.etag == record.etag:
            seen.etag = written["_etag"]
        return fenced.evolve(outbox=remaining, etag=written["_etag"])

    async def conversations_with_work(self) -> list[str]:
        # Events before conversation items: a race can only add a key with no work left (harmless).
        rows = await self._query("SELECT c.pk, c.key, c.event_id FROM c WHERE c.type = 'event' AND c.processed = false")
        candidates: dict[str, tuple[str, set[str]]] = {}
        for row in rows:
            candidates.setdefault(row["pk"], (row["key"], set()))[1].add(row["event_id"])
        conversations = await self._map(self._read_conversation, candidates)
        keys: set[str] = set()
        for (key, ids), conversation in zip(candidates.values(), conversations, strict=True):
            if ids - _done(conversation):
                keys.add(key)
        outbox = await self._query("SELECT VALUE c.key FROM c WHERE c.type = 'conversation' AND c.has_outbox = true")
        keys.update(outbox)
        return sorted(keys)

    # --- jobs ---
    def _job_doc(self, job: JobRecord) -> JSON:
        doc = self._base(
            job.conversation_key, cosmos_id(JOB_PREFIX, job.id), "job", self._ttl if job.finished else None
        )
        doc.update(job_id=job.id, status=job.status, created_at=job.created_at, job=job.to_json())
        return doc

    async def _materialise(self, job_json: JSON) -> bool:
        """Create the job item of an intent unless it exists; True once it does."""
        try:
            await self.container.create_item(self._job_doc(JobRecord.from_json(job_json)))
        except exceptions.CosmosResourceExistsError:
            return True
        except AzureError as error:
            log.warning("could not materialise job %r (retried later): %s", job_json.get("id"), error)
            return False
        return True

    async def _intents(self, pk: str) -> list[JSON]:
        conversation = await self._read(pk, CONVERSATION_ID)
        return list(conversation.get("job_intents", ())) if conversation else []

    async def get_job(self, key: str, job_id: str) -> JobRecord:
        pk = self.partition(key)
        item_id = cosmos_id(JOB_PREFIX, job_id)
        doc = await self._read(pk, item_id)
        if doc is None:
            intent = next((j for j in await self._intents(pk) if j["id"] == job_id), None)
            if intent is None:
                raise JobNotFoundError(key, job_id)
            if not await self._materialise(intent):
                return JobRecord.from_json(intent)
            doc = await self._read(pk, item_id)
            if doc is None:  # materialised, then deleted or expired in between
                raise JobNotFoundError(key, job_id)
        return JobRecord.from_json(doc["job"])

    async def patch_job(self, key: str, job_id: str, changes: Mapping[str, Any]) -> JobRecord:
        job = await self._change_job(key, job_id, lambda current: current.evolve(**changes))
        assert job is not None  # the change always applies
        return job

    async def transition_job(self, key: str, job_id: str, from_status: str,
                             changes: Mapping[str, Any]) -> JobRecord | None:
        """Of two writers, the second gets a 412, reads again and sees the status moved."""
        return await self._change_job(
            key, job_id, lambda current: current.evolve(**changes) if current.status == from_status else None)

    async def _change_job(self, key: str, job_id: str,
                          change: Callable[[JobRecord], JobRecord | None]) -> JobRecord | None:
        """Read, ``change`` (None: leave it as it is), replace with the item's etag; a 412 means another
        writer moved: read and change again."""
        pk, item_id = self.partition(key), cosmos_id(JOB_PREFIX, job_id)
        while True:
            doc = await self._read(pk, item_id)
            if doc is None:
                await self.get_job(key, job_id)  # materialises a job still held as an intent, or raises
                doc = await self._read(pk, item_id)
            if doc is None:
                raise JobNotFoundError(key, job_id)
            job = change(JobRecord.from_json(doc["job"]))
            if job is None:
                return None
            new_doc, what = self._job_doc(job), f"job {job_id!r}"
            self._check_size(what, new_doc)
            if await self._replace_unchanged(what, item_id, new_doc, doc["_etag"]):
                return job

    async def list_jobs(self, key: str) -> list[JobRecord]:
        pk = self.partition(key)
        intents = await self._intents(pk)
        materialised = await self._map(self._materialise, intents)
        docs = await self._query("SELECT VALUE c.job FROM c WHERE c.pk = @pk AND c.type = 'job'", pk=pk)
        seen = {d["id"] for d in docs}
        docs += [j for j, done in zip(intents, materialised, strict=True) if not done and j["id"] not in seen]
        return sorted((JobRecord.from_json(d) for d in docs), key=lambda j: (j.created_at, j.id))

    async def unfinished_jobs(self) -> list[JobRecord]:
        rows = await self._query(
            "SELECT c.job_intents FROM c WHERE c.type = 'conversation' AND ARRAY_LENGTH(c.job_intents) > 0"
        )
        intents = [j for row in rows for j in row["job_intents"]]
        materialised = await self._map(self._materialise, intents)
        docs = await self._query(
            "SELECT VALUE c.job FROM c WHERE c.type = 'job' AND ARRAY_CONTAINS(@statuses, c.status)",
            statuses=list(_UNFINISHED),
        )
        seen = {(d["conversation_key"], d["id"]) for d in docs}
        docs += [
            j
            for j, done in zip(intents, materialised, strict=True)
            if not done and j.get("status") in _UNFINISHED and (j["conversation_key"], j["id"]) not in seen
        ]
        return sorted((JobRecord.from_json(d) for d in docs), key=lambda j: (j.created_at, j.conversation_key, j.id))

    # --- forgetting ---
    async def forget_conversation(self, key: str, *, item_keys: Iterable[str] = ()) -> int:
        """See :meth:`ConversationStore.forget_conversation`. Several writes, each idempotent: a crash
        part-way leaves some of it for the next call. Events go last, so the reset event that names
        the items to delete keeps its payload until they are gone."""
        pk = self.partition(key)
        conversation = await self._read(pk, CONVERSATION_ID)
        intents = {j["id"] for j in conversation.get("job_intents", ())} if conversation else set()
        processed = set(conversation.get("processed", ())) if conversation else set()

        async def delete(pk: str, item_id: str) -> int:
            try:
                await self.container.delete_item(item_id, partition_key=pk)
            except exceptions.CosmosResourceNotFoundError:
                return 0
            return 1

        changed = sum(await self._map(lambda k: delete(self._item_pk(k), ITEM_ID), dict.fromkeys(item_keys)))
        jobs = await self._query("SELECT c.job_id, c.status FROM c WHERE c.pk = @pk AND c.type = 'job'", pk=pk)
        unfinished = intents | {j["job_id"] for j in jobs if j["status"] in _UNFINISHED}
        finished = [j["job_id"] for j in jobs if j["job_id"] not in unfinished]
        changed += sum(await self._map(lambda i: delete(pk, cosmos_id(JOB_PREFIX, i)), finished))
        events = await self._query(
            "SELECT c.event_id, c.processed, c.redacted FROM c WHERE c.pk = @pk AND c.type = 'event'", pk=pk)
        redact = [e["event_id"] for e in events
                  if (e.get("processed") or e["event_id"] in processed) and not e.get("redacted")
                  and e["event_id"] not in {finished_event_id(i) for i in unfinished}]

        async def redact_one(event_id: str) -> int:
            try:
                await self.container.patch_item(cosmos_id(EVENT_PREFIX, event_id), partition_key=pk,
                                                patch_operations=[{"op": "set", "path": "/payload", "value": {}},
                                                                  {"op": "set", "path": "/redacted", "value": True}])
            except exceptions.CosmosResourceNotFoundError:
                return 0  # expired meanwhile
            return 1

        return changed + sum(await self._map(redact_one, redact))

    # --- small key/value items ---
    @staticmethod
    def _item_pk(key: str) -> str:
        return cosmos_id(ITEM_PK_PREFIX, key)

    async def read_items(self, keys: Iterable[str]) -> dict[str, JSON]:
        wanted = list(dict.fromkeys(keys))
        docs = await self._map(lambda k: self._read(self._item_pk(k), ITEM_ID), wanted)
        return {k: d["value"] for k, d in zip(wanted, docs, strict=True) if d is not None}

    async def write_items(self, items: Mapping[str, JSON]) -> None:
        def doc(key: str, value: JSON) -> JSON:
            body: JSON = {
                "id": ITEM_ID,
                "pk": self._item_pk(key),
                "type": "item",
                "key": key,
                "schema_version": SCHEMA_VERSION,
                "value": value,
            }
            if self._item_ttl is not None:
                body["ttl"] = self._item_ttl
            return body

        await self._map(lambda kv: self.container.upsert_item(doc(*kv)), items.items())

    async def delete_items(self, keys: Iterable[str]) -> None:
        async def delete(key: str) -> None:
            with contextlib.suppress(exceptions.CosmosResourceNotFoundError):
                await self.container.delete_item(ITEM_ID, partition_key=self._item_pk(key))

        await self._map(delete, dict.fromkeys(keys))
