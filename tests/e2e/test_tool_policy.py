"""The tool policy end to end (finding 6): the real app, hostile requests on loopback.

ENABLED_TOOLS / DISABLED_TOOLS / TOOL_POLICY_FILE decide which tools a requester may use; a
refused tool is not offered, a call of it (by phrase, by ``run``, or by a model that names it
anyway) starts nothing and the user is told. The offline model's ``run <tool> {json}`` works in
local mode only. MCP tools: tests/e2e/test_mcp.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import fake_openai as fm
from harness.activities import message, new_conversation_id
from harness.botproc import BotProcess, BotStartError, HttpEndpoint
from harness.connector import RecordingConnector
from harness.fake_openai import FakeOpenAI
from harness.openid import OpenIdServer
from tests.e2e.conftest import Launch, StoreProbe

pytestmark = pytest.mark.e2e

ADA = {"id": "29:ada", "name": "Ada", "aadObjectId": "aad-ada"}
BOB = {"id": "29:bob", "name": "Bob", "aadObjectId": "aad-bob"}


@pytest.fixture
def backend() -> str:
    """The policy does not depend on the store: SQLite only."""
    return "sqlite"


def say_as(bot: HttpEndpoint, conn: RecordingConnector, conv: str, text: str, user: dict[str, str],
           headers: dict[str, str] | None = None, **kwargs: Any) -> dict[str, Any]:
    activity = message(text, conversation_id=conv, service_url=conn.url, user_id=user["id"], user_name=user["name"],
                       **kwargs)
    activity["from"]["aadObjectId"] = user["aadObjectId"]
    status, body = bot.post_activity(activity, headers=headers)
    assert status == 201, body
    return activity


def refused_calls(bot: HttpEndpoint) -> dict[str, float]:
    status, body = bot.get("/metrics")
    assert status == 200
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^teams_agent_tool_calls_refused_total\{reason="(\w+)"\} (\S+)$', body, re.M)}


def test_a_disabled_tool_is_refused_however_it_is_asked_for(launch: Launch, conn: RecordingConnector,
                                                            stored: StoreProbe) -> None:
    bot = launch({"DISABLED_TOOLS": "activate_new_line"})
    conv = new_conversation_id()
    say_as(bot, conn, conv, "activate line 555-0100", ADA)
    say_as(bot, conn, conv, 'run activate_new_line {"phone_number": "555-0100"}', ADA)
    say_as(bot, conn, conv, "status", ADA)  # other tools still work
    texts = conn.wait_for_texts(3, conv, timeout=15)
    assert texts[:2] == ["The `activate_new_line` tool is not available to you right now."] * 2, texts
    assert "no background jobs" in texts[2], texts
    assert stored.jobs(f"emulator:{conv}") == []


def test_a_policy_file_limits_a_tool_to_one_user(launch: Launch, conn: RecordingConnector, stored: StoreProbe,
                                                 tmp_path: Path) -> None:
    policy = tmp_path / "tool-policy.json"
    policy.write_text(json.dumps({"tools": {"activate_new_line": {"users": ["AAD-ADA"]}}}))
    bot = launch({"TOOL_POLICY_FILE": str(policy), "ACTIVATE_LINE_SECONDS": "30"})
    conv = new_conversation_id()
    key = f"emulator:{conv}"
    say_as(bot, conn, conv, "activate line 555-0100", BOB)
    assert conn.wait_for_texts(1, conv, timeout=15) == ["The `activate_new_line` tool is not available to you "
                                                        "right now."]
    say_as(bot, conn, conv, 'run activate_new_line {"phone_number": "555-0199"}', BOB)
    assert "not available to you" in conn.wait_for_texts(2, conv, timeout=15)[1]
    assert stored.jobs(key) == []
    say_as(bot, conn, conv, "activate line 555-0100", ADA)
    assert "I've started activating line 555-0100" in conn.wait_for_texts(3, conv, timeout=15)[2]
    [job] = stored.jobs(key)
    assert job["started_by"]["aadObjectId"] == "aad-ada" and job["arguments"] == {"phone_number": "555-0100"}


def test_a_model_that_calls_a_tool_it_was_not_offered_starts_nothing(launch: Launch, conn: RecordingConnector,
                                                                      stored: StoreProbe, fake: FakeOpenAI) -> None:
    blank = {name: "" for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_DEPLOYMENT", "AGENT_SYSTEM_PROMPT",
                                   "AGENT_SYSTEM_PROMPT_FILE")}
    bot = launch({**blank, "OPENAI_API_KEY": "sk-e2e", "OPENAI_BASE_URL": fake.openai_base_url,
                  "OPENAI_MODEL": "e2e-model", "NO_PROXY": "127.0.0.1,localhost", "OPENAI_MAX_RETRIES": "0",
                  "DISABLED_TOOLS": "activate_*"})
    fake.enqueue(fm.tool_calls(fm.tool_call("activate_new_line", {"phone_number": "555-0100"}, "call_forged")))
    conv = new_conversation_id()
    say_as(bot, conn, conv, "please activate 555-0100", ADA)
    conn.wait_for_texts(1, conv, timeout=15)
    first, second = fake.requests()
    assert "activate_new_line" not in first.tool_names and "list_jobs" in first.tool_names
    [result] = second.tool_results
    assert result["tool_call_id"] == "call_forged" and "not found" in str(result["content"]), result
    assert stored.jobs(f"emulator:{conv}") == []


def test_a_bad_policy_file_stops_the_bot_at_start_up(tmp_path: Path) -> None:
    policy = tmp_path / "tool-policy.json"
    policy.write_text(json.dumps({"tools": {"activate_new_line": {"users": "aad-ada"}}}))
    bot = BotProcess(tmp_path, env={"TOOL_POLICY_FILE": str(policy)})
    with pytest.raises(BotStartError):
        bot.start(timeout=20)
    assert bot.returncode == 2
    assert "configuration error: TOOL_POLICY_FILE" in bot.log_tail() and "must be a list" in bot.log_tail()
    assert "Traceback" not in bot.log_tail()


# ----------------------------------------------------------------- outside local mode: no `run`

APP_ID = "00000000-0000-0000-0000-00000000b07a"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIdServer]:
    with OpenIdServer(tmp_path_factory.mktemp("idp"), app_id=APP_ID, app_password="test-secret-not-real") as server:
        yield server


def test_the_run_phrase_is_refused_in_authenticated_mode(launch: Launch, idp: OpenIdServer, conn: RecordingConnector,
                                                         stored: StoreProbe) -> None:
    bot = launch(idp.bot_env())
    conv = new_conversation_id()
    auth = {"Authorization": idp.channel_token(conn.url)}
    say_as(bot, conn, conv, 'run activate_new_line {"phone_number": "555-0100"}', ADA, channel_id="msteams",
           headers=auth)
    say_as(bot, conn, conv, "run list_jobs", ADA, channel_id="msteams", headers=auth)
    texts = conn.wait_for_texts(2, conv, timeout=15)
    assert all(t.startswith("You are not allowed to use `run ") and "only in local mode" in t for t in texts), texts
    assert stored.jobs(f"msteams:{conv}") == []
    assert refused_calls(bot).get("run_phrase") == 2
