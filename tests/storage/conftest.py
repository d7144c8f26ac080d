"""Fixtures for the storage contract suite: one ``store`` per implementation.

Every implementation is a :class:`Backend` in :data:`BACKENDS`; the ``store`` fixture is
parametrised over that list, so adding an implementation (e.g. Cosmos) is one more entry.
A backend that needs a server gets it from a session-scoped fixture named by
``Backend.peer_fixture`` and is skipped when that server cannot run here. Cosmos runs against
the local wire-protocol server (harness/peers/cosmos.py), or against a real account or emulator
when ``COSMOS_TEST_ENDPOINT`` (+ ``COSMOS_TEST_KEY``, blank = Entra ID) is set. Tests use
:func:`make_key`-generated keys so that they also work against a shared server that keeps data
between tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from harness.peers import cosmos as cosmos_peer_server
from storage.abc import ConversationStore
from storage.memory import MemoryStore
from storage.sqlite import SqliteStore

#: Builds an unopened store from a per-test scratch directory (for file-based stores) and the
#: value of the backend's peer fixture (None if it has none).
StoreFactory = Callable[[Path, Any], ConversationStore]


@dataclass(frozen=True)
class Backend:
    name: str
    factory: StoreFactory
    #: Why the backend cannot run here (e.g. its server is not available), or None.
    skip_reason: str | None = None
    #: Name of a (session-scoped) fixture whose value the factory needs, e.g. a server.
    peer_fixture: str | None = None


@dataclass(frozen=True)
class CosmosPeer:
    """Where the Cosmos tests store: one database and one container for the session."""

    endpoint: str
    key: str | None
    database: str
    container: str


def _memory(tmp_path: Path, peer: Any) -> ConversationStore:
    return MemoryStore()


def _sqlite(tmp_path: Path, peer: Any) -> ConversationStore:
    return SqliteStore(tmp_path / "store.sqlite3")


def _cosmos(tmp_path: Path, peer: CosmosPeer) -> ConversationStore:
    from storage.cosmos import CosmosStore

    return CosmosStore(endpoint=peer.endpoint, key=peer.key, database=peer.database, container=peer.container)


def _cosmos_skip_reason() -> str | None:
    return None if os.environ.get("COSMOS_TEST_ENDPOINT") else cosmos_peer_server.unavailable_reason()


BACKENDS: list[Backend] = [
    Backend("memory", _memory),
    Backend("sqlite", _sqlite),
    Backend("cosmos", _cosmos, skip_reason=_cosmos_skip_reason(), peer_fixture="cosmos_peer"),
]


@pytest.fixture(scope="session")
def cosmos_peer() -> Iterator[CosmosPeer]:
    """The Cosmos DB the tests use: ``COSMOS_TEST_ENDPOINT`` if set, else a local wire server.

    A real account keeps one container (``COSMOS_TEST_CONTAINER``, default ``agent-tests``:
    containers cost money, and the tests' unique keys make sharing safe); the local server gets
    a fresh one per session.
    """
    database = os.environ.get("COSMOS_TEST_DATABASE", "agent-tests")
    if os.environ.get("COSMOS_TEST_ENDPOINT"):
        endpoint, key = os.environ["COSMOS_TEST_ENDPOINT"], os.environ.get("COSMOS_TEST_KEY") or None
        yield CosmosPeer(endpoint, key, database, os.environ.get("COSMOS_TEST_CONTAINER", "agent-tests"))
        return
    container = f"test-{uuid.uuid4().hex[:12]}"
    reason = cosmos_peer_server.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with cosmos_peer_server.cosmos_server() as endpoint:
        yield CosmosPeer(endpoint, cosmos_peer_server.EMULATOR_KEY, database, container)


def backend_params(*names: str) -> list[Any]:
    """``pytest.param`` per backend (the named ones, or all), skipped where it cannot run."""
    return [
        pytest.param(
            b,
            id=b.name,
            marks=[pytest.mark.skip(reason=b.skip_reason)] if b.skip_reason else [],
        )
        for b in BACKENDS
        if not names or b.name in names
    ]


def _backend_params() -> list[object]:
    return backend_params()


@asynccontextmanager
async def opened(store: ConversationStore) -> AsyncIterator[ConversationStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest_asyncio.fixture(params=_backend_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    """An opened store of each implementation, closed after the test."""
    backend: Backend = request.param
    peer = request.getfixturevalue(backend.peer_fixture) if backend.peer_fixture else None
    async with opened(backend.factory(tmp_path, peer)) as instance:
        yield instance


@pytest.fixture
def make_key() -> Callable[[str], str]:
    """Returns a function giving a Teams-like conversation key unique to this test run."""
    run = uuid.uuid4().hex[:10]

    def make(label: str = "conv") -> str:
        return f"19:{label}-{run}-{uuid.uuid4().hex[:6]}@thread.tacv2"

    return make


@pytest.fixture
def key(make_key: Callable[[str], str]) -> str:
    """One unique conversation key for tests that need a single conversation."""
    return make_key("main")
