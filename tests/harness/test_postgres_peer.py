"""The throwaway PostgreSQL server from harness/peers/postgres.py does what the cluster code relies on."""

from __future__ import annotations

import subprocess
import sys
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from harness.botproc import REPO_ROOT
from harness.peers.postgres import psycopg_url

LOCK_KEY = 7_340_033


def test_server_runs_and_urls_have_the_documented_form(postgres_base_url: str, postgres_url: str) -> None:
    assert urlsplit(postgres_base_url).scheme == "postgresql"
    parts = urlsplit(postgres_url)
    assert parts.scheme == "postgresql+psycopg"
    assert parts.hostname == "127.0.0.1" and parts.username == "postgres"
    assert parts.path.startswith("/t_") and len(parts.path) == len("/t_") + 12
    with psycopg.connect(psycopg_url(postgres_url)) as conn:
        row = conn.execute("SELECT current_database(), current_user, pg_encoding_to_char(encoding), "
                           "current_setting('fsync') FROM pg_database WHERE datname = current_database()").fetchone()
    assert row == (parts.path.lstrip("/"), "postgres", "UTF8", "off")


def test_each_test_database_is_isolated(postgres_base_url: str, postgres_url: str) -> None:
    from harness.peers.postgres import create_database, drop_database

    other = create_database(postgres_base_url)
    try:
        assert other != postgres_url
        with psycopg.connect(psycopg_url(postgres_url)) as conn:
            conn.execute("CREATE TABLE marker (x int)")
            conn.execute("INSERT INTO marker VALUES (1)")
        with psycopg.connect(psycopg_url(other)) as conn:
            assert conn.execute("SELECT to_regclass('marker')").fetchone() == (None,)
    finally:
        drop_database(postgres_base_url, other)


async def test_listen_notify_between_two_async_connections(postgres_url: str) -> None:
    url = psycopg_url(postgres_url)
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as listener, \
            await psycopg.AsyncConnection.connect(url, autocommit=True) as sender:
        await listener.execute("LISTEN jobs_changed")
        await sender.execute("SELECT pg_notify('jobs_changed', 'job-42')")
        received = [n async for n in listener.notifies(timeout=5, stop_after=1)]
        sender_pid = sender.info.backend_pid
    assert [(n.channel, n.payload, n.pid) for n in received] == [("jobs_changed", "job-42", sender_pid)]


def test_session_advisory_lock_is_released_when_its_process_is_killed(postgres_url: str) -> None:
    url = psycopg_url(postgres_url)
    holder_code = (
        "import sys, time, psycopg\n"
        "conn = psycopg.connect(sys.argv[1], autocommit=True)\n"
        f"conn.execute('SELECT pg_advisory_lock({LOCK_KEY})')\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_code, url], cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()  # blocks until the lock is held (or the holder died)
        if line.strip() != "locked":
            holder.kill()
            pytest.fail(f"lock holder did not take the lock: {line!r} {holder.communicate()[1]}")
        with psycopg.connect(url, autocommit=True) as conn:
            def try_lock() -> bool:
                row = conn.execute(f"SELECT pg_try_advisory_lock({LOCK_KEY})").fetchone()
                assert row is not None
                return bool(row[0])

            assert not try_lock(), "the lock should be held by the other process"
            holder.kill()
            holder.wait()
            killed_at = time.monotonic()
            while not try_lock():
                assert time.monotonic() - killed_at < 2, "the lock was not released within 2 s of SIGKILL"
                time.sleep(0.02)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
