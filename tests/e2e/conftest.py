"""End-to-end fixtures: the real app process, talking to a recording Bot Connector."""

from __future__ import annotations

import sqlite3
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.activities import new_conversation_id
from tests.support.botproc import BotProcess
from tests.support.connector import RecordingConnector


@pytest.fixture(scope="session")
def connector() -> Iterator[RecordingConnector]:
    with RecordingConnector() as conn:
        yield conn


@pytest.fixture
def conn(connector: RecordingConnector) -> Iterator[RecordingConnector]:
    """The shared connector, healthy and with no faults left over from another test."""
    connector.fail_next(0, 200)
    connector.set_delay(0)
    yield connector
    connector.fail_next(0, 200)
    connector.set_delay(0)


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"ACTIVATE_LINE_SECONDS": "2"}


@pytest.fixture
def bot(tmp_path: Path, bot_env: dict[str, str], request: pytest.FixtureRequest) -> Iterator[BotProcess]:
    process = BotProcess(tmp_path, env=bot_env)
    process.start()
    yield process
    if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
        print(process.log_tail(200))
    process.kill()


@pytest.fixture
def conv() -> str:
    return new_conversation_id()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report: pytest.TestReport = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report


def stored_rows(data_dir: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the bot's SQLite store directly (what survives on disk is what counts)."""
    db = sqlite3.connect(data_dir / "conversations.sqlite3")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()
