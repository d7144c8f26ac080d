"""Starts a throwaway PostgreSQL server (Debian's ``postgresql`` package) on loopback for tests.

``initdb`` writes a fresh cluster into a temporary directory (trust authentication, UTF8, no
fsync) and ``postgres`` is started on it directly (no ``pg_ctlcluster``), listening on
``127.0.0.1`` on a free port with its Unix socket in the same temporary directory. Durability
is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): nothing here has to
survive a machine crash, and the tests run faster.

PostgreSQL refuses to run as root: as root, initdb and the server run as the ``postgres`` system
user (created by the Debian package), with the temporary directory handed over to it. The
superuser is called ``postgres`` either way. Binaries are looked up in
``/usr/lib/postgresql/*/bin`` (newest version first), then on ``PATH``.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from harness.botproc import free_port

__all__ = ["create_database", "drop_database", "find_bin_dir", "postgres_server", "psycopg_url", "unavailable_reason"]

#: The system user the server runs as when the tests run as root (the Debian package creates it).
SYSTEM_USER = "postgres"
#: The cluster's superuser (``initdb -U``), whoever runs the server.
SUPERUSER = "postgres"
_SERVER_OPTIONS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
}


def _version_key(bin_dir: str) -> tuple[int, ...]:
    """``/usr/lib/postgresql/15/bin`` -> (15,), so 16 sorts before 15 and 9.6 before 9.5."""
    version = Path(bin_dir).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``: the newest Debian version, else PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for directory in candidates:
        if all(os.access(Path(directory, name), os.X_OK) for name in ("initdb", "postgres")):
            return Path(directory)
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb and postgres:
        # Debian links some binaries into /usr/local/bin or /usr/bin: use the real directory.
        real = Path(os.path.realpath(postgres)).parent
        if (real / "initdb").exists():
            return real
        return Path(initdb).parent
    return None


def _run_as_system_user() -> bool:
    return os.geteuid() == 0


def unavailable_reason() -> str | None:
    """Why the server cannot be started here (for a skip message), or None if it can."""
    if find_bin_dir() is None:
        return (
            "PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin "
            "or on PATH (as root: make postgresql, or apt-get install postgresql)"
        )
    if _run_as_system_user():
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return f"running as root and there is no {SYSTEM_USER!r} system user to run PostgreSQL as"
    return None


def _temp_parent() -> str:
    """Where to make the temp dir: the usual one, unless the server's user could not reach it."""
    parent = tempfile.gettempdir()
    if not _run_as_system_user():
        return parent
    path = Path(parent).resolve()
    for directory in (path, *path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            return "/tmp"  # e.g. TMPDIR under /root: the postgres user could not traverse it
    return parent


def _user_kwargs() -> dict[str, Any]:
    """Popen arguments that drop root to the postgres user in the child itself.

    (Rather than a ``runuser`` wrapper: then the process we signal is the postmaster itself.)
    """
    if not _run_as_system_user():
        return {}
    entry = pwd.getpwnam(SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _child_env(home: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(home)})
    return env


@contextmanager
def postgres_server(startup_timeout: float = 30.0) -> Iterator[str]:
    """Run a fresh cluster and yield its URL ``postgresql://postgres@127.0.0.1:PORT/postgres``.

    The server log goes to ``server.log`` in the temp dir and is shown in the error if the server
    does not come up. On exit the server is stopped (SIGINT = fast shutdown; SIGKILL if it is
    still running after 10 s) and the directory removed.
    """
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    bin_dir = find_bin_dir()
    assert bin_dir is not None
    tmp = Path(tempfile.mkdtemp(prefix="pg-peer-", dir=_temp_parent()))
    try:
        data_dir, socket_dir, log_path = tmp / "data", tmp / "socket", tmp / "server.log"
        socket_dir.mkdir()
        user = _user_kwargs()
        if user:
            for path in (tmp, socket_dir):
                os.chown(path, user["user"], user["group"])
        env = _child_env(tmp)
        _initdb(bin_dir, data_dir, tmp, env, user)
        process = None
        for _attempt in range(3):  # the free port may be taken by someone else before we bind it
            port = free_port()
            log_start = log_path.stat().st_size if log_path.exists() else 0
            process = _start(bin_dir, data_dir, socket_dir, port, log_path, tmp, env, user)
            url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
            try:
                _wait_until_ready(process, url, log_path, log_start, startup_timeout)
                break
            except _PortTaken:
                _stop(process)
        else:
            raise RuntimeError(f"postgres could not bind a free port:\n{_read(log_path)}")
        try:
            yield url
        finally:
            _stop(process)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _initdb(bin_dir: Path, data_dir: Path, cwd: Path, env: dict[str, str], user: dict[str, Any]) -> None:
    command = [
        str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
        "--locale=C", "--no-sync", "--no-instructions",
    ]
    result = subprocess.run(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, check=False, **user)
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed with {result.returncode}:\n{result.stdout}\n{result.stderr}")


def _start(bin_dir: Path, data_dir: Path, socket_dir: Path, port: int, log_path: Path, cwd: Path,
           env: dict[str, str], user: dict[str, Any]) -> subprocess.Popen[bytes]:
    command = [str(bin_dir / "postgres"), "-D", str(data_dir), "-h", "127.0.0.1", "-p", str(port),
               "-k", str(socket_dir)]
    for name, value in _SERVER_OPTIONS.items():
        command += ["-c", f"{name}={value}"]
    with log_path.open("ab") as log_file:
        return subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, **user)


class _PortTaken(Exception):
    pass


def _read(log_path: Path) -> str:
    try:
        return log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"


def _wait_until_ready(process: subprocess.Popen[bytes], url: str, log_path: Path, log_start: int,
                      timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            output = _read(log_path)
            if "Address already in use" in output[log_start:]:
                raise _PortTaken
            raise RuntimeError(f"postgres exited with {process.returncode} during startup:\n{output}")
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            pass  # not listening yet, or "the database system is starting up"
        if time.monotonic() >= deadline:
            _stop(process)
            raise RuntimeError(f"postgres did not accept connections within {timeout}s:\n{_read(log_path)}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: roll back open transactions, disconnect clients), SIGKILL if stuck."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait()


def _with_database(url: str, database: str, scheme: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def create_database(base_url: str) -> str:
    """Create a fresh database ``t_<12 hex>`` and return its SQLAlchemy URL.

    The URL has the form ``postgresql+psycopg://postgres@127.0.0.1:PORT/t_xxx``; for psycopg
    itself (``psycopg.connect``), drop ``+psycopg`` (see :func:`psycopg_url`).
    """
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return _with_database(base_url, name, "postgresql+psycopg")


def psycopg_url(url: str) -> str:
    """The same URL as psycopg and libpq spell it (``postgresql://``, no SQLAlchemy driver part)."""
    parts = urlsplit(url)
    return urlunsplit(("postgresql", *parts[1:]))


def drop_database(base_url: str, url: str) -> None:
    """Drop the database ``url`` names, disconnecting whoever still uses it (best effort)."""
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    try:
        with psycopg.connect(base_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except psycopg.Error:
        pass  # the server is throwaway: a leftover database only costs a few MB in its temp dir
