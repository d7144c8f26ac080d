"""Suite-wide fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from blockbuster import BlockBuster, blockbuster_ctx

from harness.fake_openai import FakeOpenAI
from harness.peers import postgres as postgres_peer


@pytest.fixture
def blockbuster() -> Iterator[BlockBuster]:
    """Fail the test if anything blocks the event loop (sync file, socket or sleep calls).

    Used autouse in the packages whose code runs on the loop in-process (see their conftest).
    """
    with blockbuster_ctx() as bb:
        # Import-time and logging I/O of dependencies is not ours to police.
        for name in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):
            if name in bb.functions:
                bb.functions[name].can_block_in("logging/__init__.py", {"emit", "flush"})
        yield bb


@pytest.fixture(scope="session")
def postgres_base_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the session: ``postgresql://postgres@127.0.0.1:PORT/postgres``.

    Skips the test when the server binaries are missing (Debian's ``postgresql``: ``make postgresql``).
    """
    if reason := postgres_peer.unavailable_reason():
        pytest.skip(reason)
    with postgres_peer.postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_base_url: str) -> Iterator[str]:
    """A fresh database per test, as a SQLAlchemy URL ``postgresql+psycopg://postgres@127.0.0.1:PORT/t_xxx``.

    For psycopg itself use ``harness.peers.postgres.psycopg_url(postgres_url)``. Dropped after the test.
    """
    url = postgres_peer.create_database(postgres_base_url)
    yield url
    postgres_peer.drop_database(postgres_base_url, url)


@pytest.fixture(scope="session")
def model_server() -> Iterator[FakeOpenAI]:
    """The local chat-completions server (harness/fake_openai.py), one per session."""
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def fake(model_server: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """The model server with nothing queued or recorded from another test."""
    model_server.reset()
    yield model_server
    model_server.reset()
