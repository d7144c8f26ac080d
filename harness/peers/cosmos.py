"""Starts the Cosmos DB wire-protocol test server (npm ``@vercel/cosmosdb-server``) on loopback.

The server is an in-memory HTTPS imitation of Cosmos DB (docs/architecture.md, "Real peers
for tests"); ``cosmos_server.js`` beside this file patches its missing-item point read (500 -> 404)
and starts it. The package is looked up in ``$COSMOS_SERVER_NODE_MODULES``, else in the repo
root's ``node_modules``. The Python SDK skips TLS verification for ``127.0.0.1`` by itself, so
the self-signed certificate needs no extra setting.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

REPO_ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("cosmos_server.js")
PACKAGE = "@vercel/cosmosdb-server"
#: Any base64 string works as the key (the server checks no signature); this is the emulator's.
EMULATOR_KEY = "C2y6yDjf5/R+ob0N8A7Cgv30VRDJIWEHLM+4QDU5DE2nQ9nDuVTqobD4b8mGGyPMbIZnqyMsEcaGQy67XIw/Jw=="
_READY = re.compile(r"cosmosdb-server ready (https://127\.0\.0\.1:\d+)")


def node_modules_dir() -> Path:
    return Path(os.environ.get("COSMOS_SERVER_NODE_MODULES") or REPO_ROOT / "node_modules")


def unavailable_reason() -> str | None:
    """Why the server cannot be started here (for a skip message), or None if it can."""
    if shutil.which("node") is None:
        return "node is not on PATH (needed for the Cosmos DB test server)"
    package = node_modules_dir() / PACKAGE / "package.json"
    if not package.is_file():
        return (
            f"npm package {PACKAGE} is not installed in {node_modules_dir()} "
            "(npm install it there, or point COSMOS_SERVER_NODE_MODULES at a node_modules that has it)"
        )
    return None


def _accepts_connections(endpoint: str) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def cosmos_server(port: int = 0, startup_timeout: float = 30.0) -> Iterator[str]:
    """Run the server (``port`` 0 = any free port) and yield its endpoint ``https://127.0.0.1:PORT``.

    Its output goes to a log file, shown in the error if it does not come up; it is stopped
    (SIGTERM, then SIGKILL) on exit.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    env = {**os.environ, "COSMOS_SERVER_NODE_MODULES": str(node_modules_dir())}
    with tempfile.TemporaryDirectory(prefix="cosmosdb-server-") as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [shutil.which("node") or "node", str(LAUNCHER), str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp,
            )
        try:
            endpoint = _wait_until_ready(process, log_path, startup_timeout)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_until_ready(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        output = log_path.read_text(errors="replace")
        match = _READY.search(output)
        if match and _accepts_connections(match.group(1)):
            return match.group(1)
        if process.poll() is not None:
            raise RuntimeError(f"cosmosdb-server exited with {process.returncode}:\n{output}")
        time.sleep(0.05)
    raise RuntimeError(f"cosmosdb-server did not start within {timeout}s:\n{log_path.read_text(errors='replace')}")


def counters(endpoint: str, *, reset: bool = False, timeout: float = 10.0) -> dict[str, Any]:
    """The server's request counters (``cosmos_server.js``): ``requests``, ``bytes_sent`` (request
    bodies), ``by_operation`` (read, query, create, replace, upsert, patch, delete, metadata ``GET
    colls`` ...: requests and bytes each) and ``log`` (each request's operation, item id and bytes, the
    first 2,000). ``reset`` zeroes them after reading. Blocking: call it off the event loop."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's self-signed certificate, on loopback
    url = f"{endpoint}/_counters{'?reset=1' if reset else ''}"
    with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
        return dict(json.loads(response.read()))
