"""A plain turn's round trips to the store are pinned, so a change cannot silently add any (issue 17).

Not a timing test: it counts. The real :class:`ConversationProcessor` and :class:`AgentTurnRunner`
(offline model, the real AutoGen team and turn tools) run one plain user turn (``my name is …``)
in a conversation that already had two, on every store: the processor's calls to the store are
counted (memory, SQLite, Cosmos), and on the Cosmos wire server every request it received
(``harness/peers/cosmos.py:counters``). The edge's share of a turn (saving the reference once,
the redelivery check, appending the event) is pinned end to end in
tests/e2e/test_turn_requests.py.
"""

from __future__ import annotations

import asyncio
from typing import Any

from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import AgentTurnRunner
from agent.tools import turn_tools
from harness.peers import cosmos as cosmos_peer
from jobs.activate_line import activate_new_line, make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from storage.abc import JSON, ConversationStore, InboxEvent
from storage.cosmos import CosmosStore

REFERENCE: JSON = {"conversation": {"id": "pin"}, "serviceUrl": "http://127.0.0.1:9/", "channelId": "msteams",
                   "bot": {"id": "bot-1"}, "user": {"id": "user-1"}}

#: What one plain turn asks of the store: a round's start, the turn's commit, the sent reply's removal.
PLAIN_TURN_CALLS = ["load_turn", "commit", "remove_from_outbox"]
#: ... and on Cosmos DB: one query, one batch (the commit's replace and the event's flag), one patch.
PLAIN_TURN_COSMOS = {"query": 1, "batch": 1, "patch": 1}


class CountingStore:
    """Wraps a store: records the name of every coroutine method called (in order)."""

    def __init__(self, inner: ConversationStore) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not asyncio.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await attr(*args, **kwargs)

        return counted


class Sender:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        self.texts.append(str(activity.get("text")))
        return str(len(self.texts))

    async def typing(self, reference: JSON) -> None:
        return None


def _processor(store: CountingStore, sender: Sender) -> ConversationProcessor:
    registry = JobRegistry([make_activate_line_tool(20.0)])
    jobs = JobRunner(store, registry, lambda key: None)  # type: ignore[arg-type]
    runner = AgentTurnRunner(OfflineChatCompletionClient(tools=[activate_new_line]),
                             lambda scope: turn_tools(scope, registry, store, jobs))  # type: ignore[arg-type]
    return ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("hi"))  # type: ignore[arg-type]


async def _turn(store: ConversationStore, processor: ConversationProcessor, key: str, n: int) -> None:
    await store.append_event(key, InboxEvent(id=f"activity-{n}", kind="message", payload={"text": f"my name is A{n}"}))
    processor.wake(key)
    await processor.idle()


async def _counters(store: ConversationStore, reset: bool = False) -> dict[str, Any] | None:
    """The wire server's counters (None: not the local wire server, e.g. a real account)."""
    if not isinstance(store, CosmosStore) or not store._endpoint.startswith("https://127.0.0.1:"):
        return None
    return await asyncio.to_thread(cosmos_peer.counters, store._endpoint, reset=reset)


async def test_a_plain_turn_makes_three_store_calls(store: ConversationStore, key: str) -> None:
    counting, sender = CountingStore(store), Sender()
    processor = _processor(counting, sender)
    await store.save_reference(key, REFERENCE)
    for n in range(2):  # the steady state: the conversation item exists
        await _turn(store, processor, key, n)
    await store.append_event(key, InboxEvent(id="activity-2", kind="message", payload={"text": "my name is A2"}))
    counting.calls.clear()
    await _counters(store, reset=True)
    processor.wake(key)
    await processor.idle()
    counted = await _counters(store)
    assert sender.texts[-1] == "Nice to meet you, A2. I'll remember that."
    assert counting.calls == PLAIN_TURN_CALLS
    if counted is not None:
        # Only this test's requests: the container is shared, but nothing else runs meanwhile.
        ops = {op: v["requests"] for op, v in counted["by_operation"].items()}
        assert ops == PLAIN_TURN_COSMOS, counted["log"]
        full_writes = [e for e in counted["log"] if e["id"].split(",")[0] == "conversation"
                       and e["operation"] in ("create", "replace", "upsert", "batch")]
        assert len(full_writes) == 1, counted["log"]  # the outbox removal patches, it does not rewrite


async def test_the_reply_is_out_of_the_outbox_and_nothing_is_pending(store: ConversationStore, key: str) -> None:
    """What the lean round trips leave in the store is what the old ones left."""
    counting, sender = CountingStore(store), Sender()
    processor = _processor(counting, sender)
    await store.save_reference(key, REFERENCE)
    for n in range(4):
        await _turn(store, processor, key, n)
    record = await store.load(key)
    assert record.outbox == () and record.turns == 4
    assert await store.pending_events(key) == []
    assert key not in await store.conversations_with_work()
    assert len(sender.texts) == 4

