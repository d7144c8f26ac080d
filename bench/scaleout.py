"""6. Scale-out: the app as one process against 1, 2 and 4 web instances + a worker, and (issue 18)
2 web instances + 2 and 3 active workers, the conversations' partitions spread over them.

Every deployment runs on the same kind of stores, fresh for each: a PostgreSQL database
(``JOB_STORE_URL``: job schedule, worker lock, NOTIFY wake-ups; ``harness/peers/postgres.py``) and
the conversation store, by default the SQLite file in one ``DATA_DIR`` shared by every process
(``--store cosmos``: the Cosmos wire server of ``harness/peers/cosmos.py`` instead). Deployments:

- ``all, no PostgreSQL`` (wake-up phase only): ``--role all`` on its SQLite job store, the
  default single instance, whose wake-ups stay in the process;
- ``all``: the single process ``app.py --role all`` on the same stores (the baseline; it wakes
  its own worker half through NOTIFY too);
- ``N web``: N ``--role web`` instances + 1 ``--role worker`` started by ``harness/cluster.py``'s
  BotCluster;
- ``2 web, K workers``: 2 web instances + K workers, every one active on its share of the 16
  partitions (the end-to-end phase shows what K workers add: the offline model's turns are CPU bound).

Every deployment is reached through the test suite's round-robin proxy
(``harness/roundrobin.py``), the baseline too (one backend), run in a process of its own
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

CPU per process kind (web, worker, proxy, PostgreSQL with its backends, the bench
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    NullProgress,
    Progress,
    SignallingConnector,
    children,
    cpu_seconds,
    env_for_bot,
    fmt_ms,
    percentile,
    quiet_env,
    tree_cpu_seconds,
)
from bench.proxy import ProxyProcess
from bench.turns import LoadResult, closed_loop
from harness.botproc import BotProcess
from harness.cluster import BotCluster
from harness.peers import postgres as postgres_peer

#: How many conversations the wake-up phase's single sender cycles through (so the per-conversation
#: pacing of 7 messages/s never delays a reply).
WAKE_CONVERSATIONS = 10
_ERROR = re.compile(r" (ERROR|CRITICAL) |^Traceback")
_WARNING = re.compile(r" WARNING ")


@dataclass
class Deployment:
    """The processes of one deployment (``webs == 0``: the single ``--role all`` process)."""

    webs: int
    data_dir: Path
    env: dict[str, str]
    workers: int = 1
    single: BotProcess | None = None
    cluster: BotCluster | None = None
    proxy: ProxyProcess | None = None
    active: BotProcess | None = None

    @property
    def processes(self) -> list[BotProcess]:
        if self.single is not None:
            return [self.single]
        return self.cluster.processes if self.cluster is not None else []

    def start(self) -> float:
        """Start the app processes and the proxy; seconds until all answer and a worker is active."""
        started = time.monotonic()
        if self.webs == 0:
            self.single = BotProcess(self.data_dir / "all", env=self.env, args=["--role", "all"])
            self.single.start(timeout=90)
            self.active, backends = self.single, [self.single.base_url]
        else:
            self.cluster = BotCluster(self.data_dir / "cluster", self.env, webs=self.webs, workers=self.workers)
            self.cluster.start(timeout=120)  # (its in-process proxy stays idle: ours is a process)
            self.cluster.settled(timeout=60)  # every worker holds its share of the partitions
            self.active = self.cluster.workers[0]
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
        return {"web": [w.pid for w in self.cluster.webs if w.pid is not None],
                "worker": [w.pid for w in self.cluster.workers if w.pid is not None], "proxy": [self.proxy.pid]}

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.single is not None:
            self.single.kill()
        if self.cluster is not None:
            self.cluster.close()

    def log_problems(self) -> dict[str, Any]:
        """Lines logged at ERROR or above (with tracebacks) and at WARNING by all processes, and the
        first of each."""
        out: dict[str, Any] = {"errors": 0, "warnings": 0, "first_error": "", "first_warning": ""}
        for process in self.processes:
            for path in process.log_files:
                with contextlib.suppress(OSError):
                    for line in path.read_text("utf-8", "replace").splitlines():
                        kind = "error" if _ERROR.search(line) else "warning" if _WARNING.search(line) else None
                        if kind:
                            out[f"{kind}s"] += 1
                            out[f"first_{kind}"] = out[f"first_{kind}"] or f"{process.data_dir.name}: {line[:300]}"
        return out


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


def _child_named(name: str) -> int | None:
    """A process this one started, by its command name (the PostgreSQL server, the Cosmos server)."""
    for pid in children(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
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
        out["after_ack"] = list(result.after_ack)
    return out


@dataclass(frozen=True)
class Plan:
    webs: tuple[int, ...] = (1, 2, 4)
    #: Issue 18: 2 web instances with this many active workers each (1 worker: the "2 web" deployment).
    workers: tuple[int, ...] = (2, 3)
    warmup: float = 2.0
    window: float = 10.0
    wake_window: float = 8.0
    e2e_conversations: int = 50
    ingest_conversations: int = 200
    ingest_senders: int = 100
    store: str = "sqlite"
    #: Also the wake-up phase of ``--role all`` without PostgreSQL (in-process wake-ups, the default
    #: single-instance setup).
    local_wake: bool = True

    def deployments(self) -> list[tuple[str, int, bool, int]]:
        """(name, web instances (0: one ``--role all`` process), on PostgreSQL, workers) in running order."""
        local = [("all, no PostgreSQL", 0, False, 1)] if self.local_wake else []
        return [*local, ("all", 0, True, 1), *((f"{w} web", w, True, 1) for w in self.webs),
                *((f"2 web, {k} workers", 2, True, k) for k in self.workers)]

    def seconds(self) -> float:
        """Rough seconds on 2 cores, for the progress bar."""
        total = 3.0
        for _, webs, shared, workers in self.deployments():
            total += 3 + 1.5 * (webs + workers) + 0.5 + self.wake_window + 1
            if shared:
                total += 2 * (self.warmup + self.window)
        return total


def run(plan: Plan, progress: Progress, weight: float) -> dict[str, Any]:
    """Every deployment of ``plan``, one after the other; the figures per deployment."""
    out: dict[str, Any] = {"plan": {**plan.__dict__, "webs": list(plan.webs)}, "deployments": {}}
    unit = weight / plan.seconds()
    with contextlib.ExitStack() as stack:
        progress.set("scale-out: starting PostgreSQL")
        pg_base = stack.enter_context(postgres_peer.postgres_server())
        cosmos_endpoint, cosmos_key = "", ""
        trees: dict[str, int] = {}
        if plan.store == "cosmos":
            from harness.peers import cosmos as cosmos_peer

            cosmos_endpoint = stack.enter_context(cosmos_peer.cosmos_server())
            cosmos_key = cosmos_peer.EMULATOR_KEY  # the public emulator key  secret-scan: allow
            if (node := _child_named("node")) is not None:
                trees["cosmos server"] = node
        if (postmaster := _child_named("postgres")) is not None:
            trees["postgres"] = postmaster
        connector = stack.enter_context(SignallingConnector())
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scaleout-")))
        progress.advance(3 * unit)
        for n, (name, webs, shared, workers) in enumerate(plan.deployments()):
            data = tmp / f"d{n}"
            database = postgres_peer.create_database(pg_base) if shared else ""
            # Unpaced, as the turn benchmark: the wake-up phase's one sender cycles 10 conversations at over
            # Teams' 7 messages/s each, so with the pacing on it timed the pacer (p99 ~120 ms), not the wake-up.
            env = env_for_bot(DATA_DIR=str(data / "data"), SEND_RATE_PER_CONVERSATION="0")
            if shared:
                env["JOB_STORE_URL"] = database
            if cosmos_endpoint:
                env.update(COSMOS_ENDPOINT=cosmos_endpoint, COSMOS_KEY=cosmos_key, COSMOS_DATABASE="bench",
                           COSMOS_CONTAINER=f"c-{uuid.uuid4().hex[:12]}")
            deployment = Deployment(webs, data, env, workers)
            label = f"scale-out ({plan.store}): {name}"
            progress.set(f"{label}: starting {'1 process' if webs == 0 else f'{webs} web + {workers} worker(s)'}")
            figures: dict[str, Any] = {"webs": webs, "workers": workers, "postgres": shared, "cpu": {}}
            try:
                figures["startup_s"] = deployment.start()
                progress.advance((3 + 1.5 * (webs + workers)) * unit)
                assert deployment.proxy is not None
                url = deployment.proxy.base_url + "/api/messages"
                meter = CpuMeter(deployment.pids(), trees)
                prefix = f"s{n}"

                progress.set(f"{label}: wake-up latency, one message at a time")
                with meter.measure(figures["cpu"].setdefault("wake", {})):
                    wake = asyncio.run(closed_loop(url, connector, WAKE_CONVERSATIONS, 0.5, plan.wake_window,
                                                   prefix=f"{prefix}w", senders=1))
                figures["wake"] = _summary(wake)
                progress.advance((0.5 + plan.wake_window) * unit)
                if shared:
                    progress.set(f"{label}: end-to-end, {plan.e2e_conversations} conversations")
                    with meter.measure(figures["cpu"].setdefault("e2e", {})):
                        e2e = asyncio.run(closed_loop(url, connector, plan.e2e_conversations, plan.warmup,
                                                      plan.window, prefix=f"{prefix}e"))
                    figures["e2e"] = _summary(e2e)
                    progress.advance((plan.warmup + plan.window) * unit)

                    progress.set(f"{label}: ingest, {plan.ingest_senders} senders over "
                                 f"{plan.ingest_conversations} conversations")
                    with meter.measure(figures["cpu"].setdefault("ingest", {})):
                        ingest = asyncio.run(closed_loop(url, connector, plan.ingest_conversations, plan.warmup,
                                                         plan.window, prefix=f"{prefix}i",
                                                         senders=plan.ingest_senders, await_reply=False))
                    figures["ingest"] = _summary(ingest, ingest=True)
                    progress.advance((plan.warmup + plan.window) * unit)
                figures["alive_at_end"] = all(p.alive for p in deployment.processes)
            except Exception as exc:  # one deployment failing still leaves the others' figures
                figures["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            finally:
                deployment.stop()
                connector.clear()
                if shared:
                    postgres_peer.drop_database(pg_base, database)
            figures["logs"] = deployment.log_problems()
            progress.advance(1 * unit)
            out["deployments"][name] = figures
    return out


def describe(res: dict[str, Any]) -> str:
    """A plain-text summary of one run (for ``python -m bench.scaleout``)."""
    lines = []
    for name, f in res["deployments"].items():
        if "error" in f:
            lines.append(f"{name}: failed: {f['error']}")
            continue
        w = f["wake"]
        line = (f"{name}: start {f['startup_s']:.1f} s | wake 2xx→reply p50 {fmt_ms(w['after_ack_p50'])} p99 "
                f"{fmt_ms(w['after_ack_p99'])} (n={w['samples']})")
        if "e2e" in f:
            e, i = f["e2e"], f["ingest"]
            line += (f" | e2e {e['per_second']:.1f}/s p50 {fmt_ms(e['p50'])} p99 {fmt_ms(e['p99'])} | ingest "
                     f"{i['per_second']:.1f}/s p50 {fmt_ms(i['answer_p50'])} p99 {fmt_ms(i['answer_p99'])} errors "
                     f"{e['errors']}+{i['errors']} {i['statuses']}")
        line += f" | log errors {f['logs']['errors']}, warnings {f['logs']['warnings']}"
        for phase, cpu in f["cpu"].items():
            line += f"\n    {phase} CPU (cores): " + ", ".join(f"{k} {v:.2f}" for k, v in cpu.items())
        for kind in ("error", "warning"):
            if f["logs"][f"first_{kind}"]:
                line += f"\n    first {kind}: {f['logs'][f'first_{kind}']}"
        lines.append(line)
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description="The scale-out benchmark on its own (python -m bench --only "
                                                 "scaleout runs it with the others' sizes).")
    parser.add_argument("--store", choices=("sqlite", "cosmos"), default="sqlite")
    parser.add_argument("--webs", default="1,2,4")
    parser.add_argument("--workers", default="2,3", help="2 web instances with this many active workers each")
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--wake-window", type=float, default=8.0)
    parser.add_argument("--ingest-senders", type=int, default=100)
    parser.add_argument("--ingest-conversations", type=int, default=200)
    parser.add_argument("--e2e-conversations", type=int, default=50)
    parser.add_argument("--no-local-wake", action="store_true")
    args = parser.parse_args()
    quiet_env()
    plan = Plan(webs=tuple(int(w) for w in args.webs.split(",") if w),
                workers=tuple(int(k) for k in args.workers.split(",") if k), warmup=args.warmup, window=args.window,
                wake_window=args.wake_window, e2e_conversations=args.e2e_conversations,
                ingest_conversations=args.ingest_conversations, ingest_senders=args.ingest_senders, store=args.store,
                local_wake=not args.no_local_wake)
    started = time.monotonic()
    res = run(plan, NullProgress(), 1.0)
    print(describe(res))
    print(f"took {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
