"""Several instances on one PostgreSQL database (the job store's): many workers, each owning
partitions of the conversations under leases; prompt wake-ups to the owner.

**Partitions and leases (issue 18).** Table ``agent_partitions`` has one row per partition:
its ``owner`` (a worker id, new for every process start), ``epoch`` (from a sequence: it grows
on every change of owner, across all partitions) and ``expires_at`` (server time). Every live
worker heartbeats in ``agent_workers``. Every ``renew`` seconds (5 s) a worker, on its own
connection: renews the leases it holds (``lease`` seconds, 15 s) where they have not run out;
counts the live workers and works out its fair share (the partitions dealt out in worker-id
order, so the shares add up to ``PARTITIONS``); hands back what is above its share (gracefully:
its jobs there are handed back and its drains finish first); and takes free or expired
partitions up to its share (``FOR UPDATE SKIP LOCKED``: two workers never take the same row).
So workers joining or leaving rebalance within a few rounds, and no worker stands idle while
there are at least as many partitions as workers.

**A frozen worker** (SIGSTOP, a stuck VM) stops renewing although its TCP connections stay
open: its leases run out after ``lease`` seconds and the others take them at their next round,
so its partitions move within ``lease + renew`` seconds (20 s by default; the bound is
``PARTITION_LEASE_SECONDS`` + ``PARTITION_RENEW_SECONDS``). Its own deadline is kept on
``CLOCK_MONOTONIC`` from *before* each renewal was sent (so it never outlives the server's):
that clock runs on while the process is stopped, so when it wakes up every commit, send and
job start sees the lease gone (cluster/partitions.py) before doing anything, and the store
refuses a commit under an older epoch than the stored one (the fence).

**Wake-ups and cancel requests** go out with NOTIFY on the conversation's partition's channels
(``agent_work_<n>``, ``agent_cancel_<n>``; batched: one round trip for all keys that arrived
meanwhile) and reach only the worker that LISTENs there: the owner. NOTIFY is fire-and-forget:
a notification sent while no worker listens (a partition moving, PostgreSQL restarting) is
lost, so every worker also sweeps the store for work of its partitions every
``WORK_SWEEP_SECONDS`` (agent/housekeeping.py). The event itself is already in the store: a
lost notification delays work, it never loses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid

import psycopg

from cluster.coordinator import OnCancel, OnChange, OnWake, _no_change
from cluster.partitions import DEFAULT_PARTITIONS, Ownership, partition_of
from runtime import metrics

log = logging.getLogger(__name__)

#: pg_advisory_xact_lock key that serialises creating the lease tables (several workers start at once).
SCHEMA_LOCK = 0x7EA5_A6E7  # "teams agent"
WORK_CHANNEL = "agent_work"
CANCEL_CHANNEL = "agent_cancel"
#: NOTIFY payloads are limited to 8,000 bytes; conversation keys are far shorter.
MAX_PAYLOAD = 7900
#: Longest a graceful hand-back waits for the partition's turns and jobs to hand themselves back.
HANDBACK_SECONDS = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS agent_partitions (
    partition integer PRIMARY KEY,
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
CREATE TABLE IF NOT EXISTS agent_workers (worker text PRIMARY KEY, expires_at timestamptz NOT NULL);
CREATE SEQUENCE IF NOT EXISTS agent_lease_epoch;
"""


def work_channel(partition: int) -> str:
    return f"{WORK_CHANNEL}_{partition}"


def cancel_channel(partition: int) -> str:
    return f"{CANCEL_CHANNEL}_{partition}"


def fair_share(partitions: int, workers: list[str], me: str) -> int:
    """How many partitions ``me`` should hold: dealt out in worker-id order, the first ones one more."""
    live = sorted(set(workers) | {me})
    base, extra = divmod(partitions, len(live))
    return base + (1 if live.index(me) < extra else 0)


class PostgresCoordinator:
    def __init__(
        self,
        url: str,
        *,
        partitions: int = DEFAULT_PARTITIONS,
        lease: float = 15.0,
        renew: float = 5.0,
        application_name: str = "teams-agent",
    ) -> None:
        if not 0 < renew < lease:
            raise ValueError("the renewal interval must be shorter than the lease")
        self._url = url
        self._partitions = partitions
        self._lease = lease
        self._renew = renew
        self._application_name = application_name
        self.worker_id = f"{application_name.split()[-1]}-{uuid.uuid4().hex[:12]}"
        self._ownership = Ownership(partitions)
        self._notify_conn: psycopg.AsyncConnection | None = None
        self._lease_conn: psycopg.AsyncConnection | None = None
        self._on_change: OnChange = _no_change
        self._listening: set[int] = set()
        self._outgoing: dict[tuple[str, str], None] = {}  # ordered set of (channel, payload)
        self._kick = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = False
        self._closing = False

    @property
    def active(self) -> bool:
        return self._active and bool(self._ownership.held())

    @property
    def ownership(self) -> Ownership:
        return self._ownership

    @property
    def listening(self) -> frozenset[int]:
        """The partitions whose wake-ups reach this process. A partition is granted a moment before its
        LISTEN; work posted in between is found by the recovery that follows (``on_change``)."""
        return frozenset(self._listening)

    async def _connect(self, purpose: str) -> psycopg.AsyncConnection:
        return await psycopg.AsyncConnection.connect(
            self._url, autocommit=True, connect_timeout=10, application_name=f"{self._application_name} {purpose}",
            # Client side: notice a dead server. Server side (options): drop a vanished instance's session.
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
        if self._active and self._lease_conn is not None and not self._lease_conn.closed:
            # The worker's services are stopped already: give every partition back at once.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2.0):
                    await self._lease_conn.execute(
                        "UPDATE agent_partitions SET owner = NULL, expires_at = '-infinity' WHERE owner = %s",
                        [self.worker_id])
                    await self._lease_conn.execute("DELETE FROM agent_workers WHERE worker = %s", [self.worker_id])
                    log.info("stopping: handed back partition(s) %s; the other workers take them now",
                             sorted(self._ownership.held()))
        self._ownership.revoke(list(self._ownership.recorded()))
        for conn in (self._notify_conn, self._lease_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self._active = False
        metrics.ACTIVE_WORKER.set(0)
        metrics.PARTITIONS_OWNED.set(0)

    # --- sending (any instance) ---
    def wake(self, key: str) -> None:
        self._post(work_channel(partition_of(key, self._partitions)), key)

    async def cancel(self, key: str, job_id: str) -> None:
        self._post(cancel_channel(partition_of(key, self._partitions)), json.dumps({"key": key, "job_id": job_id}))

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
                log.warning("could not notify the owning worker of %d item(s) (%s); retrying in %.1f s", len(batch),
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

    # --- leading partitions (workers) ---
    async def lead(self, on_wake: OnWake, on_cancel: OnCancel, *, wait: bool = True,
                   on_change: OnChange = _no_change) -> bool:
        """Join the workers: create the lease tables if needed, take a first share of partitions
        (``on_change`` hears of them before this returns) and keep the leases in the background."""
        self._on_change = on_change
        delay = 1.0
        while True:
            conn: psycopg.AsyncConnection | None = None
            try:
                conn = await self._connect("lease")
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(%s)", [SCHEMA_LOCK])
                    await conn.execute(SCHEMA)
                    await conn.execute("INSERT INTO agent_partitions (partition) SELECT generate_series(0, %s - 1) "
                                       "ON CONFLICT DO NOTHING", [self._partitions])
            except (psycopg.Error, OSError) as exc:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                if not wait:
                    log.warning("cannot reach PostgreSQL for the partition leases (%s); trying again in the "
                                "background", exc)
                    return False
                log.warning("cannot reach PostgreSQL for the partition leases (%s); trying again in %.0f s",
                            exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            break
        self._lease_conn = conn
        self._active = True
        log.info("worker %s joined: %d partition(s), lease %g s renewed every %g s", self.worker_id,
                 self._partitions, self._lease, self._renew)
        await self._round(conn)
        self._holder = asyncio.get_running_loop().create_task(self._keep(on_wake, on_cancel),
                                                              name="coordination:leases")
        return True

    async def _keep(self, on_wake: OnWake, on_cancel: OnCancel) -> None:
        """Deliver notifications; every ``renew`` seconds a lease round; reconnect when the connection fails."""
        next_round = time.monotonic() + self._renew
        delay = 0.5
        while True:
            try:
                conn = self._lease_conn
                if conn is None or conn.closed:
                    await self._expire()
                    self._listening.clear()
                    conn = self._lease_conn = await self._connect("lease")
                    next_round = time.monotonic()
                async for note in conn.notifies(timeout=max(0.0, next_round - time.monotonic())):
                    self._deliver(note.channel, note.payload, on_wake, on_cancel)
                next_round = time.monotonic() + self._renew
                await self._round(conn)
                delay = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                log.warning("partition leases: %s: %s; reconnecting in %.1f s", type(exc).__name__, exc, delay)
                if self._lease_conn is not None:
                    with contextlib.suppress(Exception):
                        await self._lease_conn.close()
                self._lease_conn = None
                await self._expire()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._renew)

    async def _expire(self) -> None:
        """Drop the leases that ran out by this process's clock (it could not renew them in time)."""
        recorded, held = self._ownership.recorded(), self._ownership.held()
        if gone := set(recorded) - held:
            self._ownership.revoke(gone)
            metrics.REBALANCES.labels("lost").inc(len(gone))
            log.warning("lost the lease of partition(s) %s (not renewed in time); another worker takes them over",
                        sorted(gone))
            self._count()
            await self._on_change(set(), gone)

    async def _round(self, conn: psycopg.AsyncConnection) -> None:
        """One lease round: heartbeat, renew, hand back above the fair share, take up to it."""
        surplus: set[int] = set()
        taken: dict[int, int] = {}
        await self._expire()  # outside the round's time limit: the worker stops that work first
        async with asyncio.timeout(self._renew):
            sent = time.monotonic()  # the server's expiry is later than sent + lease: never outlive it
            deadline = sent + self._lease
            await conn.execute(
                "INSERT INTO agent_workers (worker, expires_at) VALUES (%s, now() + make_interval(secs => %s)) "
                "ON CONFLICT (worker) DO UPDATE SET expires_at = excluded.expires_at", [self.worker_id, self._lease])
            cursor = await conn.execute(
                "UPDATE agent_partitions SET expires_at = now() + make_interval(secs => %s) "
                "WHERE owner = %s AND expires_at > now() AND partition < %s RETURNING partition, epoch",
                [self._lease, self.worker_id, self._partitions])
            renewed = {int(p): int(e) for p, e in await cursor.fetchall()}
            mine = self._ownership.recorded()
            gone = {p for p, lease in mine.items() if renewed.get(p) != lease.epoch}
            for partition in set(mine) - gone:
                self._ownership.grant(partition, mine[partition].epoch, deadline)
            metrics.LEASE_RENEWALS.inc()
            self._ownership.revoke(gone)
            cursor = await conn.execute("SELECT worker FROM agent_workers WHERE expires_at > now()")
            share = fair_share(self._partitions, [str(w) for (w,) in await cursor.fetchall()], self.worker_id)
            held = sorted(self._ownership.held())
            if len(held) > share:
                surplus = set(held[share:])
            elif len(held) < share:
                cursor = await conn.execute(
                    "UPDATE agent_partitions SET owner = %s, epoch = nextval('agent_lease_epoch'), "
                    "expires_at = now() + make_interval(secs => %s) WHERE partition IN ("
                    "SELECT partition FROM agent_partitions WHERE partition < %s "
                    "AND (owner IS NULL OR expires_at <= now()) ORDER BY partition LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "RETURNING partition, epoch", [self.worker_id, self._lease, self._partitions, share - len(held)])
                taken = {int(p): int(e) for p, e in await cursor.fetchall()}
                for partition, epoch in taken.items():
                    self._ownership.grant(partition, epoch, deadline)
        # The worker's part (hand-back, recovery) runs outside the round's time limit.
        if gone:
            metrics.REBALANCES.labels("lost").inc(len(gone))
            log.warning("partition(s) %s were taken over by another worker (lease not renewed in time)", sorted(gone))
            await self._on_change(set(), gone)
        if surplus:
            await self._hand_back(conn, surplus)
        await self._listen(conn)
        self._count()
        if taken:
            metrics.REBALANCES.labels("gained").inc(len(taken))
            log.info("took partition(s) %s (share %d of %d)", sorted(taken), share, self._partitions)
            await self._on_change(set(taken), set())

    async def _hand_back(self, conn: psycopg.AsyncConnection, surplus: set[int]) -> None:
        """Give partitions above the fair share back: the worker hands their work back while it still
        holds them, then they are freed in the database for the others to take at once."""
        log.info("handing back partition(s) %s (above the fair share)", sorted(surplus))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(HANDBACK_SECONDS):
                await self._on_change(set(), surplus)
        self._ownership.revoke(surplus)
        await conn.execute("UPDATE agent_partitions SET owner = NULL, expires_at = '-infinity' "
                           "WHERE partition = ANY(%s) AND owner = %s", [sorted(surplus), self.worker_id])
        metrics.REBALANCES.labels("released").inc(len(surplus))

    async def _listen(self, conn: psycopg.AsyncConnection) -> None:
        """LISTEN on the channels of the partitions held, and only those."""
        held = self._ownership.held()
        for partition in sorted(held - self._listening):
            await conn.execute(f"LISTEN {work_channel(partition)}; LISTEN {cancel_channel(partition)}")
        for partition in sorted(self._listening - held):
            await conn.execute(f"UNLISTEN {work_channel(partition)}; UNLISTEN {cancel_channel(partition)}")
        self._listening = set(held)

    def _count(self) -> None:
        held = len(self._ownership.held())
        metrics.PARTITIONS_OWNED.set(held)
        metrics.ACTIVE_WORKER.set(1 if held else 0)

    def _deliver(self, channel: str, payload: str, on_wake: OnWake, on_cancel: OnCancel) -> None:
        if channel.startswith(f"{WORK_CHANNEL}_"):
            metrics.WAKEUPS.labels("notify").inc()
            on_wake(payload)
        elif channel.startswith(f"{CANCEL_CHANNEL}_"):
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
