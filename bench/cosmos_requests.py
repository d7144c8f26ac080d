"""Cosmos DB requests and bytes per plain turn and per job, counted at the wire server.

The real app as a process on the Cosmos DB wire server (``harness/peers/cosmos.py``), which
counts every request it receives by operation (point read, query, create, replace, upsert,
patch, delete, metadata) and the bytes of each request body (``GET /_counters``). One turn is
everything the store sees from the POST of a user message until the app is quiet again (the
reply sent and removed from the outbox): the edge's ingest, the turn, the commit, the flush.

* **plain turn**: ``my name is …`` in a conversation that already had two turns (the steady
  state: reference stored, conversation item present); the median over ``turns`` turns, each in
  its own conversation so that nothing is shared.
* **job**: ``activate line …`` (``ACTIVATE_LINE_SECONDS`` short) from the POST until the
  completion message was sent and the app is quiet: the turn that starts the job, its card, the
  job's own writes (running, progress, finished event, succeeded), the card updates and the
  announcement turn.

The request-unit estimate (:func:`request_units`) prices each counted operation with
Microsoft's published figures (see its docstring and bench/README.md).
"""

from __future__ import annotations

import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import Progress, SignallingConnector, env_for_bot
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess
from harness.peers import cosmos as cosmos_peer

QUIET = 0.4  # seconds without a request: the app is done with the turn


def _wait_quiet(endpoint: str, timeout: float = 20.0) -> dict[str, Any]:
    """Poll the counters until they stop moving for QUIET seconds; return them (not reset)."""
    deadline = time.monotonic() + timeout
    last = cosmos_peer.counters(endpoint)
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = cosmos_peer.counters(endpoint)
        if now["requests"] != last["requests"]:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= QUIET:
            return now
    return last


def _say(bot: BotProcess, connector: SignallingConnector, conversation: str, text: str) -> None:
    status, body = bot.post_activity(message(text, conversation_id=conversation, service_url=connector.url,
                                             activity_id=uuid.uuid4().hex))
    if not 200 <= status < 300:
        raise RuntimeError(f"the bot answered {status}: {body[:200]}")


def _summary(counted: dict[str, Any]) -> dict[str, Any]:
    """One measurement: requests and bytes by operation, and the writes of the conversation item."""
    log = counted.get("log", [])
    # A full write of the conversation item: a create or replace of it, or a batch that starts with its replace.
    conversation_writes = [e for e in log if e["id"].split(",")[0] == "conversation"
                           and e["operation"] in ("create", "replace", "upsert", "batch")]
    return {
        "requests": counted["requests"],
        "bytes_sent": counted["bytes_sent"],
        "by_operation": {op: dict(v) for op, v in sorted(counted["by_operation"].items())},
        "conversation_full_writes": len(conversation_writes),
        "conversation_write_bytes": sum(e["bytes"] for e in conversation_writes),
        "log": log,
    }


def _median_summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ops = sorted({op for s in samples for op in s["by_operation"]})
    return {
        "samples": len(samples),
        "requests": statistics.median(s["requests"] for s in samples),
        "bytes_sent": statistics.median(s["bytes_sent"] for s in samples),
        "conversation_full_writes": statistics.median(s["conversation_full_writes"] for s in samples),
        "conversation_write_bytes": statistics.median(s["conversation_write_bytes"] for s in samples),
        "by_operation": {op: {k: statistics.median(s["by_operation"].get(op, {}).get(k, 0) for s in samples)
                              for k in ("requests", "bytes")} for op in ops},
        "example": samples[len(samples) // 2]["log"],
    }


def run(turns: int, progress: Progress, weight: float) -> dict[str, Any]:
    """The figures, or ``{"skipped": why}`` (no server here, or the measurement failed: the other
    benchmarks' figures must still be written)."""
    try:
        return _run(turns, progress, weight)
    except Exception as exc:
        return {"skipped": f"failed: {type(exc).__name__}: {str(exc)[:300]}"}


def _run(turns: int, progress: Progress, weight: float) -> dict[str, Any]:
    reason = cosmos_peer.unavailable_reason()
    if reason:
        progress.advance(weight)
        return {"skipped": reason}
    progress.set("Cosmos requests: starting the server and the bot")
    with (tempfile.TemporaryDirectory(prefix="bench-cosmos-") as tmp, cosmos_peer.cosmos_server() as endpoint,
          SignallingConnector() as connector):
        emulator_key = cosmos_peer.EMULATOR_KEY  # the public emulator key  secret-scan: allow
        env = env_for_bot(COSMOS_ENDPOINT=endpoint, COSMOS_KEY=emulator_key, COSMOS_DATABASE="bench",
                          COSMOS_CONTAINER=f"requests-{uuid.uuid4().hex[:8]}", ACTIVATE_LINE_SECONDS="0.3")
        # The default inbox cap: it reads the store for every message. The rate limits stay off (they are
        # in memory, no store request; one user posting this fast would be refused).
        env.pop("MAX_PENDING_EVENTS")
        bot = BotProcess(Path(tmp) / "ours", env=env)
        bot.start(timeout=60)
        try:
            plain: list[dict[str, Any]] = []
            for n in range(turns):
                conversation = new_conversation_id("cosmosreq")
                for i in range(2):  # the steady state: reference stored, conversation item written
                    _say(bot, connector, conversation, f"my name is Warm{i}")
                    connector.wait_for_texts(i + 1, conversation, timeout=30)
                _wait_quiet(endpoint)
                cosmos_peer.counters(endpoint, reset=True)
                _say(bot, connector, conversation, f"my name is Ada{n}")
                connector.wait_for_texts(3, conversation, timeout=30)
                plain.append(_summary(_wait_quiet(endpoint)))
                progress.advance(weight * 0.6 / turns, f"Cosmos requests: plain turn {n + 1}/{turns}")
            conversation = new_conversation_id("cosmosjob")
            _say(bot, connector, conversation, "my name is Job")
            connector.wait_for_texts(1, conversation, timeout=30)
            _wait_quiet(endpoint)
            cosmos_peer.counters(endpoint, reset=True)
            _say(bot, connector, conversation, "activate line 555-0101")
            connector.wait_for(lambda c: any("is active" in t for t in c.texts(conversation)), timeout=60)
            job = _summary(_wait_quiet(endpoint, timeout=30))
            progress.advance(weight * 0.4, "Cosmos requests: done")
        finally:
            bot.kill()
    out = {"turn": _median_summary(plain), "job": job}
    out["ru"] = {"turn": request_units(out["turn"]["example"]), "job": request_units(job["log"])}
    return out


# --- request units --------------------------------------------------------------------------------
#: Microsoft's published request-unit figures (learn.microsoft.com/azure/cosmos-db/request-units and
#: .../optimize-cost-reads-writes): a point read of a 1 KB item costs 1 RU, a write (create, replace,
#: upsert, delete) of a 1 KB item about 5.5 RU (with default indexing; "about 5 RU" for a 1 KB item in
#: the capacity planner), both growing about linearly with the item's size (reads ~1 RU per KB over
#: 1 KB, writes ~2.5 x the read cost and up with the indexed properties). A patch costs as a write of
#: the patched item. A query's minimum is 2.5 RU for a small single-partition query served by the index
#: (the documented charge of a query that returns one page is at least that of the point reads of what
#: it returns).
READ_RU_PER_KB = 1.0
WRITE_RU_BASE = 5.5
WRITE_RU_PER_EXTRA_KB = 2.0
QUERY_RU_MIN = 2.5
#: Serverless: USD 0.25 per million RUs (2025 list price, most regions). Provisioned: USD 0.008 per
#: 100 RU/s per hour (manual throughput, single-region write), 400 RU/s minimum per container;
#: autoscale 1.5 x that price, scaling between 10% and 100% of its maximum.
SERVERLESS_USD_PER_MILLION_RU = 0.25
PROVISIONED_USD_PER_100RUS_HOUR = 0.008
HOURS_PER_MONTH = 730
#: In a batch the counter sees one body: each operation after the first is priced as an event item this size.
BATCH_ITEM_BYTES = 700


def _op_ru(operation: str, size_bytes: int) -> float:
    kb = max(1.0, size_bytes / 1024)
    if operation == "read":
        return READ_RU_PER_KB * kb
    if operation in ("create", "replace", "upsert", "patch", "delete"):
        return WRITE_RU_BASE + WRITE_RU_PER_EXTRA_KB * (kb - 1)
    if operation == "query":
        return QUERY_RU_MIN
    return 0.0  # metadata requests (container, partition key ranges) are not charged to the container


def request_units(log: list[dict[str, Any]], read_sizes: dict[str, int] | None = None) -> dict[str, Any]:
    """The RU estimate of one measured sequence of requests. Written sizes are the request bodies;
    a point read is priced at the size of the item it reads (the conversation item: the last size
    written in the sequence; other items: 1 KB)."""
    sizes = dict(read_sizes or {})
    total = 0.0
    by_operation: dict[str, float] = {}
    entries: list[float] = []
    for entry in log:
        op, item = entry["operation"], entry["id"]
        if op in ("create", "replace", "upsert"):
            sizes[item] = entry["bytes"]
        ru = _op_ru(op, sizes.get(item, 1024) if op == "read" else entry["bytes"])
        if op == "patch":  # priced as a write of the patched item
            ru = _op_ru("replace", sizes.get(item, 1024))
        if op == "batch":  # the sum of its operations: the first the rest of the body, each other ~1 event item
            items = item.split(",")
            first = max(0, entry["bytes"] - BATCH_ITEM_BYTES * (len(items) - 1))
            sizes[items[0]] = first
            ru = _op_ru("replace", first) + (len(items) - 1) * _op_ru("replace", BATCH_ITEM_BYTES)
        total += ru
        entries.append(ru)
        by_operation[op] = by_operation.get(op, 0.0) + ru
    return {"total": total, "by_operation": by_operation, "entries": entries}


def monthly_cost(ru_per_turn: float, turns_per_month: int = 1_000_000, peak_to_mean: float = 10.0) -> dict[str, float]:
    """What ``turns_per_month`` turns cost: serverless (pay per RU), and provisioned throughput sized for
    a peak ``peak_to_mean`` times the monthly mean rate (floor 400 RU/s), manual and autoscale."""
    ru = ru_per_turn * turns_per_month
    serverless = ru / 1e6 * SERVERLESS_USD_PER_MILLION_RU
    mean_rus = ru / (HOURS_PER_MONTH * 3600)
    provisioned_rus = max(400.0, -(-mean_rus * peak_to_mean // 100) * 100)
    manual = provisioned_rus / 100 * PROVISIONED_USD_PER_100RUS_HOUR * HOURS_PER_MONTH
    autoscale_max = max(1000.0, provisioned_rus)
    # Autoscale bills the highest RU/s reached each hour, at least 10% of the max: at a steady mean load.
    autoscale = max(0.1 * autoscale_max, mean_rus) / 100 * PROVISIONED_USD_PER_100RUS_HOUR * 1.5 * HOURS_PER_MONTH
    return {"ru_per_month": ru, "serverless_usd": serverless, "mean_rus": mean_rus,
            "provisioned_rus": provisioned_rus, "provisioned_usd": manual, "autoscale_max_rus": autoscale_max,
            "autoscale_usd": autoscale}


if __name__ == "__main__":
    import json
    import sys

    from bench.common import NullProgress, quiet_env

    quiet_env()
    result = run(int(sys.argv[1]) if len(sys.argv) > 1 else 3, NullProgress(), 1.0)
    for name in ("turn", "job"):
        part = result.get(name, {})
        print(name, json.dumps({k: v for k, v in part.items() if k not in ("log", "example")}, indent=1))
        for entry in part.get("example") or part.get("log") or []:
            print("   ", entry)
    print(json.dumps(result.get("ru"), indent=1))
