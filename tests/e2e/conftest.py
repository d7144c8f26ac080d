"""End-to-end fixtures: the real app process, talking to a recording Bot Connector.

Every e2e test that uses ``backend_env`` runs twice: on the embedded SQLite store and on
Cosmos DB (the wire-protocol server from harness/peers, one fresh container per test). Tests
marked ``cluster`` run a third time on a cluster: 2 web + 2 worker processes on Cosmos DB and
PostgreSQL (a fresh database per test), behind a round-robin proxy (harness/cluster.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from harness.activities import new_conversation_id
from harness.botproc import BotProcess
from harness.cluster import BotCluster
from harness.connector import RecordingConnector
from harness.peers import cosmos as cosmos_peer
from harness.playground import Playground
from storage.abc import ConversationStore
from storage.sqlite import SqliteStore

T = TypeVar("T")


@pytest.fixture(scope="session")
def connector() -> Iterator[RecordingConnector]:
    with RecordingConnector() as conn:
        yield conn


@pytest.fixture
def conn(connector: RecordingConnector) -> Iterator[RecordingConnector]:
    """The shared connector, healthy and with no faults left over from another test."""
    connector.fail_next(0, 200)
    connector.set_delay(0)
    connector.clear()
    yield connector
    connector.fail_next(0, 200)
    connector.set_delay(0)


@pytest.fixture(scope="session")
def cosmos_endpoint() -> Iterator[str]:
    if reason := cosmos_peer.unavailable_reason():
        pytest.skip(reason)
    with cosmos_peer.cosmos_server() as endpoint:
        yield endpoint


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``backend`` where this module's fixture provides it (modules may pin their own)."""
    definitions = metafunc.definition._fixtureinfo.name2fixturedefs.get("backend", ())
    if definitions and definitions[-1].func is backend.__wrapped__:  # type: ignore[attr-defined]
        cluster = metafunc.definition.get_closest_marker("cluster") is not None
        metafunc.parametrize("backend", ["sqlite", "cosmos", *(["cluster"] if cluster else [])], indirect=True)


@pytest.fixture
def backend_env(backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    if backend == "sqlite":
        return {}
    endpoint = request.getfixturevalue("cosmos_endpoint")
    env = {"COSMOS_ENDPOINT": endpoint, "COSMOS_KEY": cosmos_peer.EMULATOR_KEY,
           "COSMOS_DATABASE": "e2e", "COSMOS_CONTAINER": f"c-{uuid.uuid4().hex[:12]}"}
    if backend == "cluster":
        env["JOB_STORE_URL"] = request.getfixturevalue("postgres_url")
        # Issue 18: short leases, so that a cluster killed and restarted takes its partitions back soon.
        env.update(PARTITION_LEASE_SECONDS="3", PARTITION_RENEW_SECONDS="1")
    return env


Deployment = BotProcess | BotCluster
Launch = Callable[[dict[str, str]], Deployment]


@pytest.fixture
def launch(tmp_path: Path, backend: str, backend_env: dict[str, str],
           request: pytest.FixtureRequest) -> Iterator[Launch]:
    """Start the bot as the backend says (one process, or a cluster) with extra settings; each
    one started is killed after the test (and its log printed if the test failed)."""
    started: list[Deployment] = []

    def start(env: dict[str, str]) -> Deployment:
        merged = {**backend_env, **env}
        deployment: Deployment = (BotCluster(tmp_path / f"cluster-{len(started)}", merged) if backend == "cluster"
                                  else BotProcess(tmp_path, env=merged))
        started.append(deployment)
        return deployment.start()

    yield start
    report = getattr(request.node, "rep_call", None)
    for deployment in started:
        if report is not None and report.failed:
            print(deployment.log_tail(200))
        if isinstance(deployment, BotCluster):
            deployment.close()
        else:
            deployment.kill()


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"ACTIVATE_LINE_SECONDS": "2"}


@pytest.fixture
def bot(launch: Launch, bot_env: dict[str, str]) -> Deployment:
    return launch(bot_env)


@pytest.fixture
def conv() -> str:
    return new_conversation_id()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


class StoreProbe:
    """Reads what the bot stored, through the same store class the bot used (what is on disk
    or in the container is what counts, not what the process claims)."""

    def __init__(self, data_dir: Path, env: dict[str, str]) -> None:
        self.data_dir = data_dir
        self.env = env

    def _store(self) -> ConversationStore:
        if "COSMOS_ENDPOINT" in self.env:
            from storage.cosmos import CosmosStore

            return CosmosStore(self.env["COSMOS_ENDPOINT"], self.env["COSMOS_KEY"], self.env["COSMOS_DATABASE"],
                               self.env["COSMOS_CONTAINER"])
        return SqliteStore(self.data_dir / "conversations.sqlite3")

    def run(self, action: Callable[[ConversationStore], Awaitable[T]]) -> T:
        async def main() -> T:
            store = self._store()
            await store.open()
            try:
                return await action(store)
            finally:
                await store.close()

        return asyncio.run(main())

    def agent_messages(self, key: str) -> list[dict[str, Any]]:
        async def read(store: ConversationStore) -> Any:
            return (await store.load(key)).agent_state

        state = self.run(read)
        return list(state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"])

    def jobs(self, key: str) -> list[dict[str, Any]]:
        async def read(store: ConversationStore) -> list[dict[str, Any]]:
            return [j.to_json() for j in await store.list_jobs(key)]

        return self.run(read)

    def stored_item_count(self) -> int:
        """Everything an ingest could have written (events, references, conversations)."""
        if "COSMOS_ENDPOINT" in self.env:
            async def count(store: ConversationStore) -> int:
                container: Any = store._container  # type: ignore[attr-defined]
                return sum([n async for n in container.query_items("SELECT VALUE COUNT(1) FROM c")])

            return self.run(count)
        db = sqlite3.connect(self.data_dir / "conversations.sqlite3")
        try:
            return sum(db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                       for t in ("events", "conversation_references", "conversations"))
        finally:
            db.close()


@pytest.fixture
def stored(tmp_path: Path, backend_env: dict[str, str]) -> StoreProbe:
    return StoreProbe(tmp_path, backend_env)


@pytest.fixture
def pg(bot: BotProcess, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Playground]:
    """A Microsoft 365 Agents Playground pointed at the bot; fails the test if any exchange between
    them got an HTTP error (and prints the Playground's log if the test failed)."""
    with Playground(bot.messages_url, log_dir=tmp_path / "playground") as playground:
        yield playground
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            print(playground.log_tail(100))
        else:
            assert playground.failed_exchanges() == [], "an exchange between Playground and bot failed"
