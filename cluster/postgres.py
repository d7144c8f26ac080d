"""Several instances on one PostgreSQL database (the job store's): one active worker, prompt wake-ups.

**The active worker** holds a session-level advisory lock on a connection of its own. Standbys
wait on the same lock (``pg_advisory_lock`` blocks in the server, no polling) and get it the
moment the holder's session ends: at once when its process dies, since the kernel closes the
socket; after the TCP keepalives below when its host vanishes. The holder reads from that
connection every ``heartbeat`` seconds; when that fails it can no longer know that it still
holds the lock, so it stops (``on_lost``: by default the process exits with status 70 and its
supervisor restarts it as a standby). It stops after at most ``3 x heartbeat`` (3 s), well
before the server's keepalives (idle 5 s + 3 x 2 s) could release the lock to someone else.

**Wake-ups and cancel requests** go out with NOTIFY (batched: one round trip for all keys
that arrived meanwhile) and reach the active worker, which LISTENs on its lock connection.
NOTIFY is fire-and-forget: a notification sent while no worker listens (a takeover in
progress, PostgreSQL restarting) is lost, so the active worker also sweeps the store for work
every ``WORK_SWEEP_SECONDS`` (agent/housekeeping.py). The event itself is already in the store: a lost
notification delays work, it never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Callable

import psycopg

from cluster.coordinator import OnCancel, OnWake
from runtime import metrics

log = logging.getLogger(__name__)

#: pg_advisory_lock key of the active worker (advisory locks are per database: one per job store).
LEADER_LOCK = 0x7EA5_A6E7  # "teams agent"
WORK_CHANNEL = "agent_work"
CANCEL_CHANNEL = "agent_cancel"
#: NOTIFY payloads are limited to 8,000 bytes; conversation keys are far shorter.
MAX_PAYLOAD = 7900
EXIT_LOST_LEADERSHIP = 70


def _exit_process() -> None:
    logging.shutdown()
    os._exit(EXIT_LOST_LEADERSHIP)  # fail-stop: no cleanup may touch the stores any more


class PostgresCoordinator:
    def __init__(
        self,
        url: str,
        *,
        heartbeat: float = 1.0,
        on_lost: Callable[[], None] = _exit_process,
        application_name: str = "teams-agent",
    ) -> None:
        self._url = url
        self._heartbeat = heartbeat
        self._on_lost = on_lost
        self._application_name = application_name
        self._notify_conn: psycopg.AsyncConnection | None = None
        self._lock_conn: psycopg.AsyncConnection | None = None
        self._outgoing: dict[tuple[str, str], None] = {}  # ordered set of (channel, payload)
        self._kick = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = False
        self._closing = False

    @property
    def active(self) -> bool:
        return self._active

    async def _connect(self, purpose: str) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=10, application_name=f"{self._application_name} {purpose}",
            # Client side: notice a dead server. Server side (options): release a vanished holder's lock.
            keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            options="-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
        )

    async def open(self) -> None:
        self._notify_conn = await self._connect("notify")
        self._sender = asyncio.get_running_loop().create_task(self._send_notifications(), name="coordination:notify")

    async def close(self) -> None:
        self._closing = True
        for task in (self._sender, self._holder, *self._tasks):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self._sender, self._holder, *self._tasks) if t is not None),
                             return_exceptions=True)
        if self._outgoing:
            log.warning("stopping with %d notification(s) unsent; the active worker's sweep finds that work",
                        len(self._outgoing))
        for conn in (self._notify_conn, self._lock_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()  # closing the session releases the lock at once
        if self._active:
            log.info("no longer the active worker (stopping); a standby takes over now")
        self._active = False
        metrics.ACTIVE_WORKER.set(0)

    # --- sending (any instance) ---
    def wake(self, key: str) -> None:
        self._post(WORK_CHANNEL, key)

    async def cancel(self, key: str, job_id: str) -> None:
        self._post(CANCEL_CHANNEL, json.dumps({"key": key, "job_id": job_id}))

    def _post(self, channel: str, payload: str) -> None:
        if len(payload.encode()) > MAX_PAYLOAD:
            log.warning("notification too long for NOTIFY (%d bytes); the sweep will find the work", len(payload))
            return
        self._outgoing[(channel, payload)] = None
        self._kick.set()

    async def _send_notifications(self) -> None:
        delay = 0.5
        while True:
            await self._kick.wait()
            self._kick.clear()
            # Taken out before sending: a wake-up for the same key arriving meanwhile goes in the next batch.
            batch = list(self._outgoing)
            self._outgoing.clear()
            try:
                if self._notify_conn is None or self._notify_conn.closed:
                    self._notify_conn = await self._connect("notify")
                await self._notify_conn.execute(
                    "SELECT pg_notify(channel, payload) FROM unnest(%s::text[], %s::text[]) AS n(channel, payload)",
                    [[c for c, _ in batch], [p for _, p in batch]],
                )
            except (psycopg.Error, OSError) as exc:
                log.warning("could not notify the active worker of %d item(s) (%s); retrying in %.1f s", len(batch),
                            exc, delay)
                self._outgoing = dict.fromkeys(batch) | self._outgoing
                with contextlib.suppress(Exception):
                    if self._notify_conn is not None:
                        await self._notify_conn.close()
                self._notify_conn = None
                self._kick.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
                continue
            delay = 0.5

    # --- leading (workers) ---
    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True) -> bool:
        delay = 1.0
        while True:
            conn: psycopg.AsyncConnection | None = None
            try:
                conn = await self._connect("lock")
                cursor = await conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK])
                row = await cursor.fetchone()
                if not (row and row[0]):
                    if not wait:
                        await conn.close()
                        return False
                    log.info("standby: another worker is active; taking over when it stops")
                    await conn.execute("SELECT pg_advisory_lock(%s)", [LEADER_LOCK])  # waits in the server
                await conn.execute(f"LISTEN {WORK_CHANNEL}")
                await conn.execute(f"LISTEN {CANCEL_CHANNEL}")
            except (psycopg.Error, OSError) as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if not wait:
                    log.warning("cannot reach PostgreSQL for the worker lock (%s); waiting for it as a standby", exc)
                    return False
                log.warning("cannot reach PostgreSQL for the worker lock (%s); trying again in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            except asyncio.CancelledError:  # stopping while standby: drop the wait with the session
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                raise
            break
        self._lock_conn = conn
        self._active = True
        metrics.ACTIVE_WORKER.set(1)
        log.info("this process is now the active worker")
        self._holder = asyncio.get_running_loop().create_task(self._hold(conn, on_wake, on_cancel),
                                                              name="coordination:hold")
        return True

    async def _hold(self, conn: psycopg.AsyncConnection, on_wake: OnWake, on_cancel: OnCancel) -> None:
        """Deliver notifications; check the lock's session every heartbeat; stop if it is gone."""
        try:
            while True:
                async with asyncio.timeout(3 * self._heartbeat):
                    async for note in conn.notifies(timeout=self._heartbeat):
                        self._deliver(note.channel, note.payload, on_wake, on_cancel)
                    await conn.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing:
                return
            self._active = False
            metrics.ACTIVE_WORKER.set(0)
            log.critical("lost the connection that holds the active-worker lock (%s: %s); stopping this process "
                         "so that it cannot work beside the worker that takes over", type(exc).__name__, exc)
            self._on_lost()

    def _deliver(self, channel: str, payload: str, on_wake: OnWake, on_cancel: OnCancel) -> None:
        if channel == WORK_CHANNEL:
            metrics.WAKEUPS.labels("notify").inc()
            on_wake(payload)
        elif channel == CANCEL_CHANNEL:
            try:
                request = json.loads(payload)
                key, job_id = str(request["key"]), str(request["job_id"])
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed cancel notification: %.200r", payload)
                return
            task = asyncio.get_running_loop().create_task(self._cancel(on_cancel, key, job_id), name=f"cancel:{job_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _cancel(on_cancel: OnCancel, key: str, job_id: str) -> None:
        try:
            await on_cancel(key, job_id)
        except Exception:
            log.exception("cancelling job %s failed; its cancel request stays in the store", job_id)

    async def check(self) -> str | None:
        if self._notify_conn is None or self._notify_conn.closed:
            self._kick.set()  # the sender reconnects
            return "PostgreSQL: reconnecting"
        try:
            async with asyncio.timeout(2.0):
                await self._notify_conn.execute("SELECT 1")
            return "ok"
        except TimeoutError:
            return "PostgreSQL: no answer within 2 s"
        except (psycopg.Error, OSError) as exc:
            return f"PostgreSQL: {type(exc).__name__}: {exc}"
