"""Issue 18: many active workers. One cluster for the module: 3 workers + 2 web instances of the real
app on the Cosmos DB wire server and a throwaway PostgreSQL, 12 partitions, leases of 3 s renewed
every second (so a partition moves within 4 s; the default 15 s + 5 s bound is the same rule).

Each test leaves the cluster as it found it (a worker it killed or froze is running again and the
partitions have settled), so the tests do not depend on one another's order.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from harness.activities import new_conversation_id
from harness.botproc import BotProcess
from harness.cluster import BotCluster
from harness.connector import RecordingConnector
from harness.peers import cosmos as cosmos_peer
from harness.peers.postgres import create_database, drop_database
from harness.waiting import wait_until
from tests.e2e.conftest import StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_jobs import completions, job_id_in
from tests.test_ops import scrape, value

pytestmark = pytest.mark.e2e

LEASE, RENEW = 3.0, 1.0
#: A frozen or killed worker's partitions are taken within lease + renewal (plus a loaded machine's slack).
MOVE_BOUND = LEASE + RENEW + 4.0
PARTITIONS = 12


@pytest.fixture(scope="module")
def env(cosmos_endpoint: str, postgres_base_url: str) -> Iterator[dict[str, str]]:
    database = create_database(postgres_base_url)
    yield {"COSMOS_ENDPOINT": cosmos_endpoint, "COSMOS_KEY": cosmos_peer.EMULATOR_KEY, "COSMOS_DATABASE": "e2e",
           "COSMOS_CONTAINER": f"workers-{os.getpid()}-{time.time_ns() % 10**9}", "JOB_STORE_URL": database,
           "PARTITIONS": str(PARTITIONS), "PARTITION_LEASE_SECONDS": str(LEASE),
           "PARTITION_RENEW_SECONDS": str(RENEW), "ACTIVATE_LINE_SECONDS": "4", "LOG_FORMAT": "json",
           "RATE_LIMIT_USER_BURST": "100", "RATE_LIMIT_USER_PER_MINUTE": "600"}
    drop_database(postgres_base_url, database)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Iterator[BotCluster]:
    with BotCluster(tmp_path_factory.mktemp("workers"), env, webs=2, workers=3) as started:
        started.settled()
        yield started


@pytest.fixture
def healthy(cluster: BotCluster, request: pytest.FixtureRequest) -> Iterator[BotCluster]:
    """The module's cluster with every worker running and the partitions settled, before and after."""
    cluster.start()
    cluster.settled()
    yield cluster
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(cluster.log_tail(120))
    for worker in cluster.workers:
        if worker.pid is not None and worker.alive:
            os.kill(worker.pid, signal.SIGCONT)  # a test that failed while one was frozen
    cluster.start()
    cluster.settled()


@pytest.fixture
def probe(tmp_path: Path, env: dict[str, str]) -> StoreProbe:
    return StoreProbe(tmp_path, env)


def records(process: BotProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for path in process.log_files
            for line in path.read_text("utf-8").splitlines() if line.startswith("{")]


def at(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["time"].replace("Z", "+00:00")).timestamp()


def turns(process: BotProcess, key: str) -> list[float]:
    """When ``process`` committed a turn of conversation ``key``."""
    return [at(r) for r in records(process) if r["logger"] == "agent.processor"
            and r["message"].startswith(f"turn committed in {key}:")]


def job_lines(process: BotProcess, job_id: str, ending: str) -> list[float]:
    return [at(r) for r in records(process) if r["logger"] == "jobs.runner" and r.get("job_id") == job_id
            and r["message"].endswith(ending)]


def test_conversations_are_spread_over_all_workers_and_each_runs_on_one(healthy: BotCluster,
                                                                          conn: RecordingConnector) -> None:
    held = healthy.settled()
    assert all(held.values()) and sum(len(p) for p in held.values()) == PARTITIONS  # no worker idles
    for worker, partitions in held.items():
        _, samples = scrape(worker)
        assert value(samples, "teams_agent_partitions_owned") == len(partitions)
        assert value(samples, "teams_agent_active_worker") == 1
        assert value(samples, "teams_agent_lease_renewals_total") >= 1
    conversations = [new_conversation_id() for _ in range(12)]
    for n, conv in enumerate(conversations):
        say(healthy, conn, conv, f"my name is Ada{n}")
    for n, conv in enumerate(conversations):
        say(healthy, conn, conv, f"my name is Bob{n}")
    conn.wait_for(lambda c: all(len(c.texts(conv)) == 2 for conv in conversations), timeout=30)
    busy = set()
    for conv in conversations:
        key = f"emulator:{conv}"
        ran = {w: turns(w, key) for w in healthy.workers if turns(w, key)}
        # Every turn of the conversation ran on its partition's owner, and only there.
        assert list(ran) == [healthy.owner(key)], {w.data_dir.name: t for w, t in ran.items()}
        assert sum(len(t) for t in ran.values()) >= 2
        busy |= set(ran)
    assert len(busy) >= 2  # spread over the workers, not funnelled into one
    for web in healthy.webs:
        assert not [r for r in records(web) if r["logger"] in ("jobs.runner", "agent.processor")]


def test_a_killed_workers_conversation_moves_and_its_job_finishes_once(
        healthy: BotCluster, conn: RecordingConnector, probe: StoreProbe) -> None:
    conv = new_conversation_id()
    key = f"emulator:{conv}"
    owner = healthy.owner(key)
    say(healthy, conn, conv, "activate line 555-0177")
    job_id = job_id_in(conn.wait_for_texts(1, conv, timeout=10)[0])
    wait_until(lambda: (probe.jobs(key)[0]["progress"] or 0) >= 0.25, 10, "the job reports progress")
    killed_at = time.time()
    owner.kill()  # SIGKILL mid-job
    successor = healthy.owner(key, timeout=MOVE_BOUND, besides=owner)
    conn.wait_for(lambda c: len(completions(c, conv)) >= 1, timeout=20)
    time.sleep(1.5)  # a second announcement would arrive by now
    assert completions(conn, conv) == [f"✅ Line 555-0177 is active (job `{job_id}`)."]
    [job] = probe.jobs(key)
    assert (job["status"], job["attempt"], job["interruptions"]) == ("succeeded", 1, 1)
    [restarted] = job_lines(successor, job_id, "started")
    assert restarted >= killed_at  # never twice at once: only after the owner died
    say(healthy, conn, conv, "my name is Grace")
    conn.wait_for(lambda c: "Nice to meet you, Grace. I'll remember that." in c.texts(conv), timeout=15)


def test_a_frozen_worker_is_replaced_and_its_late_writes_are_refused(
        healthy: BotCluster, conn: RecordingConnector, probe: StoreProbe) -> None:
    conv = new_conversation_id()
    key = f"emulator:{conv}"
    frozen = healthy.owner(key)
    assert frozen.pid is not None
    say(healthy, conn, conv, "activate line 555-0199")
    job_id = job_id_in(conn.wait_for_texts(1, conv, timeout=10)[0])
    wait_until(lambda: (probe.jobs(key)[0]["progress"] or 0) >= 0.25, 10, "the job reports progress")
    os.kill(frozen.pid, signal.SIGSTOP)  # its TCP connections stay open; it renews nothing
    stopped_at, frozen_stopped_at = time.monotonic(), time.time()
    successor = healthy.owner(key, timeout=MOVE_BOUND, besides=frozen)
    moved_after = time.monotonic() - stopped_at
    assert moved_after < MOVE_BOUND
    # The successor re-runs the job (interrupted: the frozen attempt never finished). Wake the frozen
    # worker while it does: its attempt resumes, finds the lease gone and stops without a word.
    wait_until(lambda: job_lines(successor, job_id, "started"), 10, "the successor starts the job")
    woken_at = time.time()
    os.kill(frozen.pid, signal.SIGCONT)
    conn.wait_for(lambda c: len(completions(c, conv)) >= 1, timeout=20)
    wait_until(lambda: value(scrape(frozen)[1], "teams_agent_fenced_writes_total", by="lease") >= 1, 10,
               "the woken worker refuses its late writes")
    time.sleep(1.5)  # a second announcement would arrive by now
    assert completions(conn, conv) == [f"✅ Line 555-0199 is active (job `{job_id}`)."]
    [job] = probe.jobs(key)
    assert (job["status"], job["attempt"], job["interruptions"]) == ("succeeded", 1, 1)
    # Never two attempts at once: the frozen worker's attempt (started before it froze) stopped when it
    # woke, writing nothing; the successor's started while it was frozen. When the partitions are dealt
    # out again the job may move back, but only after the successor handed its attempt back.
    frozen_starts, successor_starts = job_lines(frozen, job_id, "started"), job_lines(successor, job_id, "started")
    stopped = [at(r) for r in records(frozen) if r.get("job_id") == job_id and "no longer owns" in r["message"]]
    assert frozen_starts[0] < frozen_stopped_at < successor_starts[0] < woken_at <= stopped[0]
    successor_ends = [*job_lines(successor, job_id, "succeeded"),
                      *job_lines(successor, job_id, "it will run again after the restart")]
    assert all(start >= min(successor_ends) for start in frozen_starts[1:]), (frozen_starts, successor_ends)
    assert all(end >= min(successor_ends) for end in job_lines(frozen, job_id, "succeeded"))
    _, samples = scrape(frozen)
    assert value(samples, "teams_agent_partition_changes_total", change="lost") >= 1
    print(f"partition moved {moved_after:.2f} s after SIGSTOP (bound {MOVE_BOUND:g} s)")
    # It rejoins: the partitions are dealt out again and the conversation carries on.
    healthy.settled()
    say(healthy, conn, conv, "my name is Hopper")
    conn.wait_for(lambda c: "Nice to meet you, Hopper. I'll remember that." in c.texts(conv), timeout=15)
