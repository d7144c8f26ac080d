"""Operations: /readyz, Prometheus metrics at /metrics, JSON logs (LOG_FORMAT=json).

The first test starts the real app process (harness/botproc.py) against a recording Bot
Connector; the readiness failures run in-process with aiohttp's test client, where a broken
store can be handed to ``create_app``.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app import SERVICES, create_app
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess, BotStartError
from harness.connector import RecordingConnector
from runtime import logs, metrics
from runtime.config import ConfigError, Settings
from storage.abc import JSON, JobRecord, StoreUnavailableError
from storage.memory import MemoryStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: Every metric family the bot defines, as this process's copy of metrics.py registers them.
OUR_FAMILIES = {f.name for f in metrics.REGISTRY.collect() if f.name.startswith(metrics.PREFIX)}


def scrape(bot: BotProcess) -> tuple[set[str], Samples]:
    status, body = bot.get("/metrics")
    assert status == 200, body
    families = list(text_string_to_metric_families(body))
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    return {f.name for f in families}, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_until(bot: BotProcess, done: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Counters move just after the connector sees a message: poll until they have."""
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(bot)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def say(bot: BotProcess, conn: RecordingConnector, conv: str, text: str) -> None:
    status, body = bot.post_activity(message(text, conversation_id=conv, service_url=conn.url))
    assert status == 201, body


@pytest.fixture
def connector() -> Iterator[RecordingConnector]:
    with RecordingConnector() as conn:
        yield conn


@pytest.mark.e2e
def test_readyz_metrics_and_json_logs_of_the_real_process(tmp_path: Path, connector: RecordingConnector) -> None:
    bot = BotProcess(tmp_path, env={"ACTIVATE_LINE_SECONDS": "1", "LOG_FORMAT": "json"}).start()
    try:
        status, body = bot.get("/readyz")
        assert status == 200, body
        assert json.loads(body) == {"status": "ready", "role": "all", "active_worker": True,
                                    "checks": {"store": "ok", "scheduler": "ok"}}

        names, before = scrape(bot)
        assert names >= OUR_FAMILIES, OUR_FAMILIES - names
        assert {"process_resident_memory_bytes", "python_info"} <= {n for n, _ in before}
        assert value(before, "teams_agent_jobs", state="queued") == 0
        assert value(before, "teams_agent_turns_total", outcome="ok") == 0

        conv = new_conversation_id()
        key = f"emulator:{conv}"
        say(bot, connector, conv, "my name is Ada")
        assert connector.wait_for_texts(1, conv) == ["Nice to meet you, Ada. I'll remember that."]
        after_turn = scrape_until(bot, lambda s: value(s, "teams_agent_outbox_sent_total") >= 1)
        assert value(after_turn, "teams_agent_turns_total", outcome="ok") == 1
        assert value(after_turn, "teams_agent_turn_duration_seconds_count") == 1
        assert value(after_turn, "teams_agent_turn_duration_seconds_sum") > 0
        assert value(after_turn, "teams_agent_outbox_sent_total") == 1
        assert value(after_turn, "teams_agent_outbox_backlog") == 0

        say(bot, connector, conv, "activate line 555-0100")
        texts = connector.wait_for_texts(3, conv, timeout=15)
        assert any("Line 555-0100 is active" in text for text in texts), texts
        tool = {"tool": "activate_new_line"}
        after_job = scrape_until(bot, lambda s: value(s, "teams_agent_turns_total", outcome="ok") >= 3)
        assert value(after_job, "teams_agent_job_attempts_total", **tool) == 1
        assert value(after_job, "teams_agent_jobs_finished_total", **tool, status="succeeded") == 1
        assert value(after_job, "teams_agent_job_duration_seconds_count", **tool, status="succeeded") == 1
        assert value(after_job, "teams_agent_job_duration_seconds_sum", **tool, status="succeeded") >= 0.9
        assert value(after_job, "teams_agent_job_retries_total", **tool) == 0
        assert value(after_job, "teams_agent_jobs", state="running") == 0
        assert value(after_job, "teams_agent_jobs", state="queued") == 0
        assert value(after_job, "teams_agent_turns_total", outcome="ok") == 3  # the name, the request, the result
        assert not [k for k in after_job if k[0] == "teams_agent_connector_errors_total"]

        connector.fail_next(1, 503)  # the connector fails once: the sender retries, the error is counted
        say(bot, connector, conv, "what is my name?")
        assert connector.wait_for_texts(4, conv)[-1] == "Your name is Ada."
        after_fault = scrape_until(bot, lambda s: value(s, "teams_agent_outbox_sent_total") >= 5)
        assert value(after_fault, "teams_agent_connector_errors_total", reason="503") == 1
        assert value(after_fault, "teams_agent_outbox_backlog") == 0
    finally:
        bot.terminate()

    lines = [line for line in bot.log_files[-1].read_text("utf-8").splitlines() if line.strip()]
    records = []
    for line in lines:
        record = json.loads(line)  # every line one JSON object
        assert isinstance(record, dict) and {"time", "level", "logger", "message"} <= record.keys(), line
        records.append(record)
    turns = [r for r in records if r["message"].startswith(f"turn committed in {key}")]
    assert len(turns) >= 3 and all(r["conversation_key"] == key and r["logger"] == "agent.processor" for r in turns)
    job_lines = [r for r in records if r["logger"] == "jobs.runner" and "attempt 1/" in r["message"]]
    assert len(job_lines) == 1 and job_lines[0]["conversation_key"] == key and job_lines[0]["job_id"]
    assert all("job_id" not in r for r in turns), "a conversation woken by a job must not carry its job id"
    assert any(r["logger"] == "app" and r["message"].startswith("ready on port") for r in records)


# --- in-process: readiness failures ---------------------------------------------------------------


class UnreachableStore(MemoryStore):
    """Starts up, then fails as an unreachable database would: point reads always, job queries once told to."""

    def __init__(self) -> None:
        super().__init__()
        self.jobs_down = False

    async def get_reference(self, key: str) -> JSON | None:
        raise StoreUnavailableError("get_reference failed: ServiceRequestError: connection refused (injected)")

    async def unfinished_jobs(self) -> list[JobRecord]:
        if self.jobs_down:
            raise StoreUnavailableError("unfinished_jobs failed (injected)")
        return await super().unfinished_jobs()


class HangingStore(MemoryStore):
    async def get_reference(self, key: str) -> JSON | None:
        await asyncio.sleep(3600)
        return None


def settings_for(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, mcp_config=tmp_path / "no-mcp.json")


async def test_readyz_is_200_when_store_and_scheduler_are_fine(tmp_path: Path,
                                                              aiohttp_client: Callable[..., Any]) -> None:
    client: TestClient = await aiohttp_client(create_app(settings_for(tmp_path), store=MemoryStore()))
    response = await client.get("/readyz")
    assert response.status == 200
    assert await response.json() == {"status": "ready", "role": "all", "active_worker": True,
                                     "checks": {"store": "ok", "scheduler": "ok"}}


async def test_readyz_is_503_when_the_store_is_unreachable(tmp_path: Path,
                                                           aiohttp_client: Callable[..., Any]) -> None:
    store = UnreachableStore()
    client: TestClient = await aiohttp_client(create_app(settings_for(tmp_path), store=store))
    response = await client.get("/readyz")
    assert response.status == 503
    body = await response.json()
    assert body["status"] == "not ready" and body["checks"]["scheduler"] == "ok"
    assert body["checks"]["store"].startswith("StoreUnavailableError: get_reference failed")
    assert (await client.get("/healthz")).status == 200  # alive all the same: restarting would not help

    store.jobs_down = True  # the jobs gauge cannot be read now: the scrape still works, without it
    response = await client.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    assert families["teams_agent_jobs"].samples == []
    assert "teams_agent_turns" in families


async def test_readyz_is_503_when_the_scheduler_is_not_running(tmp_path: Path,
                                                               aiohttp_client: Callable[..., Any]) -> None:
    app = create_app(settings_for(tmp_path), store=MemoryStore())
    client: TestClient = await aiohttp_client(app)
    await app[SERVICES].scheduler.shutdown()
    response = await client.get("/readyz")
    assert response.status == 503
    assert (await response.json())["checks"] == {"store": "ok", "scheduler": "not running"}


async def test_a_store_that_does_not_answer_is_not_ready(tmp_path: Path, aiohttp_client: Callable[..., Any]) -> None:
    app = create_app(settings_for(tmp_path), store=HangingStore())
    await aiohttp_client(app)
    started = time.monotonic()
    checks = await app[SERVICES].readiness.checks(timeout=0.1)
    assert checks == {"store": "no answer within 0.1 s", "scheduler": "ok"}
    assert time.monotonic() - started < 2


async def test_metrics_endpoint_offers_openmetrics_when_asked(tmp_path: Path,
                                                              aiohttp_client: Callable[..., Any]) -> None:
    client: TestClient = await aiohttp_client(create_app(settings_for(tmp_path), store=MemoryStore()))
    response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await response.text()).rstrip().endswith("# EOF")


# --- logs.py and LOG_FORMAT -----------------------------------------------------------------------


def test_json_lines_carry_level_logger_message_context_and_exception() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.make_formatter("json"))
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("tests.ops.json")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        tokens = logs.set_context(conversation_key="msteams:19:abc", job_id="a1b2c3")
        try:
            logger.warning("two\nlines %s", "here", extra={"attempt": 2})
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        finally:
            logs.reset_context(tokens)
        logger.info("outside")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    first, second, third = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "tests.ops.json"
    assert first["message"] == "two\nlines here" and first["attempt"] == 2
    assert (first["conversation_key"], first["job_id"]) == ("msteams:19:abc", "a1b2c3")
    assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
    assert third["message"] == "outside" and "conversation_key" not in third and "job_id" not in third
    assert first["time"].endswith("Z")


def test_context_is_per_task_and_a_new_context_clears_the_job_id() -> None:
    async def main() -> list[dict[str, str]]:
        seen: list[dict[str, str]] = []
        logs.set_context(conversation_key="c1", job_id="j1")

        async def woken() -> None:  # e.g. a conversation woken from a job's task
            logs.set_context(conversation_key="c1")
            seen.append(logs.current_context())

        await asyncio.create_task(woken())
        seen.append(logs.current_context())
        return seen

    assert asyncio.run(main()) == [{"conversation_key": "c1"}, {"conversation_key": "c1", "job_id": "j1"}]
    assert logs.current_context() == {}


def test_setup_text_format_and_rejects_unknown_formats() -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    try:
        logs.setup("DEBUG", "text", stream=stream)
        logging.getLogger("tests.ops.text").debug("hello %s", "there")
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved_handlers:
            root.addHandler(handler)
        root.setLevel(saved_level)
    assert stream.getvalue().rstrip().endswith("DEBUG tests.ops.text: hello there")
    with pytest.raises(ValueError, match="log format"):
        logs.make_formatter("xml")


def test_log_format_setting() -> None:
    assert Settings.from_env({}, dotenv=None).log_format == "text"
    assert Settings.from_env({"LOG_FORMAT": " JSON "}, dotenv=None).log_format == "json"
    with pytest.raises(ConfigError, match="LOG_FORMAT must be text or json"):
        Settings.from_env({"LOG_FORMAT": "yaml"}, dotenv=None)


def test_role_and_job_store_settings() -> None:
    assert Settings.from_env({}, dotenv=None).role == "all"
    settings = Settings.from_env({"ROLE": "Worker", "JOB_STORE_URL": "postgresql://u:p@db:5432/agent"}, dotenv=None)
    assert (settings.role, settings.runs_worker, settings.serves_web) == ("worker", True, False)
    assert settings.job_store_url == "postgresql+psycopg://u:p@db:5432/agent"  # the driver we ship
    assert settings.coordination_url == "postgresql://u:p@db:5432/agent" and settings.shared_job_store
    with pytest.raises(ConfigError, match="--role web needs a shared PostgreSQL job store: set JOB_STORE_URL"):
        Settings.from_env({"ROLE": "web"}, dotenv=None)
    with pytest.raises(ConfigError, match=r"ROLE \(or --role\) must be one of all, web, worker"):
        Settings.from_env({"ROLE": "both"}, dotenv=None)
    with pytest.raises(ConfigError, match="psycopg 3 driver"):
        Settings.from_env({"JOB_STORE_URL": "postgresql+psycopg2://db/agent"}, dotenv=None)
    with pytest.raises(ConfigError, match="WORK_SWEEP_SECONDS must be more than 0"):
        Settings.from_env({"WORK_SWEEP_SECONDS": "0"}, dotenv=None)


def test_a_split_role_without_postgresql_is_refused_at_start(tmp_path: Path) -> None:
    bot = BotProcess(tmp_path, args=["--role", "worker"])
    with pytest.raises(BotStartError, match="exited with code 2") as failure:
        bot.start()
    assert "configuration error: --role worker needs a shared PostgreSQL job store" in str(failure.value)
