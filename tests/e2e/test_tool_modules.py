"""Tools declared in a module TOOL_MODULES names, end to end: the example module examples/weather.py.

Its plain tool answers in the turn; its long-running tool runs as a durable job and is announced;
both are reached with their offline phrases (and with ``run <tool> {json}``, local mode), and their
examples show on the welcome card and in ``help``. A module that cannot be loaded stops the start-up
with one configuration error line (exit 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.activities import conversation_update
from harness.botproc import REPO_ROOT, BotProcess
from harness.connector import RecordingConnector
from tests.e2e.conftest import StoreProbe
from tests.e2e.test_conversation import say
from tests.e2e.test_jobs import job_id_in

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def bot_env() -> dict[str, str]:
    return {"TOOL_MODULES": "jobs.activate_line, examples.weather", "WEATHER_REPORT_SECONDS": "2"}


def test_a_declared_plain_tool_answers_in_the_turn(bot: BotProcess, conn: RecordingConnector, conv: str,
                                                   stored: StoreProbe) -> None:
    say(bot, conn, conv, "weather in Paris")
    [answer] = conn.wait_for_texts(1, conv, timeout=15)
    assert answer.startswith("The weather in Paris today: ") and answer.endswith(" °C."), answer
    say(bot, conn, conv, 'run get_weather {"city": "Paris"}')
    assert conn.wait_for_texts(2, conv, timeout=15)[1] == answer  # the same tool, called by name
    assert stored.jobs(f"emulator:{conv}") == []  # it ran in the turn: no job


def test_a_declared_long_running_tool_runs_as_a_job_and_is_announced(bot: BotProcess, conn: RecordingConnector,
                                                                     conv: str, stored: StoreProbe) -> None:
    started = time.monotonic()
    say(bot, conn, conv, "weather report for Oslo for 2 days")
    [ack] = conn.wait_for_texts(1, conv, timeout=10)
    assert time.monotonic() - started < 5.0 and "background job" in ack, ack
    job_id = job_id_in(ack)
    [_, done] = conn.wait_for_texts(2, conv, timeout=20)
    assert time.monotonic() - started >= 2.0  # WEATHER_REPORT_SECONDS
    assert done.startswith("🌦️ Weather report for Oslo: day 1: ") and "; day 2: " in done, done
    [job] = stored.jobs(f"emulator:{conv}")
    assert (job["id"], job["tool"], job["status"], job["arguments"]) == (
        job_id, "weather_report", "succeeded", {"city": "Oslo", "days": 2})
    say(bot, conn, conv, "weather report for Atlantis")  # a permanent failure: not retried, reported
    [*_, failed] = conn.wait_for_texts(4, conv, timeout=20)
    assert "failed" in failed and "no weather station in Atlantis" in failed, failed
    say(bot, conn, conv, "activate line 555-0100")
    assert "555-0100" in conn.wait_for_texts(5, conv, timeout=10)[4]  # the demo, loaded beside it


def test_the_declared_examples_are_offered_on_the_welcome_card_and_in_help(bot: BotProcess, conn: RecordingConnector,
                                                                          conv: str) -> None:
    bot.post_activity(conversation_update(members_added=["user-1", "bot-1"], conversation_id=conv,
                                          service_url=conn.url))
    [welcome] = conn.wait_for_messages(1, conv)
    card = json.dumps(welcome["attachments"][0]["content"])
    for example in ("activate line 555-0100", "weather in Paris", "weather report for Oslo"):
        assert example in card
    say(bot, conn, conv, "help")
    [text] = conn.wait_for_texts(1, conv, timeout=10)
    assert "weather in Paris" in text and "weather report for Oslo" in text and "activate line 555-0100" in text


@pytest.mark.parametrize(("modules", "message"), [
    ("examples.no_such_module", "TOOL_MODULES: examples.no_such_module: no such module"),
    ("jobs.runner", "TOOL_MODULES: jobs.runner: declares no tools"),
])
def test_a_tool_module_that_cannot_be_loaded_stops_the_start_up(tmp_path: Path, modules: str, message: str) -> None:
    env = {**os.environ, "TOOL_MODULES": modules, "DATA_DIR": str(tmp_path), "PORT": "0"}
    done = subprocess.run([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 2, done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("configuration error: ")]
    assert line.startswith(f"configuration error: {message}"), done.stderr
    assert "Traceback" not in done.stderr
