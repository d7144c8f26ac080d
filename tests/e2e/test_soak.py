"""The crash soak in short form (``make soak`` runs the long one): SIGKILL at random moments, of the
one process, and of any process of a cluster (``make soak CLUSTER=1``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.peers.postgres import drop_database

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_spec = importlib.util.spec_from_file_location("soak", Path(__file__).resolve().parents[2] / "scripts" / "soak.py")
assert _spec is not None and _spec.loader is not None
soak = importlib.util.module_from_spec(_spec)
sys.modules["soak"] = soak  # dataclasses look their module up there
_spec.loader.exec_module(soak)


def assert_nothing_lost(report: Any) -> None:
    print(report.summary())
    assert report.kills == 6 and report.messages > 20 and report.jobs > 3
    assert report.lost == [], report.summary()
    assert report.unloadable == []
    # Only the send-then-mark window may repeat a message: at most one per conversation per kill.
    assert report.duplicates <= report.kills * report.conversations


def test_random_sigkills_lose_nothing(tmp_path: Path) -> None:
    report = soak.run_soak(kills=6, conversations=4, seed=11, data_dir=tmp_path, progress=False)
    assert_nothing_lost(report)


def test_random_sigkills_of_cluster_processes_lose_nothing(tmp_path: Path, cosmos_endpoint: str,
                                                           postgres_base_url: str) -> None:
    """2 web + 3 workers on Cosmos DB + PostgreSQL; each blow hits one process: a worker killed or frozen
    (SIGSTOP beyond its lease, then SIGCONT), or a web instance killed."""
    store_env = soak.cluster_store_env(cosmos_endpoint, postgres_base_url)
    try:
        report = soak.run_soak(kills=6, conversations=4, seed=2, data_dir=tmp_path, progress=False,
                               cluster_env=store_env)
    finally:
        drop_database(postgres_base_url, store_env["JOB_STORE_URL"])
    assert_nothing_lost(report)
    # Seed 2 makes the killer deal every kind of blow: a worker killed, a worker frozen, a web instance killed.
    assert sum(report.kills_by.values()) == 6 and set(report.kills_by) == set(soak.KILL_KINDS), report.kills_by
    assert report.exits == [], report.exits  # no process died that the killer did not hit
