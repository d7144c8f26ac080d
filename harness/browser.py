"""Look at the Agents Playground's web UI the way a person would: headless Chromium.

Debian's ``chromium`` (``make chromium``) is driven by npm ``playwright-core`` (no browser
download) through ``harness/screenshot.mjs``, a Node script that opens a chat, waits
until an Adaptive Card showing given texts is rendered and takes screenshots. It reports in
JSON lines on stdout; :class:`PlaygroundPage` runs it and hands those events to the test.

The Playground keeps no history for its UI: the page shows only what the bot sends after it
connected. So open the page first (:meth:`PlaygroundPage.wait_ready`), then make the bot talk.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from harness.botproc import REPO_ROOT

__all__ = [
    "ARTIFACTS_DIR",
    "CHROMIUM",
    "SCREENSHOT_SCRIPT",
    "BrowserError",
    "PlaygroundPage",
    "browser_unavailable",
    "png_size",
]

#: Where screenshots go (git-ignored; ``make clean`` removes it).
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
SCREENSHOT_SCRIPT = REPO_ROOT / "harness" / "screenshot.mjs"
#: Debian's chromium; ``$CHROMIUM`` overrides it.
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class BrowserError(RuntimeError):
    """The browser script failed or said something unexpected."""


def browser_unavailable(node_modules: Path | None = None) -> str | None:
    """None when the UI can be driven, else why not (for ``pytest.skip``)."""
    if shutil.which("node") is None:
        return "node is not on PATH (playwright-core is a Node.js library)"
    if not CHROMIUM.is_file() or not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: install Debian's chromium (make chromium, or apt-get install chromium)"
    modules = node_modules or REPO_ROOT / "node_modules"
    if not (modules / "playwright-core" / "package.json").is_file():
        return f"npm playwright-core is not installed in {modules} (run npm install at the repo root)"
    return None


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG (from its IHDR chunk); ValueError if it is not a PNG."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        raise ValueError(f"{path} is not a PNG")
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


class PlaygroundPage:
    """``screenshot.mjs`` as a subprocess; events arrive as dicts (see the script's header)."""

    def __init__(self, spec: dict[str, Any], *, log_path: Path | None = None) -> None:
        self.spec = {"executablePath": str(CHROMIUM), **spec}
        self.log_path = log_path
        self._proc: subprocess.Popen[str] | None = None
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.received: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._readers: list[threading.Thread] = []

    def start(self) -> Self:
        node = shutil.which("node")
        assert node is not None
        self._proc = subprocess.Popen(
            [node, str(SCREENSHOT_SCRIPT), json.dumps(self.spec)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            start_new_session=True,  # so stop() can end chromium's whole process group
        )
        self._readers = [
            threading.Thread(target=self._read_stdout, name="PlaygroundPage-out", daemon=True),
            threading.Thread(target=self._read_stderr, name="PlaygroundPage-err", daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        return self

    def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "output", "line": line}
            self._events.put(event)
        self._events.put(None)  # end of output

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for line in self._proc.stderr:
            self._stderr.append(line.rstrip())

    def next_event(self, timeout: float) -> dict[str, Any]:
        """The script's next event (``output`` lines are skipped); BrowserError on error or exit."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = self._events.get(timeout=max(0.01, left))
            except queue.Empty:
                raise BrowserError(f"the browser script said nothing for {timeout:g} s; {self._describe()}") from None
            if event is None:
                self._events.put(None)  # stay at the end for later calls
                raise BrowserError(f"the browser script ended early; {self._describe()}")
            self.received.append(event)
            if event.get("event") == "error":
                raise BrowserError(f"the browser script failed: {event.get('message')}; {self._describe()}")
            if event.get("event") != "output":
                return event

    def expect(self, name: str, timeout: float) -> dict[str, Any]:
        """Wait for the next event and check it is ``name``."""
        event = self.next_event(timeout)
        if event.get("event") != name:
            raise BrowserError(f"expected the event {name!r}, got {event!r}")
        return event

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until the page is loaded and the chat is open."""
        self.expect("ready", timeout)

    def _describe(self) -> str:
        code = self._proc.poll() if self._proc is not None else None
        return f"exit code {code}; stderr: {' | '.join(self._stderr[-15:])}"

    def stop(self) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        try:
            return proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()
        finally:
            for reader in self._readers:
                reader.join(timeout=5)
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()
            if self.log_path is not None:
                self.log_path.write_text(
                    "\n".join([*(json.dumps(e, ensure_ascii=False) for e in self.received), *self._stderr]) + "\n",
                    "utf-8",
                )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None and self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)
        self.stop()
