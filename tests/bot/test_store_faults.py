"""The store failing under the real app (in-process, real aiohttp app, recording connector)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from app import create_app
from harness.activities import message, new_conversation_id
from harness.connector import RecordingConnector
from runtime.config import Settings
from storage.abc import StoreUnavailableError
from storage.sqlite import SqliteStore


class FlakyStore(SqliteStore):
    """A SqliteStore whose chosen methods fail as an unreachable or throttling store would."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.down: set[str] = set()
        self.failures = 0

    def __getattribute__(self, name: str) -> Any:
        attribute = super().__getattribute__(name)
        if name.startswith("_") or name not in super().__getattribute__("down"):
            return attribute

        async def unavailable(*args: Any, **kwargs: Any) -> Any:
            self.failures += 1
            raise StoreUnavailableError(f"{name}: 429 Too Many Requests (injected)")

        return unavailable


@pytest.fixture
def connector() -> Any:
    with RecordingConnector() as conn:
        yield conn


@pytest.fixture
async def bot(tmp_path: Path, aiohttp_client: Callable[..., Any],
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TestClient, FlakyStore]]:
    monkeypatch.setenv("ACTIVATE_LINE_SECONDS", "0.5")  # the demo tool reads its setting when it runs
    store = FlakyStore(tmp_path / "conversations.sqlite3")
    settings = Settings(data_dir=tmp_path)
    client = await aiohttp_client(create_app(settings, store=store))
    yield client, store


async def post(client: TestClient, activity: dict[str, Any]) -> Any:
    return await client.post("/api/messages", json=activity)


async def wait_texts(conn: RecordingConnector, conv: str, count: int, timeout: float = 15) -> list[str]:
    await conn.awaiting(lambda c: len(c.texts(conv)) >= count, timeout=timeout)
    return conn.texts(conv)


async def test_ingest_answers_503_while_the_store_is_down_and_nothing_is_half_written(
        bot: tuple[TestClient, FlakyStore], connector: RecordingConnector) -> None:
    client, store = bot
    conv = new_conversation_id()
    activity = message("my name is Ada", conversation_id=conv, service_url=connector.url)
    store.down = {"append_event"}
    response = await post(client, activity)
    assert response.status == 503 and response.headers["Retry-After"]
    assert "retry" in (await response.text())
    assert await store.pending_events(f"emulator:{conv}") == []
    store.down = set()
    assert (await post(client, activity)).status == 201  # the channel's redelivery
    assert await wait_texts(connector, conv, 1) == ["Nice to meet you, Ada. I'll remember that."]


async def test_a_failing_commit_is_retried_until_the_store_is_back(
        bot: tuple[TestClient, FlakyStore], connector: RecordingConnector) -> None:
    client, store = bot
    conv = new_conversation_id()
    store.down = {"commit"}
    activity = message("my name is Ada", conversation_id=conv, service_url=connector.url)
    assert (await post(client, activity)).status == 201
    await asyncio.sleep(1.5)
    assert store.failures >= 2 and connector.texts(conv) == []
    store.down = set()
    assert await wait_texts(connector, conv, 1) == ["Nice to meet you, Ada. I'll remember that."]
    await asyncio.sleep(0.5)
    assert len(connector.texts(conv)) == 1
    record = await store.load(f"emulator:{conv}")
    assert record.turns == 1 and record.outbox == ()


async def test_job_updates_wait_out_a_store_outage(bot: tuple[TestClient, FlakyStore],
                                                   connector: RecordingConnector) -> None:
    client, store = bot
    conv = new_conversation_id()
    await post(client, message("activate line 555-0100", conversation_id=conv, service_url=connector.url))
    await wait_texts(connector, conv, 1)
    store.down = {"patch_job", "append_event"}  # progress and the outcome cannot be written
    started = time.monotonic()
    await asyncio.sleep(2)
    store.down = set()
    texts = await wait_texts(connector, conv, 2, timeout=30)
    assert texts[1].startswith("✅ Line 555-0100 is active")
    [job] = await store.list_jobs(f"emulator:{conv}")
    assert job.status == "succeeded" and time.monotonic() - started >= 2
