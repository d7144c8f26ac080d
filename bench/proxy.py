"""The test suite's round-robin proxy (harness/roundrobin.py) in a process of its own.

``python -m bench.proxy http://127.0.0.1:A http://127.0.0.1:B ...`` prints ``ready <base url>``
once it listens and serves until stdin closes (or SIGTERM). The scale-out benchmark runs it
apart from the load generator so that the two do not share one interpreter's GIL, and so that
its CPU can be read on its own, as a load balancer's would be.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading

from bench.common import REPO
from harness.roundrobin import RoundRobinProxy


class ProxyProcess:
    """Starts ``python -m bench.proxy`` and knows its URL and pid; ``stop()`` ends it."""

    def __init__(self, backends: list[str]) -> None:
        self.backends = list(backends)
        self._proc: subprocess.Popen[str] | None = None
        self.base_url = ""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 20.0) -> ProxyProcess:
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.proxy", *self.backends], cwd=REPO,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self._proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith("ready "):
            self.stop()
            raise RuntimeError(f"bench.proxy did not start: {line!r}")
        self.base_url = line[0].split()[1]
        return self

    def stop(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout):
            if stream is not None:
                stream.close()
        self._proc = None

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> int:
    proxy = RoundRobinProxy(sys.argv[1:]).start()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    print(f"ready {proxy.base_url}", flush=True)
    while not done.wait(0.5):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
