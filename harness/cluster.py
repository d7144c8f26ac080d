"""Several processes of the real app on shared stores: web instances behind a round-robin proxy,
and workers (one active, the others standby).

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

from harness.botproc import BotProcess, HttpEndpoint
from harness.roundrobin import RoundRobinProxy


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

    def start(self, timeout: float = 60.0) -> Self:
        """Start the processes that are not running, in parallel, and wait until each is healthy."""
        if not self._proxy_started:
            self.proxy.start()
            self._proxy_started = True
        stopped = [p for p in self.processes if not p.alive]
        for process in stopped:
            process.extra_env = dict(self.extra_env)
        with ThreadPoolExecutor(max_workers=len(stopped) or 1) as pool:
            for future in [pool.submit(p.start, timeout) for p in stopped]:
                future.result()
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

    def active_worker(self, timeout: float = 20.0) -> BotProcess:
        """The one worker that says it is active (waits for a takeover to settle)."""
        deadline = time.monotonic() + timeout
        while True:
            active = [w for w in self.workers if w.alive and self._says_active(w)]
            if len(active) == 1:
                return active[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(active)} active worker(s) after {timeout} s\n{self.log_tail()}")
            time.sleep(0.05)

    def _says_active(self, worker: BotProcess) -> bool:
        try:
            return bool(self.readiness(worker).get("active_worker"))
        except (OSError, ValueError):
            return False

    # --- logs ---
    @property
    def log_files(self) -> list[Path]:
        return [path for p in self.processes for path in p.log_files]

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(f"##### {p.data_dir.name} #####\n{p.log_tail(lines)}" for p in self.processes)
