"""Fixtures for the storage contract suite: one ``store`` per implementation.

Every implementation is a :class:`Backend` in :data:`BACKENDS`; the ``store`` fixture is
parametrised over that list, so adding an implementation (e.g. Cosmos) is one more entry.
A backend that needs a server is skipped unless its server is configured through the
environment. Tests use :func:`make_key`-generated keys so that they also work against a
shared server that keeps data between tests.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from storage.abc import ConversationStore
from storage.memory import MemoryStore
from storage.sqlite import SqliteStore

#: Builds an unopened store; gets a per-test scratch directory for file-based stores.
StoreFactory = Callable[[Path], ConversationStore]


@dataclass(frozen=True)
class Backend:
    name: str
    factory: StoreFactory
    #: Why the backend cannot run here (e.g. its server is not configured), or None.
    skip_reason: str | None = None


def _memory(tmp_path: Path) -> ConversationStore:
    return MemoryStore()


def _sqlite(tmp_path: Path) -> ConversationStore:
    return SqliteStore(tmp_path / "store.sqlite3")


# def _cosmos(tmp_path: Path) -> ConversationStore:
#     from storage.cosmos import CosmosStore
#
#     return CosmosStore(
#         endpoint=os.environ["COSMOS_TEST_ENDPOINT"],
#         key=os.environ["COSMOS_TEST_KEY"],
#         database=os.environ.get("COSMOS_TEST_DATABASE", "agent-tests"),
#         container=f"test-{uuid.uuid4().hex[:12]}",
#     )


def _requires_env(var: str) -> str | None:
    return None if os.environ.get(var) else f"{var} is not set"


BACKENDS: list[Backend] = [
    Backend("memory", _memory),
    Backend("sqlite", _sqlite),
    # Backend("cosmos", _cosmos, skip_reason=_requires_env("COSMOS_TEST_ENDPOINT")),
]


def _backend_params() -> list[object]:
    return [
        pytest.param(
            b,
            id=b.name,
            marks=[pytest.mark.skip(reason=b.skip_reason)] if b.skip_reason else [],
        )
        for b in BACKENDS
    ]


@pytest_asyncio.fixture(params=_backend_params())
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ConversationStore]:
    """An opened store of each implementation, closed after the test."""
    backend: Backend = request.param
    instance = backend.factory(tmp_path)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.close()


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
