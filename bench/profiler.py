"""Where the time goes, for the benchmarks that miss a target (optional; needs pyinstrument).

    .venv/bin/pip install pyinstrument      # not in requirements-dev.txt: only this tool uses it
    .venv/bin/python -m bench.profiler turns      # the real app under load (10 conversations)
    .venv/bin/python -m bench.profiler notify     # the real app finishing jobs (0.5 s each)
    .venv/bin/python -m bench.profiler recovery   # the real app restarting with N jobs in flight
    .venv/bin/python -m bench.profiler state --backend cosmos --turns 5000   # which store call grows

The app runs as a real process under ``python -m pyinstrument`` (statistical sampling of the
event loop's thread, 1 ms), driven by the benchmark's own load generator and recording
connector, and is stopped with SIGTERM so the profiler writes its report. The summary printed
is the share of the **busy** time (sampled time minus the loop waiting in ``epoll``) spent in
each function, inclusive (``cum``) and exclusive (``self``). pyinstrument sees only the loop's
thread: time spent in worker threads (aiosqlite, ``asyncio.to_thread`` for APScheduler's job
store) shows up as waiting, so ``recovery`` also prints the phases timed from the app's log.
The full pstats file is kept (``--keep``) for ``python -m pstats`` or snakeviz.

``state`` needs no profiler: it grows one conversation in-process like benchmark 3 and prints,
at each checkpoint, the median time per turn of every store method and of every Cosmos request
kind (point read, query by its text, replace, patch ...), plus the CPU the Cosmos wire server
(node) used per turn, so growth can be pinned on our code, the SDK or the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, SignallingConnector, env_for_bot, quiet_env
from harness.botproc import free_port, http_request

IDLE = ("epoll.poll", "select.select")

#: ``--experiment msrest``: what the first fix in profiling.md would buy, without changing the app:
#: msrest's ClientRetryPolicy tests ``i not in safe_codes`` against a 501-item list 999 times per
#: construction; as a frozenset the codes are the same and the test is O(1).
EXPERIMENTS = {
    "msrest": "from msrest.universal_http.requests import ClientRetryPolicy as P; "
              "P.safe_codes = frozenset(P.safe_codes)",
}
_EXPERIMENT = ""


def start_profiled_app(data_dir: Path, out: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **env_for_bot(**env), "PORT": str(port), "DATA_DIR": str(data_dir),
                "PYTHONUNBUFFERED": "1"}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "app.log", "ab")  # noqa: SIM115 - handed to the child
    target = ["app.py"]
    if _EXPERIMENT:
        target = ["-c", f"import runpy, sys; {EXPERIMENTS[_EXPERIMENT]}; sys.argv = ['app.py']; "
                        "runpy.run_path('app.py', run_name='__main__')"]
    return subprocess.Popen([sys.executable, "-m", "pyinstrument", "-i", "0.001", "-r", "pstats", "-o", str(out),
                             *target], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def start_plain_app(data_dir: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **env_for_bot(**env), "PORT": str(port), "DATA_DIR": str(data_dir),
                "PYTHONUNBUFFERED": "1"}
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "app.log", "ab")  # noqa: SIM115
    return subprocess.Popen([sys.executable, "app.py"], cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(port: int, timeout: float = 120) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        try:
            if http_request(f"http://127.0.0.1:{port}/healthz", timeout=2)[0] == 200:
                return time.monotonic() - began
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError("app not healthy")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _short(func: tuple[str, int, str]) -> str:
    path, line, name = func
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{line}({name})"


def summarize(stats_path: Path, top: int = 25) -> str:
    stats = pstats.Stats(str(stats_path))
    entries: dict[Any, tuple[float, float]] = {}
    for func, (_cc, _nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        entries[func] = (tt, ct)
    total = max(ct for _tt, ct in entries.values())
    idle = sum(tt for func, (tt, _ct) in entries.items() if any(func[2].endswith(i) for i in IDLE))
    busy = max(total - idle, 1e-9)
    lines = [f"sampled {total:.2f} s on the event loop's thread: waiting in epoll {idle:.2f} s, busy {busy:.2f} s",
             "", f"top {top} by inclusive time (share of busy time):"]
    skip = ("<module>", "run_app", "run_until_complete", "run_forever", "_run_once", "_run", "main", "select")
    ranked = sorted(((ct, func) for func, (_tt, ct) in entries.items()
                     if func[2] not in skip and not any(func[2].endswith(i) for i in IDLE)), reverse=True)
    for ct, func in ranked[:top]:
        lines.append(f"  {ct / busy * 100:5.1f}%  {ct:7.2f} s  {_short(func)}")
    lines += ["", f"top {top} by self time (share of busy time):"]
    ranked = sorted(((tt, func) for func, (tt, _ct) in entries.items()
                     if not any(func[2].endswith(i) for i in IDLE)), reverse=True)
    for tt, func in ranked[:top]:
        lines.append(f"  {tt / busy * 100:5.1f}%  {tt:7.2f} s  {_short(func)}")
    return "\n".join(lines)


def profile_turns(tmp: Path, out: Path, conversations: int, seconds: float) -> str:
    from bench.turns import closed_loop

    port = free_port()
    proc = start_profiled_app(tmp / "data", out, port, SEND_RATE_PER_CONVERSATION="0")  # unpaced, as in the bench
    try:
        wait_healthy(port)
        with SignallingConnector() as connector:
            result = asyncio.run(closed_loop(f"http://127.0.0.1:{port}/api/messages", connector, conversations, 2,
                                             seconds, "profile"))
    finally:
        stop(proc)
    return (f"load: {conversations} conversations, closed loop, {seconds:g} s: {result.throughput:.1f} turns/s, "
            f"p50 {result.p50 * 1000:.0f} ms (under the profiler, which slows the app)\n")


def profile_notify(tmp: Path, out: Path, jobs: int, seconds: float) -> str:
    from bench.notify import open_loop

    port = free_port()
    proc = start_profiled_app(tmp / "data", out, port, ACTIVATE_LINE_SECONDS="0.5")
    try:
        wait_healthy(port)
        with SignallingConnector() as connector:
            asyncio.run(open_loop(f"http://127.0.0.1:{port}/api/messages", connector.url, 50, jobs, jobs / seconds,
                                  lambda n: f"activate line 555-{n:04d}"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and sum("is active" in t for t in connector.texts()) < jobs:
                time.sleep(0.2)
    finally:
        stop(proc)
    return f"load: {jobs} activations over 50 conversations in {seconds:g} s, ACTIVATE_LINE_SECONDS=0.5\n"


def profile_recovery(tmp: Path, out: Path, jobs: int) -> str:
    from bench.recovery import _counts, _post_all

    data = tmp / "data"
    port = free_port()
    with SignallingConnector() as connector:
        proc = start_plain_app(data, port, ACTIVATE_LINE_SECONDS="3600")
        try:
            wait_healthy(port)
            asyncio.run(_post_all(f"http://127.0.0.1:{port}/api/messages", connector.url, jobs, max(1, jobs // 10)))
            while _counts(data / "conversations.sqlite3")[1] < jobs:
                time.sleep(0.2)
        finally:
            proc.kill()
            proc.wait()
        began = time.monotonic()
        proc = start_profiled_app(data, out, port, ACTIVATE_LINE_SECONDS="3600")
        try:
            healthy = wait_healthy(port)
            while _counts(data / "conversations.sqlite3")[2] < jobs:
                time.sleep(0.025)
            recovered = time.monotonic() - began
        finally:
            stop(proc)
    log = (data / "app.log").read_text(errors="replace")
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*?(recovered \d+ unfinished job|recovering \d+ "
                        r"conversation|ready on port.*)$", log, re.M)
    phases = "\n".join(f"  {stamp}  {what}" for stamp, what in stamps[-3:])
    return (f"{jobs} jobs running, SIGKILL, restart under the profiler: healthy after {healthy:.2f} s, all running "
            f"again after {recovered:.2f} s (the profiler slows start-up)\nlog of the restart:\n{phases}\n")


def _children_matching(text: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and text in cmdline:
            found.append(int(stat.parent.name))
    return found


def profile_state(backend: str, turns: int) -> str:
    import statistics
    from collections import defaultdict

    from bench import state
    from bench.common import cpu_seconds
    from storage.sqlite import SqliteStore

    checkpoints = tuple(sorted({n for n in (10, 100, 1000, 2000, 5000) if n <= turns} | {turns}))
    pairs = tuple(sorted({n for c in checkpoints for n in (c, c + 10)}))
    requests: dict[str, list[float]] = defaultdict(list)
    per_turn: dict[int, dict[str, float]] = {}
    marks: dict[int, tuple[float, int]] = {}
    turn_counter = [0]

    def timed(name: str, fn: Any) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return await fn(*args, **kwargs)
            finally:
                requests[name].append(time.perf_counter() - began)
        return wrapper

    def instrument(store: Any) -> None:
        if backend != "cosmos":
            return
        container = store.container
        for name in ("read_item", "replace_item", "create_item", "patch_item", "upsert_item"):
            setattr(container, name, timed(name, getattr(container, name)))
        original_query = store._query

        async def query(text: str, pk: str | None = None, **params: Any) -> Any:
            began = time.perf_counter()
            try:
                return await original_query(text, pk, **params)
            finally:
                requests["query " + re.sub(r"\s+", " ", text)[:70]].append(time.perf_counter() - began)

        store._query = query

    node = [0]

    def tick(turn: int) -> None:
        cpu = cpu_seconds(node[0]) if node[0] else 0.0
        marks[turn] = (cpu, sum(len(v) for v in requests.values()))
        snapshot = {name: sum(v) for name, v in requests.items()}
        per_turn[turn] = snapshot
        turn_counter[0] = turn

    async def go(store: Any) -> dict[int, Any]:
        await store.open()
        try:
            instrument(store)
            return await state.grow(store, pairs, tick)
        finally:
            await store.close()

    with tempfile.TemporaryDirectory(prefix="bench-profile-state-") as tmp:
        if backend == "sqlite":
            figures = asyncio.run(go(SqliteStore(Path(tmp) / "s.sqlite3")))
        else:
            from harness.peers import cosmos as cosmos_peer
            from storage.cosmos import CosmosStore

            with cosmos_peer.cosmos_server() as endpoint:
                pids = _children_matching("cosmos_server.js")
                node[0] = pids[0] if pids else 0
                figures = asyncio.run(go(CosmosStore(endpoint, cosmos_peer.EMULATOR_KEY, "bench", "profile")))
    lines = [f"{backend}: one conversation, {turns:,} turns; median ms per turn over the 10 turns ending at each "
             "checkpoint (store methods), mean ms per turn between checkpoint and checkpoint+10 (requests, server CPU)"]
    methods = sorted({m for f in figures.values() for m in f["by_call"]})
    lines.append("turn    " + " ".join(f"{m[:14]:>14}" for m in methods) + "   all calls  item bytes")
    for n in checkpoints:
        f = figures[n]
        lines.append(f"{n:<7} " + " ".join(f"{f['by_call'].get(m, 0) * 1000:14.2f}" for m in methods)
                     + f"  {f['store'] * 1000:10.2f}  {f['size']:>10,}")
    if backend == "cosmos":
        kinds = sorted(requests)
        lines += ["", "Cosmos requests, ms per turn (turns N+1..N+10):"]
        for n in checkpoints:
            before, after = per_turn[n], per_turn[n + 10]
            parts = [f"{(after.get(k, 0) - before.get(k, 0)) / 10 * 1000:.1f} {k}" for k in kinds
                     if after.get(k, 0) - before.get(k, 0) > 0.0005 * 10]
            cpu = (marks[n + 10][0] - marks[n][0]) / 10
            count = (marks[n + 10][1] - marks[n][1]) / 10
            lines.append(f"  turn {n:>5,}: server (node) CPU {cpu * 1000:.1f} ms/turn, {count:.0f} requests/turn; "
                         + "; ".join(parts))
        slow = {k: statistics.median(v) * 1000 for k, v in requests.items()}
        lines += ["", "median ms per request over the whole run:"]
        lines += [f"  {ms:7.2f}  {k}" for k, ms in sorted(slow.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("turns", "notify", "recovery", "state"))
    parser.add_argument("--backend", choices=("sqlite", "cosmos"), default="cosmos", help="state: the store")
    parser.add_argument("--turns", type=int, default=5000, help="state: how many turns")
    parser.add_argument("--conversations", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--jobs", type=int, default=0, help="notify: 200, recovery: 1000")
    parser.add_argument("--keep", type=Path, help="keep the pstats file here")
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), help="profile the app with this fix applied")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    quiet_env()
    global _EXPERIMENT
    _EXPERIMENT = args.experiment or ""
    if args.what == "state":
        print(profile_state(args.backend, args.turns))
        return 0
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        print("pyinstrument is not installed: .venv/bin/pip install pyinstrument", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp_name:
        tmp = Path(tmp_name)
        out = args.keep or tmp / "profile.pstats"
        if args.what == "turns":
            header = profile_turns(tmp, out, args.conversations, args.seconds)
        elif args.what == "notify":
            header = profile_notify(tmp, out, args.jobs or 200, args.seconds)
        else:
            header = profile_recovery(tmp, out, args.jobs or 1000)
        print(header)
        print(summarize(out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
