"""Crash soak: many conversations with jobs while the bot is SIGKILLed and restarted at random.

A load thread plays the channel: it posts activities and, like the Bot Connector, redelivers
one (same activity id) until the bot acknowledges it with a 2xx. Every acknowledged message
goes into a ledger with the reply it must produce; every acknowledged activation also with
its completion message. A killer thread SIGKILLs a real app process at random moments and
starts it again. At the end the ledger is checked against what the recording connector got:

    conversations, messages, jobs, kills, lost (must be 0), duplicates (only the window
    between a send and its outbox mark may produce one), unloadable conversations (must be 0)

A reply counts as lost when it has not arrived once no expected reply has arrived for a minute
after the load stopped; while they still arrive the bot is only behind and the soak waits on
(the "drain" time it prints says how far behind it was).

Two deployments, the same load, killer and ledger:

* one process (``--role all``) on SQLite in the data dir: every kill hits it;
* ``--cluster``: 2 web + 3 worker processes on Cosmos DB (the wire server from harness/peers) and
  PostgreSQL (a throwaway server), the channel posting through the round-robin proxy, every worker
  active on its partitions (issue 18; leases of 3 s renewed every second). Each blow hits one
  process: a worker is SIGKILLed, or frozen (SIGSTOP for longer than its lease, then SIGCONT: its
  partitions move meanwhile and its late writes must be refused); a web instance is SIGKILLed.
  The summary says how many hit which.

Usage: ``python scripts/soak.py --kills 60 [--cluster]`` (``make soak [CLUSTER=1]``); the test
suite runs short forms of both.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness.activities import message, new_conversation_id  # noqa: E402
from harness.botproc import BotProcess, HttpEndpoint  # noqa: E402
from harness.cluster import BotCluster  # noqa: E402
from harness.connector import RecordingConnector  # noqa: E402
from storage.abc import ConversationStore  # noqa: E402
from storage.sqlite import SqliteStore  # noqa: E402

#: In cluster mode, the share of blows that hit a worker (turns, jobs and sends run there; the rest: a web
#: instance), and of those the share that freeze it instead of killing it.
WORKER_SHARE = 0.7
FREEZE_SHARE = 0.4
#: The kinds of blow, in the order the summary lists them.
KILL_KINDS = ("worker", "frozen worker", "web")
#: Cluster leases (PARTITION_LEASE_SECONDS / PARTITION_RENEW_SECONDS): a freeze outlasts the lease.
LEASE_SECONDS, RENEW_SECONDS = 3.0, 1.0
#: After the load stops, a reply that has not arrived when none has for this long (plus three job
#: durations) is lost. While replies keep arriving the bot is only behind, and the soak waits on,
#: up to MAX_DRAIN_SECONDS after the load stopped.
STALL_SECONDS = 60.0
MAX_DRAIN_SECONDS = 900.0


@dataclass
class Ledger:
    expected: list[tuple[str, str]] = field(default_factory=list)  # (conversation, text it must receive)
    messages: int = 0
    jobs: int = 0
    kills: int = 0
    kills_by: Counter[str] = field(default_factory=Counter)  # cluster mode: kind of process hit
    exits: list[str] = field(default_factory=list)  # processes found dead that no kill hit
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass(frozen=True)
class SoakReport:
    conversations: int
    messages: int
    jobs: int
    kills: int
    lost: list[tuple[str, str]]
    duplicates: int
    unloadable: list[str]
    kills_by: dict[str, int] = field(default_factory=dict)
    exits: list[str] = field(default_factory=list)
    late: list[tuple[str, str]] = field(default_factory=list)  # lost, but arrived in the second after the deadline
    drain_seconds: float = 0.0  # from the end of the load to the last expected reply (or giving up)

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unloadable

    def summary(self) -> str:
        kills = f"kills={self.kills}"
        if self.kills_by:
            by_kind = " ".join(f"{kind.replace(' ', '-')}={self.kills_by.get(kind, 0)}" for kind in KILL_KINDS)
            kills += f" ({by_kind})"
        text = (f"conversations={self.conversations} messages={self.messages} jobs={self.jobs} {kills} "
                f"lost={len(self.lost)} duplicates={self.duplicates} unloadable={len(self.unloadable)}")
        if self.exits:
            text += f" unexpected_exits={len(self.exits)}"
        return text


class SingleBot:
    """One process of the app (``--role all``) on SQLite in the data dir."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.bot = BotProcess(data_dir, env=env)
        self.endpoint: HttpEndpoint = self.bot
        self.processes = [self.bot]

    def start(self) -> None:
        self.bot.start(timeout=60)

    def victim(self, rng: random.Random) -> tuple[BotProcess, str | None]:
        return self.bot, None

    def close(self) -> None:
        self.bot.kill()

    def store(self) -> ConversationStore:
        return SqliteStore(self.data_dir / "conversations.sqlite3")


class Cluster:
    """2 web + 2 worker processes on the Cosmos DB container and PostgreSQL database of ``store_env``."""

    def __init__(self, data_dir: Path, env: dict[str, str], store_env: dict[str, str]) -> None:
        self.store_env = store_env
        leases = {"PARTITION_LEASE_SECONDS": str(LEASE_SECONDS), "PARTITION_RENEW_SECONDS": str(RENEW_SECONDS)}
        self.cluster = BotCluster(data_dir, {**store_env, **leases, **env}, webs=2, workers=3)
        self.endpoint = self.cluster  # posts go through the round-robin proxy
        self.processes = self.cluster.processes

    def start(self) -> None:
        self.cluster.start(timeout=60)  # only the ones not running

    def victim(self, rng: random.Random) -> tuple[BotProcess, str | None]:
        if rng.random() < WORKER_SHARE:
            worker = rng.choice(self.cluster.workers)
            return worker, "frozen worker" if rng.random() < FREEZE_SHARE else "worker"
        return rng.choice(self.cluster.webs), "web"

    def close(self) -> None:
        self.cluster.close()

    def store(self) -> ConversationStore:
        from storage.cosmos import CosmosStore

        env = self.store_env
        return CosmosStore(env["COSMOS_ENDPOINT"], env["COSMOS_KEY"], env["COSMOS_DATABASE"], env["COSMOS_CONTAINER"])


Deployment = SingleBot | Cluster


def cluster_store_env(cosmos_endpoint: str, postgres_base_url: str) -> dict[str, str]:
    """Settings for a cluster on running servers: a fresh Cosmos DB container and a fresh PostgreSQL
    database (``JOB_STORE_URL``; the caller drops it with ``harness.peers.postgres.drop_database``)."""
    from harness.peers.cosmos import EMULATOR_KEY
    from harness.peers.postgres import create_database

    return {"COSMOS_ENDPOINT": cosmos_endpoint, "COSMOS_KEY": EMULATOR_KEY, "COSMOS_DATABASE": "soak",
            "COSMOS_CONTAINER": f"soak-{uuid.uuid4().hex[:12]}", "JOB_STORE_URL": create_database(postgres_base_url)}


def _post_until_acknowledged(endpoint: HttpEndpoint, activity: dict[str, object], stop: threading.Event) -> bool:
    """Redeliver like the channel does until a 2xx; False if the soak is stopping."""
    while not stop.is_set():
        try:
            status, _ = endpoint.post_activity(activity, timeout=5)
        except OSError:
            status = 0  # the bot is down (being killed or restarting)
        if 200 <= status < 300:
            return True
        time.sleep(0.1)
    return False


def _note_exits(deployment: Deployment, ledger: Ledger) -> None:
    """Record processes that died although no kill hit them (start() will bring them back)."""
    for process in deployment.processes:
        if process.pid is not None and not process.alive:
            ledger.exits.append(f"{process.data_dir.name} (pid {process.pid}) exited with {process.returncode}")


def run_soak(kills: int, conversations: int, seed: int, data_dir: Path, job_seconds: float = 1.0,
             progress: bool = True, cluster_env: dict[str, str] | None = None,
             log_level: str = "WARNING") -> SoakReport:
    """The soak on one process, or with ``cluster_env`` (see :func:`cluster_store_env`) on a cluster."""
    rng, kill_rng = random.Random(seed), random.Random(-seed)  # the kills do not depend on the load's pace
    ledger = Ledger()
    convs = [new_conversation_id("soak") for _ in range(conversations)]
    stop_load, stop_all = threading.Event(), threading.Event()
    with RecordingConnector() as conn:
        # One synthetic user floods 4 conversations (~20 messages a second), starts every job, and every
        # message must be answered: the rate limits, the inbox cap and the active-job caps are off here.
        env = {"ACTIVATE_LINE_SECONDS": str(job_seconds), "LOG_LEVEL": log_level, "RATE_LIMIT_USER_BURST": "0",
               "RATE_LIMIT_CONVERSATION_BURST": "0", "MAX_PENDING_EVENTS": "0",
               "MAX_ACTIVE_JOBS_PER_USER": "0", "MAX_ACTIVE_JOBS_PER_CONVERSATION": "0"}
        deployment: Deployment = (Cluster(data_dir, env, cluster_env) if cluster_env is not None
                                  else SingleBot(data_dir, env))
        endpoint = deployment.endpoint

        def load() -> None:
            counter = 0
            while not stop_load.is_set():
                conv = rng.choice(convs)
                counter += 1
                if rng.random() < 0.3:
                    number = f"555-{counter % 10000:04d}"
                    activity = message(f"activate line {number}", conversation_id=conv, service_url=conn.url)
                    if _post_until_acknowledged(endpoint, activity, stop_all):
                        with ledger.lock:
                            ledger.messages += 1
                            ledger.jobs += 1
                            ledger.expected.append((conv, f"started activating line {number} "))
                            ledger.expected.append((conv, f"✅ Line {number} is active"))
                else:
                    name = f"Soak{counter}"
                    activity = message(f"my name is {name}", conversation_id=conv, service_url=conn.url)
                    if _post_until_acknowledged(endpoint, activity, stop_all):
                        with ledger.lock:
                            ledger.messages += 1
                            ledger.expected.append((conv, f"Nice to meet you, {name}."))
                time.sleep(rng.uniform(0.01, 0.08))

        try:
            deployment.start()
            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            for n in range(1, kills + 1):
                time.sleep(kill_rng.uniform(0.3, 2.5))
                process, kind = deployment.victim(kill_rng)
                _note_exits(deployment, ledger)
                if kind == "frozen worker" and process.pid is not None and process.alive:
                    os.kill(process.pid, signal.SIGSTOP)  # its connections stay open; it renews nothing
                    time.sleep(LEASE_SECONDS + kill_rng.uniform(0.5, 3.0))
                    os.kill(process.pid, signal.SIGCONT)  # it must notice, before anything, that it lost them
                else:
                    process.kill()
                ledger.kills += 1
                if kind is not None:
                    ledger.kills_by[kind] += 1
                deployment.start()
                if progress:
                    bar = "#" * (30 * n // kills)
                    print(f"\rsoak [{bar:<30}] kills {n}/{kills} messages {ledger.messages} jobs {ledger.jobs}",
                          end="", file=sys.stderr, flush=True)
            stop_load.set()
            loader.join(30)
            drain_started = time.monotonic()
            patience = STALL_SECONDS + job_seconds * 3
            deadline = drain_started + patience

            def missing(items: list[tuple[str, str]]) -> list[tuple[str, str]]:
                texts = {c: conn.texts(c) for c in convs}
                return [(c, t) for c, t in items if not any(t in got for got in texts[c])]

            lost = missing(list(ledger.expected))
            while lost and time.monotonic() < deadline:
                time.sleep(0.5)
                if len(still := missing(lost)) < len(lost):  # replies still arrive: the bot is behind, wait on
                    deadline = min(time.monotonic() + patience, drain_started + MAX_DRAIN_SECONDS)
                lost = still
            drain_seconds = time.monotonic() - drain_started
            time.sleep(1.0)  # let any late repeat arrive before counting duplicates
            still_missing = set(missing(lost))
            late = [item for item in lost if item not in still_missing]  # still lost: they missed the deadline
            # Every expected text is unique (names and line numbers are), so a repeat is a duplicate.
            duplicates = sum(n - 1 for conv in convs for n in Counter(conn.texts(conv)).values() if n > 1)
            _note_exits(deployment, ledger)
        finally:
            stop_all.set()
            stop_load.set()
            deployment.close()
        if progress:
            print(file=sys.stderr)
        unloadable = asyncio.run(_unloadable(deployment.store(), [f"emulator:{c}" for c in convs]))
    return SoakReport(conversations, ledger.messages, ledger.jobs, ledger.kills, lost, duplicates, unloadable,
                      dict(ledger.kills_by), list(ledger.exits), late, drain_seconds)


async def _unloadable(store: ConversationStore, keys: list[str]) -> list[str]:
    await store.open()
    bad = []
    try:
        for key in keys:
            try:
                record = await store.load(key)
                if await store.pending_events(key) or record.outbox:
                    bad.append(f"{key}: work left over")
            except Exception as exc:  # any failure to load is what we count
                bad.append(f"{key}: {exc}")
    finally:
        await store.close()
    return bad


_TEXT_RECORD = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<message>.*)$")


def log_problems(data_dir: Path) -> Counter[str]:
    """ERROR and CRITICAL records of every bot log under ``data_dir`` (text or JSON format), by level,
    logger and message."""
    found: Counter[str] = Counter()
    for path in sorted(data_dir.rglob("bot-*.log")):
        for line in path.read_text("utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                    level, message = record["level"], f"{record['logger']}: {record['message']}"
                except (ValueError, KeyError, TypeError):
                    continue
            elif match := _TEXT_RECORD.match(line):
                level, message = match["level"], match["message"]
            else:
                continue
            if level in ("ERROR", "CRITICAL"):
                found[f"{level} {message}"] += 1
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--conversations", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--job-seconds", type=float, default=1.0)
    parser.add_argument("--cluster", action="store_true",
                        help="2 web + 3 worker processes on Cosmos DB + PostgreSQL (both started here)")
    parser.add_argument("--data-dir", type=Path,
                        help="keep the bots' data and logs here (default: a temporary directory, removed)")
    parser.add_argument("--log-level", default="WARNING",
                        help="the bots' LOG_LEVEL (INFO follows every turn and job; LOG_FORMAT passes through)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        cluster_env = None
        if args.cluster:
            from harness.peers import cosmos, postgres

            if reason := cosmos.unavailable_reason() or postgres.unavailable_reason():
                print(f"cannot run the cluster soak: {reason}", file=sys.stderr)
                return 2
            endpoint = stack.enter_context(cosmos.cosmos_server())
            cluster_env = cluster_store_env(endpoint, stack.enter_context(postgres.postgres_server()))
        if args.data_dir is not None:
            args.data_dir.mkdir(parents=True, exist_ok=True)
            data_dir = args.data_dir
        else:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        started = time.monotonic()
        report = run_soak(args.kills, args.conversations, args.seed, data_dir, args.job_seconds,
                          cluster_env=cluster_env, log_level=args.log_level)
        elapsed = time.monotonic() - started
        problems = log_problems(data_dir)
    print(report.summary())
    print(f"took {elapsed:.0f} s (the drain after the load {report.drain_seconds:.0f} s); "
          f"bot logs: {sum(problems.values())} ERROR/CRITICAL lines"
          + (f" (in {data_dir})" if args.data_dir is not None else ""))
    for line, count in problems.most_common(10):
        print(f"  {count:4d} x {line[:200]}")
    for exited in report.exits[:20]:
        print(f"EXITED {exited}")
    for conv, text in report.lost[:20]:
        late = " (arrived within a second after the deadline)" if (conv, text) in report.late else ""
        print(f"LOST in {conv}: {text!r}{late}")
    for problem in report.unloadable[:20]:
        print(f"UNLOADABLE {problem}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
