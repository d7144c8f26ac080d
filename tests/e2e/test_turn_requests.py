"""A plain turn's Cosmos DB requests, end to end: the real app on the wire server (issue 17).

Not a timing test: it counts every request the wire server received for one plain user turn (from
the POST until the app is quiet), with the app's default ingest limits and roles (``ROLE=all``, no
PostgreSQL: the only process taking messages in): the edge's one create of the event (which is the
redelivery check; the inbox cap was counted and the dialog state read on the conversation's first
message, and this process has seen every change of either since), then the worker's one query, one
batch (the commit and the event's flag) and one patch (the reply out of the outbox). A change that adds a
round trip, or a second full write of the conversation item, fails here. The processor's own store
calls are pinned on every store in tests/storage/test_turn_round_trips.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from harness.activities import message
from harness.botproc import BotProcess
from harness.connector import RecordingConnector
from harness.peers import cosmos as cosmos_peer

#: By operation: what one plain turn costs on Cosmos DB with the default settings.
PLAIN_TURN = {"query": 1, "create": 1, "batch": 1, "patch": 1}


@pytest.fixture
def backend() -> str:
    return "cosmos"


def _quiet(endpoint: str, timeout: float = 20.0) -> dict[str, Any]:
    """The counters once no request arrived for 0.5 s."""
    deadline = time.monotonic() + timeout
    last, since = cosmos_peer.counters(endpoint), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cosmos_peer.counters(endpoint)
        if now["requests"] != last["requests"]:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= 0.5:
            return now
    raise AssertionError(f"the app did not go quiet: {last['log'][-10:]}")


def test_a_plain_turn_is_four_requests_and_one_full_write(launch: Any, conn: RecordingConnector, conv: str,
                                                           cosmos_endpoint: str) -> None:
    bot: BotProcess = launch({})
    for n in range(2):  # the steady state: reference stored, conversation item written
        bot.post_activity(message(f"my name is Warm{n}", conversation_id=conv, service_url=conn.url,
                                  activity_id=uuid.uuid4().hex))
        conn.wait_for_texts(n + 1, conv, timeout=30)
    _quiet(cosmos_endpoint)
    cosmos_peer.counters(cosmos_endpoint, reset=True)
    status, _ = bot.post_activity(message("my name is Ada", conversation_id=conv, service_url=conn.url,
                                          activity_id=uuid.uuid4().hex))
    assert status == 201
    assert conn.wait_for_texts(3, conv, timeout=30)[2] == "Nice to meet you, Ada. I'll remember that."
    counted = _quiet(cosmos_endpoint)
    ops = {op: v["requests"] for op, v in counted["by_operation"].items()}
    assert ops == PLAIN_TURN, counted["log"]
    full_writes = [e for e in counted["log"] if e["id"].split(",")[0] == "conversation"
                   and e["operation"] in ("create", "replace", "upsert", "batch")]
    assert len(full_writes) == 1, counted["log"]
