"""Run the real bot (``app.py``) as a subprocess for end-to-end tests.

A real process is the only way to test crash/restart behaviour (SIGKILL,
SIGTERM) and persistence in ``DATA_DIR`` honestly.  Output goes to per-start
log files so a failing test can show what the bot printed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from harness.waiting import poll

__all__ = ["BotProcess", "BotStartError", "HttpEndpoint", "free_port", "http_request", "log_text", "wait_for_log"]

#: Repository root: harness/botproc.py -> parents[1].
REPO_ROOT = Path(__file__).resolve().parents[1]

# Never route test traffic to 127.0.0.1 through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BotStartError(RuntimeError):
    """The bot exited or never became healthy; message includes the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a currently free TCP port (the OS picks it; tiny race is acceptable)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_request(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, str]:
    """Plain urllib request returning ``(status, body text)``; 4xx/5xx do not raise."""
    req = urllib.request.Request(
        url, data=body, method=method, headers=dict(headers or {})
    )
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        try:
            return int(exc.code), exc.read().decode("utf-8", "replace")
        finally:
            exc.close()


class HttpEndpoint:
    """What a test sends to the bot, whatever runs behind ``base_url`` (one process or a cluster)."""

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    @property
    def messages_url(self) -> str:
        """The Bot Framework messaging endpoint."""
        return f"{self.base_url}/api/messages"

    def post_activity(
        self,
        activity: dict[str, Any],
        headers: dict[str, str] | None = None,
        raw_body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> tuple[int, str]:
        """POST an activity (or ``raw_body`` verbatim) to /api/messages.

        Returns ``(status, body text)`` and never raises on 4xx/5xx, so tests
        can assert on rejections of malformed input.
        """
        body = (
            raw_body if raw_body is not None else json.dumps(activity).encode("utf-8")
        )
        all_headers = {"Content-Type": content_type, **(headers or {})}
        return http_request(
            self.messages_url,
            method="POST",
            body=body,
            headers=all_headers,
            timeout=timeout,
        )

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, str]:
        """GET ``path`` (e.g. ``/healthz``) on the bot; returns ``(status, body text)``."""
        return http_request(f"{self.base_url}/{path.lstrip('/')}", timeout=timeout)


class BotProcess(HttpEndpoint):
    """The app under test, started with ``[sys.executable, "app.py", *args]`` in the repo root.

    ``PORT`` is fixed for the lifetime of the object so :meth:`restart` comes
    back on the same address with the same ``DATA_DIR``.  Using it as a context
    manager starts it (if not running) and SIGKILLs it on exit. ``args`` (e.g.
    ``["--role", "worker"]``) is kept in :attr:`args`; change it before a restart to start
    the next process differently.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        env: dict[str, str] | None = None,
        *,
        port: int | None = None,
        script: str = "app.py",
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.extra_env: dict[str, str] = dict(env or {})
        self.script = script
        self.args: list[str] = list(args or [])
        self._port = port if port is not None else free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._terminated: subprocess.Popen[bytes] | None = None  # the process SIGTERM was sent to
        self._log_files: list[Path] = []

    # ------------------------------------------------------------------ properties

    @property
    def port(self) -> int:
        """TCP port the bot listens on (``PORT`` env)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT`` without trailing slash."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def pid(self) -> int | None:
        """PID of the current (or last) process, None if never started."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the process has not exited."""
        return self._proc is not None and self._proc.poll() is None

    def wait_exited(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit (a crash point); True if it has."""
        return poll(lambda: not self.alive, timeout)

    @property
    def returncode(self) -> int | None:
        """Exit status of the last process (negative signal number if killed)."""
        return self._proc.poll() if self._proc is not None else None

    @property
    def log_files(self) -> list[Path]:
        """Log files written by this instance, one per start, oldest first."""
        return list(self._log_files)

    # ------------------------------------------------------------------ lifecycle

    def _next_log_file(self) -> Path:
        """Pick ``bot-<n>.log`` not yet used in the data dir (instances may share it)."""
        n = len(self._log_files) + 1
        while (self.data_dir / f"bot-{n}.log").exists():
            n += 1
        return self.data_dir / f"bot-{n}.log"

    def _env(self) -> dict[str, str]:
        env = os.environ.copy()
        env.update(
            {
                "PORT": str(self._port),
                "DATA_DIR": str(self.data_dir),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> BotProcess:
        """Launch the app and block until ``GET /healthz`` answers 200."""
        if self.alive:
            raise RuntimeError(f"bot already running (pid {self.pid})")
        log_path = self._next_log_file()
        self._log_files.append(log_path)
        with open(log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, self.script, *self.args],
                cwd=REPO_ROOT,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_healthy(timeout)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        """Poll /healthz; fail fast with the log if the process dies."""
        assert self._proc is not None
        url = f"{self.base_url}/healthz"
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                raise BotStartError(
                    f"bot exited with code {code} during startup\n{self.log_tail()}"
                )
            try:
                if http_request(url, timeout=2.0)[0] == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet
            if time.monotonic() >= deadline:
                self.kill()
                raise BotStartError(
                    f"bot not healthy within {timeout}s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def kill(self) -> int | None:
        """SIGKILL (simulates a crash) and reap; returns the exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.kill()
        return self._proc.wait()

    def signal_terminate(self) -> None:
        """Send SIGTERM without waiting (to stop several processes at once); only once per process,
        since a second SIGTERM interrupts aiohttp's graceful shutdown."""
        if self._proc is not None and self._proc.poll() is None and self._proc is not self._terminated:
            self._terminated = self._proc
            self._proc.terminate()

    def terminate(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful shutdown), SIGKILL after ``timeout``; returns exit status."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.signal_terminate()
            try:
                return self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        return self._proc.wait()

    def restart(self, timeout: float = 30.0) -> BotProcess:
        """Kill if alive, then start again on the same port and data dir."""
        self.kill()
        return self.start(timeout)

    def __enter__(self) -> Self:
        if not self.alive:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    # ------------------------------------------------------------------ helpers

    def log_tail(self, lines: int = 80) -> str:
        """Last ``lines`` lines across all of this instance's log files."""
        out: list[str] = []
        for path in self._log_files:
            out.append(f"===== {path.name} =====")
            try:
                out.extend(path.read_text("utf-8", "replace").splitlines())
            except OSError as exc:
                out.append(f"<cannot read: {exc}>")
        return "\n".join(out[-lines:])


class _Logged(Protocol):
    @property
    def log_files(self) -> list[Path]: ...

    def log_tail(self, lines: int = 80) -> str: ...


def log_text(bot: _Logged) -> str:
    """Everything a bot (a process or a cluster) has logged so far, across its starts."""
    return "\n".join(path.read_text("utf-8", "replace") for path in bot.log_files)


def wait_for_log(bot: _Logged, needle: str, timeout: float = 15.0) -> str:
    """Wait until ``needle`` is in the bot's log; returns the whole log then."""
    deadline = time.monotonic() + timeout
    while needle not in (text := log_text(bot)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not in the bot's log:\n{bot.log_tail(40)}")
        time.sleep(0.05)
    return text
