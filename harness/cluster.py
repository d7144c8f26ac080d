"""Several processes of the real app on shared stores: web instances behind a round-robin proxy,
and workers (issue 18: every one active, each owning some partitions of the conversations).

:class:`BotCluster` looks like a :class:`~harness.botproc.BotProcess` to a test (the same
``post_activity``, ``get``, ``start``, ``kill``, ``terminate``, ``alive``, ``log_tail`` and
``extra_env``), so the end-to-end suites run unchanged against a cluster. ``kill`` SIGKILLs every
process; ``start`` starts the ones that are not running (with the current ``extra_env``), all at
once. The stores are the caller's: pass Cosmos DB settings and a PostgreSQL ``JOB_STORE_URL``.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cluster.partitions import partition_of
from harness.botproc import BotProcess, HttpEndpoint
from harness.roundrobin import RoundRobinProxy
from harness.waiting import poll


class BotCluster(HttpEndpoint):
    def __init__(self, data_dir: str | os.PathLike[str], env: dict[str, str], *, webs: int = 2,
                 workers: int = 2) -> None:
        self.data_dir = Path(data_dir)
        self.extra_env: dict[str, str] = dict(env)
        self.workers = [BotProcess(self.data_dir / f"worker-{n}", args=["--role", "worker"]) for n in range(workers)]
        self.webs = [BotProcess(self.data_dir / f"web-{n}", args=["--role", "web"]) for n in range(webs)]
        self.proxy = RoundRobinProxy([web.base_url for web in self.webs])
        self._proxy_started = False

    @property
    def processes(self) -> list[BotProcess]:
        return [*self.workers, *self.webs]

    @property
    def base_url(self) -> str:
        """The round-robin proxy in front of the web instances."""
        return self.proxy.base_url

    @property
    def alive(self) -> bool:
        """Every process runs (a crashed worker makes the cluster not alive, as a crashed bot would)."""
        return all(p.alive for p in self.processes)

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a process to exit (a crash point); True if one has."""
        return poll(lambda: not self.alive, timeout)

    def start(self, timeout: float = 60.0) -> Self:
        """Start the processes that are not running, in parallel, and wait until each is healthy and
        the workers hold every partition between them."""
        if not self._proxy_started:
            self.proxy.start()
            self._proxy_started = True
        stopped = [p for p in self.processes if not p.alive]
        for process in stopped:
            process.extra_env = dict(self.extra_env)
        with ThreadPoolExecutor(max_workers=len(stopped) or 1) as pool:
            for future in [pool.submit(p.start, timeout) for p in stopped]:
                future.result()
        if stopped and self.workers:
            # Issue 18: and until the partitions are dealt out (a dead worker's leases run out first), so
            # that a test's conversation does not move between workers while it runs.
            self.settled(timeout)
        return self

    def kill(self) -> None:
        """SIGKILL every process."""
        for process in self.processes:
            process.kill()

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM all processes at once; the first non-zero exit status, else 0."""
        for process in self.processes:
            if process.alive:
                process.signal_terminate()
        codes = [p.terminate(timeout) for p in self.processes]
        return next((code for code in codes if code), 0)

    def restart(self, timeout: float = 60.0) -> Self:
        self.kill()
        return self.start(timeout)

    def close(self) -> None:
        self.kill()
        if self._proxy_started:
            self.proxy.stop()
            self._proxy_started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- workers ---
    def readiness(self, process: BotProcess) -> dict[str, Any]:
        status, body = process.get("/readyz")
        return {"http_status": status, **json.loads(body)}

    def partitions(self, worker: BotProcess) -> set[int]:
        """The partitions ``worker`` says it holds (none if it does not answer)."""
        try:
            return set(self.readiness(worker).get("partitions", {}).get("held", ()))
        except (OSError, ValueError):
            return set()

    def settled(self, timeout: float = 30.0) -> dict[BotProcess, set[int]]:
        """Wait until the live workers hold every partition between them, none twice, each some
        (when there are enough partitions); returns who holds what."""
        deadline = time.monotonic() + timeout
        count = int(self.extra_env.get("PARTITIONS", "16"))
        while True:
            live = [w for w in self.workers if w.alive]
            held = {w: self.partitions(w) for w in live}
            every = [p for ps in held.values() for p in ps]
            if sorted(every) == list(range(count)) and all(held.values() or [False]):
                return held
            if time.monotonic() > deadline:
                raise AssertionError(f"partitions not settled after {timeout} s: "
                                     f"{ {w.data_dir.name: sorted(ps) for w, ps in held.items()} }\n{self.log_tail()}")
            time.sleep(0.1)

    def owner(self, key: str, timeout: float = 30.0, *, besides: BotProcess | None = None) -> BotProcess:
        """The live worker that holds the partition of conversation ``key`` (other than ``besides``:
        waits for the partition to move)."""
        partition = partition_of(key, int(self.extra_env.get("PARTITIONS", "16")))
        deadline = time.monotonic() + timeout
        while True:
            owners = [w for w in self.workers if w.alive and w is not besides and partition in self.partitions(w)]
            if len(owners) == 1:
                return owners[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(owners)} owner(s) of partition {partition} after {timeout} s\n"
                                     f"{self.log_tail()}")
            time.sleep(0.05)

    def active_worker(self, timeout: float = 20.0) -> BotProcess:
        """The one live worker that holds a partition (a cluster with one worker alive)."""
        deadline = time.monotonic() + timeout
        while True:
            active = [w for w in self.workers if w.alive and self.partitions(w)]
            if len(active) == 1:
                return active[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(active)} active worker(s) after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    # --- logs ---
    @property
    def log_files(self) -> list[Path]:
        return [path for p in self.processes for path in p.log_files]

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(f"##### {p.data_dir.name} #####\n{p.log_tail(lines)}" for p in self.processes)
