"""6. Scale-out: the app as one process against 1, 2 and 4 web instances + a worker (+ a standby).

Every deployment runs on the same kind of stores, fresh for each: a PostgreSQL database
(``JOB_STORE_URL``: job schedule, worker lock, NOTIFY wake-ups; ``tests/peers/postgres.py``) and
the conversation store, by default the SQLite file in one ``DATA_DIR`` shared by every process
(``--store cosmos``: the Cosmos wire server of ``tests/peers/cosmos.py`` instead). Deployments:

- ``all``: the single process ``app.py --role all`` (the baseline);
- ``N web``: N ``--role web`` instances + 2 ``--role worker`` (one active, one standby) started
  by ``tests/support/cluster.py``'s BotCluster.

Every deployment is reached through the test suite's round-robin proxy
(``tests/support/roundrobin.py``), the baseline too (one backend), run in a process of its own
(``bench/proxy.py``) so that it shares no interpreter with the load generator. Load generator
and recording connector are the turn benchmark's (``bench/turns.py``, ``bench/common.py``).
Three phases per deployment, in this order (so that no phase inherits another's backlog):

1. wake-up: one sender, one message at a time over 10 conversations; from the POST's 2xx to
   the reply at the connector (cross-process: web appends + NOTIFY, worker LISTENs, runs the
   turn, sends);
2. end-to-end: closed loop, one user per conversation waiting for each reply; replies/s and
   ingest→reply latency. The turns run on the one active worker;
3. ingest: closed loop of senders that post again as soon as the POST is answered 2xx, over
   many conversations; acknowledged activities/s in the window, HTTP answer time. The worker
   meanwhile works through the backlog (it costs what it costs); the deployment is killed
   right after, backlog and all.

CPU per process kind (web, worker, standby, proxy, PostgreSQL with its backends, the bench
process = load generator + connector) is read from /proc around each phase, in cores (CPU
seconds / wall seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (NullProgress, Progress, SignallingConnector, children, cpu_seconds, env_for_bot, fmt_ms,
                          percentile, quiet_env, tree_cpu_seconds)
from bench.proxy import ProxyProcess
from bench.turns import LoadResult, closed_loop
from tests.peers import postgres as postgres_peer
from tests.support.botproc import BotProcess
from tests.support.cluster import BotCluster

#: How many conversations the wake-up phase's single sender cycles through (so the per-conversation
#: pacing of 7 messages/s never delays a reply).
WAKE_CONVERSATIONS = 10
_PROBLEM = re.compile(r" (ERROR|CRITICAL) |^Traceback")


@dataclass
class Deployment:
    """The processes of one deployment (``webs == 0``: the single ``--role all`` process)."""

    webs: int
    data_dir: Path
    env: dict[str, str]
    single: BotProcess | None = None
    cluster: BotCluster | None = None
    proxy: ProxyProcess | None = None
    active: BotProcess | None = None
    standby: list[BotProcess] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "all" if self.webs == 0 else f"{self.webs} web"

    @property
    def processes(self) -> list[BotProcess]:
        if self.single is not None:
            return [self.single]
        assert self.cluster is not None
        return self.cluster.processes

    def start(self) -> float:
        """Start the app processes and the proxy; seconds until all answer and a worker is active."""
        started = time.monotonic()
        if self.webs == 0:
            self.single = BotProcess(self.data_dir / "all", env=self.env, args=["--role", "all"])
            self.single.start(timeout=90)
            self.active, backends = self.single, [self.single.base_url]
        else:
            self.cluster = BotCluster(self.data_dir / "cluster", self.env, webs=self.webs, workers=2)
            self.cluster.start(timeout=120)
            self.active = self.cluster.active_worker(timeout=30)
            self.standby = [w for w in self.cluster.workers if w is not self.active]
            backends = [w.base_url for w in self.cluster.webs]
        self.proxy = ProxyProcess(backends).start()
        return time.monotonic() - started

    def pids(self) -> dict[str, list[int]]:
        """Process kind -> pids (the bench process and PostgreSQL are added by the caller)."""
        assert self.proxy is not None and self.proxy.pid is not None
        if self.single is not None:
            assert self.single.pid is not None
            return {"all": [self.single.pid], "proxy": [self.proxy.pid]}
        assert self.cluster is not None and self.active is not None and self.active.pid is not None
        return {"web": [w.pid for w in self.cluster.webs if w.pid is not None], "worker": [self.active.pid],
                "standby": [w.pid for w in self.standby if w.pid is not None], "proxy": [self.proxy.pid]}

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.single is not None:
            self.single.kill()
        if self.cluster is not None:
            self.cluster.close()

    def log_problems(self) -> tuple[int, str]:
        """Lines logged at ERROR or above (and tracebacks) by all processes; the first one."""
        count, first = 0, ""
        for process in self.processes:
            for path in process.log_files:
                with contextlib.suppress(OSError):
                    for line in path.read_text("utf-8", "replace").splitlines():
                        if _PROBLEM.search(line):
                            count += 1
                            first = first or f"{process.data_dir.name}: {line[:300]}"
        return count, first


class CpuMeter:
    """CPU time per process kind, read around a phase: ``cores`` = CPU seconds / wall seconds."""

    def __init__(self, kinds: dict[str, list[int]], trees: dict[str, int]) -> None:
        self.kinds, self.trees = kinds, trees

    def _read(self) -> dict[str, float]:
        out = {kind: sum(_cpu(pid) for pid in pids) for kind, pids in self.kinds.items()}
        out.update({kind: tree_cpu_seconds(pid) for kind, pid in self.trees.items()})
        out["bench"] = cpu_seconds()
        return out

    @contextlib.contextmanager
    def measure(self, into: dict[str, float]) -> Iterator[None]:
        before, started = self._read(), time.monotonic()
        yield
        after, wall = self._read(), time.monotonic() - started
        into.update({kind: (after[kind] - before[kind]) / wall for kind in after})


def _cpu(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _postmaster() -> int | None:
    """The PostgreSQL server this process started (a direct child named ``postgres``)."""
    for pid in children(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "postgres":
                return pid
    return None


def _node_server() -> int | None:
    for pid in children(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() in ("node", "MainThread"):
                return pid
    return None


def _summary(result: LoadResult, *, ingest: bool = False) -> dict[str, Any]:
    """The figures of one phase (plain numbers, for the table and the raw JSON)."""
    out = {"completed": result.completed, "in_window": result.completed_in_window, "window": result.window,
           "errors": result.errors, "statuses": dict(result.statuses), "strays": result.strays,
           "answer_p50": percentile(result.answers, 50), "answer_p99": percentile(result.answers, 99),
           "samples": len(result.latencies)}
    if ingest:
        out["per_second"] = result.completed_in_window / result.window if result.window else float("nan")
    else:
        out["per_second"] = result.throughput
        out["p50"], out["p99"] = percentile(result.latencies, 50), percentile(result.latencies, 99)
        out["after_ack_p50"] = percentile(result.after_ack, 50)
        out["after_ack_p99"] = percentile(result.after_ack, 99)
        out["after_ack_max"] = max(result.after_ack, default=float("nan"))
    return out


@dataclass(frozen=True)
class Plan:
    webs: tuple[int, ...] = (1, 2, 4)
    warmup: float = 2.0
    window: float = 8.0
    wake_window: float = 6.0
    e2e_conversations: int = 50
    ingest_conversations: int = 200
    ingest_senders: int = 100
    store: str = "sqlite"

    def deployments(self) -> list[int]:
        return [0, *self.webs]

    def seconds(self) -> float:
        """Rough seconds on 2 cores, for the progress bar."""
        per = 0.5 + self.wake_window + 2 * (self.warmup + self.window) + 3
        return sum(per + 4 + 2.5 * w for w in self.deployments()) + 3


def run(plan: Plan, progress: Progress, weight: float) -> dict[str, Any]:
    """Every deployment of ``plan``, one after the other; the figures per deployment."""
    out: dict[str, Any] = {"plan": plan.__dict__ | {"webs": list(plan.webs)}, "deployments": {}}
    unit = weight / plan.seconds()
    with contextlib.ExitStack() as stack:
        progress.set("scale-out: starting PostgreSQL")
        pg_base = stack.enter_context(postgres_peer.postgres_server())
        store_env: Callable[[], dict[str, str]] = dict
        trees: dict[str, int] = {}
        if plan.store == "cosmos":
            from tests.peers import cosmos as cosmos_peer

            endpoint = stack.enter_context(cosmos_peer.cosmos_server())

            def store_env() -> dict[str, str]:
                return {"COSMOS_ENDPOINT": endpoint, "COSMOS_KEY": cosmos_peer.EMULATOR_KEY,
                        "COSMOS_DATABASE": "bench", "COSMOS_CONTAINER": f"c-{uuid.uuid4().hex[:12]}"}

            if (node := _node_server()) is not None:
                trees["cosmos server"] = node
        if (postmaster := _postmaster()) is not None:
            trees["postgres"] = postmaster
        connector = stack.enter_context(SignallingConnector())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scaleout-")))
        progress.advance(3 * unit)
        for webs in plan.deployments():
            shared = tmp / f"d{webs}"
            database = postgres_peer.create_database(pg_base)
            env = env_for_bot(JOB_STORE_URL=database, DATA_DIR=str(shared / "data"), **store_env())
            deployment = Deployment(webs, shared, env)
            label = f"scale-out ({plan.store}): {deployment.name}"
            progress.set(f"{label}: starting {'1 process' if webs == 0 else f'{webs} web + 2 worker processes'}")
            figures: dict[str, Any] = {"webs": webs, "cpu": {}}
            try:
                figures["startup_s"] = deployment.start()
                progress.advance((4 + 2.5 * webs) * unit)
                assert deployment.proxy is not None
                url = deployment.proxy.base_url + "/api/messages"
                meter = CpuMeter(deployment.pids(), trees)
                prefix = f"s{webs}"

                progress.set(f"{label}: wake-up latency, one message at a time")
                figures["cpu"]["wake"] = {}
                with meter.measure(figures["cpu"]["wake"]):
                    wake = asyncio.run(closed_loop(url, connector, WAKE_CONVERSATIONS, 0.5, plan.wake_window,
                                                   prefix=f"{prefix}w", senders=1))
                figures["wake"] = _summary(wake)
                progress.advance((0.5 + plan.wake_window) * unit)

                progress.set(f"{label}: end-to-end, {plan.e2e_conversations} conversations")
                figures["cpu"]["e2e"] = {}
                with meter.measure(figures["cpu"]["e2e"]):
                    e2e = asyncio.run(closed_loop(url, connector, plan.e2e_conversations, plan.warmup, plan.window,
                                                  prefix=f"{prefix}e"))
                figures["e2e"] = _summary(e2e)
                progress.advance((plan.warmup + plan.window) * unit)

                progress.set(f"{label}: ingest, {plan.ingest_senders} senders over "
                             f"{plan.ingest_conversations} conversations")
                figures["cpu"]["ingest"] = {}
                with meter.measure(figures["cpu"]["ingest"]):
                    ingest = asyncio.run(closed_loop(url, connector, plan.ingest_conversations, plan.warmup,
                                                     plan.window, prefix=f"{prefix}i", senders=plan.ingest_senders,
                                                     await_reply=False))
                figures["ingest"] = _summary(ingest, ingest=True)
                progress.advance((plan.warmup + plan.window) * unit)
                figures["alive_at_end"] = all(p.alive for p in deployment.processes)
            finally:
                deployment.stop()
                connector.clear()
                postgres_peer.drop_database(pg_base, database)
            figures["log_problems"], figures["first_problem"] = deployment.log_problems()
            progress.advance(3 * unit)
            out["deployments"][deployment.name] = figures
    return out


def describe(res: dict[str, Any]) -> str:
    """A plain-text table of one run (for ``python -m bench.scaleout``)."""
    lines = []
    for name, f in res["deployments"].items():
        w, e, i = f["wake"], f["e2e"], f["ingest"]
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in f["cpu"]["ingest"].items())
        lines.append(
            f"{name:>6}: start {f['startup_s']:.1f} s | wake 2xx→reply p50 {fmt_ms(w['after_ack_p50'])} p99 "
            f"{fmt_ms(w['after_ack_p99'])} (n={w['samples']}) | e2e {e['per_second']:.1f}/s p50 {fmt_ms(e['p50'])} "
            f"p99 {fmt_ms(e['p99'])} | ingest {i['per_second']:.1f}/s p50 {fmt_ms(i['answer_p50'])} p99 "
            f"{fmt_ms(i['answer_p99'])} errors {i['errors']} {i['statuses']} | log problems {f['log_problems']}"
            f"\n        ingest CPU (cores): {cpu}" + (f"\n        first problem: {f['first_problem']}"
                                                   if f["first_problem"] else ""))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="The scale-out benchmark on its own (python -m bench --only "
                                                 "scaleout runs it with the others' sizes).")
    parser.add_argument("--store", choices=("sqlite", "cosmos"), default="sqlite")
    parser.add_argument("--webs", default="1,2,4")
    parser.add_argument("--window", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--wake-window", type=float, default=6.0)
    parser.add_argument("--ingest-senders", type=int, default=100)
    parser.add_argument("--ingest-conversations", type=int, default=200)
    parser.add_argument("--e2e-conversations", type=int, default=50)
    args = parser.parse_args()
    quiet_env()
    plan = Plan(webs=tuple(int(w) for w in args.webs.split(",") if w), warmup=args.warmup, window=args.window,
                wake_window=args.wake_window, e2e_conversations=args.e2e_conversations,
                ingest_conversations=args.ingest_conversations, ingest_senders=args.ingest_senders, store=args.store)
    started = time.monotonic()
    res = run(plan, NullProgress(), 1.0)
    print(describe(res))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
