"""Several instances on shared stores: failover of the active worker, wake-ups across processes,
readiness and metrics by role. Real processes of the app on the Cosmos DB wire server and a
throwaway PostgreSQL (harness/peers), 2 web + 2 worker behind a round-robin proxy.

The suites in test_conversation.py and test_jobs.py also run on such a cluster (``[cluster]``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness.activities import new_conversation_id
from harness.botproc import BotProcess
from harness.cluster import BotCluster
from harness.connector import RecordingConnector
from harness.otlp import OtlpCollector
from harness.peers.postgres import create_database, drop_database, psycopg_url
from harness.waiting import wait_until
from tests.e2e.conftest import StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_jobs import completions, job_id_in
from tests.test_ops import scrape, value

pytestmark = pytest.mark.e2e

#: How long a stopping worker's partitions may take to reach the other (handed back at once on SIGTERM).
TAKEOVER_BOUND = 10.0


@pytest.fixture
def backend() -> str:
    return "cluster"


@pytest.fixture
def cluster_env(backend_env: dict[str, str]) -> dict[str, str]:
    return {**backend_env, "ACTIVATE_LINE_SECONDS": "4", "LOG_FORMAT": "json"}


@pytest.fixture
def cluster(tmp_path: Path, cluster_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[BotCluster]:
    with BotCluster(tmp_path, cluster_env) as started:
        yield started
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(started.log_tail(120))


def records(process: BotProcess) -> list[dict[str, Any]]:
    """Every JSON log record of every start of ``process``."""
    return [json.loads(line) for path in process.log_files
            for line in path.read_text("utf-8").splitlines() if line.startswith("{")]


def job_starts(process: BotProcess, job_id: str) -> list[float]:
    return [datetime.fromisoformat(r["time"].replace("Z", "+00:00")).timestamp() for r in records(process)
            if r["logger"] == "jobs.runner" and r.get("job_id") == job_id and " attempt " in r["message"]
            and r["message"].endswith("started")]


def test_each_job_runs_on_its_conversations_owner_only(cluster: BotCluster, conn: RecordingConnector,
                                                        stored: StoreProbe) -> None:
    cluster.settled()
    conversations = [new_conversation_id() for _ in range(4)]
    for n, conv in enumerate(conversations):
        say(cluster, conn, conv, f"activate line 555-01{n:02d}")
    conn.wait_for(lambda c: all(len(completions(c, conv)) == 1 for conv in conversations), timeout=30)
    for conv in conversations:
        key = f"emulator:{conv}"
        owner = cluster.owner(key)
        [other] = [w for w in cluster.workers if w is not owner]
        job_id = stored.jobs(key)[0]["id"]
        assert len(job_starts(owner, job_id)) == 1 and not job_starts(other, job_id)
    assert all(len(completions(conn, conv)) == 1 for conv in conversations)
    # The web instances shared the traffic; neither ran a turn or a job.
    assert all(count > 0 for count in cluster.proxy.counts.values()) and len(cluster.proxy.counts) == 2
    for web in cluster.webs:
        assert not [r for r in records(web) if r["logger"] in ("jobs.runner", "agent.processor")]


def test_a_message_reaches_the_worker_by_notification(tmp_path: Path, backend_env: dict[str, str],
                                                      conn: RecordingConnector, conv: str) -> None:
    """No sweep (an hour apart): only the NOTIFY from the web instance can wake the worker."""
    env = {**backend_env, "WORK_SWEEP_SECONDS": "3600"}
    with BotCluster(tmp_path, env, webs=1, workers=1) as cluster:
        for n in range(3):
            say(cluster, conn, conv, f"my name is Ada{n}")
            assert conn.wait_for_texts(n + 1, conv)[n] == f"Nice to meet you, Ada{n}. I'll remember that."
        _, samples = scrape(cluster.workers[0])
        assert value(samples, "teams_agent_wakeups_total", source="notify") >= 3
        assert value(samples, "teams_agent_wakeups_total", source="sweep") == 0


def test_the_sweep_finds_work_whose_notification_was_lost(tmp_path: Path, backend_env: dict[str, str],
                                                         postgres_base_url: str, conn: RecordingConnector,
                                                         conv: str) -> None:
    """The web instance notifies into another database, where nobody listens: the sweep must find it."""
    elsewhere = create_database(postgres_base_url)
    try:
        worker = BotProcess(tmp_path / "worker", env={**backend_env, "WORK_SWEEP_SECONDS": "1"},
                            args=["--role", "worker"]).start()
        web = BotProcess(tmp_path / "web", env={**backend_env, "JOB_STORE_URL": elsewhere}, args=["--role", "web"])
        web.start()
        try:
            say(web, conn, conv, "my name is Lost")
            [reply] = conn.wait_for_texts(1, conv, timeout=10)
            assert reply == "Nice to meet you, Lost. I'll remember that."
            _, samples = scrape(worker)
            assert value(samples, "teams_agent_wakeups_total", source="sweep") >= 1
        finally:
            web.kill()
            worker.kill()
    finally:
        drop_database(postgres_base_url, elsewhere)


def terminate_backends(job_store_url: str, where: str, *params: object) -> int:
    """What a network cut or a PostgreSQL failover does to an instance's sessions."""
    with psycopg.connect(psycopg_url(job_store_url), autocommit=True) as db:
        rows = db.execute(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE {where} "
                          "AND pid <> pg_backend_pid()", params).fetchall()
    return len(rows)


def test_readiness_and_metrics_by_role(cluster: BotCluster, cluster_env: dict[str, str]) -> None:
    held = cluster.settled()  # issue 18: both workers active, the 16 partitions split 8 + 8
    web = cluster.webs[0]
    assert cluster.readiness(web) == {"http_status": 200, "status": "ready", "role": "web", "active_worker": False,
                                      "checks": {"store": "ok", "coordination": "ok"}}
    for worker, partitions in held.items():
        assert len(partitions) == 8
        assert cluster.readiness(worker) == {"http_status": 200, "status": "ready", "role": "worker",
                                             "active_worker": True,
                                             "checks": {"store": "ok", "coordination": "ok", "scheduler": "ok"},
                                             "partitions": {"held": sorted(partitions), "of": 16}}
        _, samples = scrape(worker)
        assert value(samples, "teams_agent_active_worker") == 1
        assert value(samples, "teams_agent_partitions_owned") == 8
        assert value(samples, "teams_agent_fenced_writes_total", by="lease") == 0
    assert value(scrape(web)[1], "teams_agent_active_worker") == 0
    # Workers take no activities; web instances do.
    assert cluster.workers[0].post_activity({"type": "message"})[0] == 404

    # PostgreSQL gone for a web instance: it still takes messages in (durably), so it stays ready, degraded.
    assert terminate_backends(cluster_env["JOB_STORE_URL"], "application_name = %s",
                              "teams-agent web notify") == 2
    body = cluster.readiness(web)
    assert body["http_status"] == 200 and body["checks"]["coordination"].startswith("degraded")
    wait_until(lambda: cluster.readiness(web)["checks"]["coordination"] == "ok", 10, "the web instance reconnects")


def test_sigterm_on_a_worker_hands_over_without_losing_the_job(cluster: BotCluster,
                                                               conn: RecordingConnector, conv: str,
                                                               stored: StoreProbe) -> None:
    key = f"emulator:{conv}"
    cluster.settled()
    active = cluster.owner(key)
    [standby] = [w for w in cluster.workers if w is not active]
    say(cluster, conn, conv, "activate line 555-0188")
    job_id = job_id_in(conn.wait_for_texts(1, conv, timeout=10)[0])
    wait_until(lambda: job_starts(active, job_id), 10, "the job starts")
    assert active.terminate() == 0, active.log_tail()
    # Handed back on the way out: the other worker takes the partitions at its next round, not after the lease.
    assert cluster.owner(key, timeout=TAKEOVER_BOUND, besides=active) is standby
    conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=20)
    [job] = stored.jobs(f"emulator:{conv}")
    # Handed back, not interrupted: the standby ran the same attempt again.
    assert (job["status"], job["attempt"], job["interruptions"]) == ("succeeded", 1, 0)


def test_traces_link_the_workers_turn_to_the_web_instances_ingest(tmp_path: Path, backend_env: dict[str, str],
                                                                   conn: RecordingConnector, conv: str) -> None:
    """OpenTelemetry (optional, on here): spans from both processes reach a collector over OTLP/HTTP,
    and the worker's turn links to the ingest span of the message it answers."""
    with OtlpCollector() as collector:
        env = {**backend_env, "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100",
               "ACTIVATE_LINE_SECONDS": "1"}
        with BotCluster(tmp_path, env, webs=1, workers=1) as cluster:
            say(cluster, conn, conv, "activate line 555-0123")
            conn.wait_for(lambda c: len(completions(c, conv)) == 1, timeout=15)
            [ingest] = [s for s in collector.wait_for("ingest activity") if s.attributes["activity.type"] == "message"]
            turns = collector.wait_for("agent turn", count=2)  # the request, then the job's outcome
            collector.wait_for("job attempt")
            collector.wait_for("deliver message", count=3)
    assert ingest.service == "teams-agent-web" and ingest.attributes["http.response.status_code"] == 201
    [answer] = [t for t in turns if t.attributes["event.kind"] == "message"]
    assert answer.service == "teams-agent-worker" and answer.links == ((ingest.trace_id, ingest.span_id),)
    assert answer.attributes["conversation.key"] == f"emulator:{conv}"
    # AutoGen's own spans (the agent and its tool call) nest under the turn.
    assert any(s.parent_span_id == answer.span_id for s in collector.spans())
