"""MCP tools end to end: real MCP servers (PyPI mcp-server-time over stdio, npm
@modelcontextprotocol/server-everything over streamable HTTP), the real app process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.activities import message
from harness.botproc import BotProcess, free_port, http_request
from harness.connector import RecordingConnector
from tests.e2e.conftest import Launch, StoreProbe
from tests.e2e.test_conversation import say

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EVERYTHING = REPO / "node_modules/@modelcontextprotocol/server-everything/dist/index.js"
TIME_SERVER = Path(sys.executable).parent / "mcp-server-time"
CRASHY = REPO / "harness/crashy_mcp.py"


@pytest.fixture(params=["sqlite"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def everything_http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """server-everything over streamable HTTP on a free loopback port."""
    if shutil.which("node") is None or not EVERYTHING.is_file():
        pytest.skip("node or npm @modelcontextprotocol/server-everything is missing (run make setup)")
    port = free_port()
    log = (tmp_path_factory.mktemp("everything") / "server.log").open("wb")
    process = subprocess.Popen(["node", str(EVERYTHING), "streamableHttp"], env={**os.environ, "PORT": str(port)},
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/mcp"
    deadline = time.monotonic() + 20
    while True:
        try:
            http_request(url, timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and process.poll() is None, "server-everything did not start"
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(10)
    log.close()


def write_config(tmp_path: Path, servers: dict[str, object]) -> dict[str, str]:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"servers": servers}))
    return {"MCP_CONFIG": str(path)}


@pytest.fixture
def bot_env(tmp_path: Path, everything_http: str) -> dict[str, str]:
    if not TIME_SERVER.exists():
        pytest.skip("mcp-server-time is not installed in the venv (run make setup)")
    return {"ACTIVATE_LINE_SECONDS": "2", **write_config(tmp_path, {
        "time": {"command": str(TIME_SERVER)},
        "everything": {"url": everything_http, "long_running_tools": {"trigger-long-running-operation": {}}},
        "crashy": {"command": sys.executable, "args": [str(CRASHY)]},
        "missing": {"command": str(tmp_path / "no-such-server")},
    })}


def test_a_stdio_mcp_tool_answers_in_the_turn(bot: BotProcess, conn: RecordingConnector, conv: str) -> None:
    say(bot, conn, conv, "time in Europe/Paris")
    [answer] = conn.wait_for_texts(1, conv, timeout=15)
    assert answer.startswith("It is ") and answer.endswith(" in Europe/Paris."), answer


def test_a_server_that_fails_to_start_is_logged_and_skipped(bot: BotProcess, conn: RecordingConnector,
                                                             conv: str) -> None:
    assert "MCP server 'missing' failed to start and is skipped" in bot.log_tail(400)
    say(bot, conn, conv, 'run echo {"message": "over streamable HTTP"}')
    assert conn.wait_for_texts(1, conv, timeout=15) == ["Echo: over streamable HTTP"]


def test_a_long_running_mcp_tool_runs_as_a_durable_job_with_progress(bot: BotProcess, conn: RecordingConnector,
                                                                    conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, 'run trigger-long-running-operation {"duration": 4, "steps": 4}')
    [ack] = conn.wait_for_texts(1, conv, timeout=15)
    assert "background job" in ack
    key = f"emulator:{conv}"
    seen: set[float] = set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        [job] = stored.jobs(key)
        if job["progress"] is not None:
            seen.add(job["progress"])
        if job["status"] == "succeeded":
            break
        time.sleep(0.3)
    assert job["status"] == "succeeded" and job["tool"] == "trigger-long-running-operation"
    assert {0.25, 0.5, 0.75} & seen, f"no intermediate progress seen: {seen}"
    conn.wait_for(lambda c: "Long running operation completed. Duration: 4 seconds, Steps: 4." in c.texts(conv),
                  timeout=10)


def test_an_mcp_server_crashing_mid_call_gets_a_clear_answer_and_restarts(bot: BotProcess, conn: RecordingConnector,
                                                                       conv: str, stored: StoreProbe) -> None:
    say(bot, conn, conv, "my name is Ada")
    conn.wait_for_texts(1, conv)
    say(bot, conn, conv, "run crash")
    reply = conn.wait_for_texts(2, conv, timeout=15)[1]
    assert reply.startswith("Sorry, `crash` failed") and "stopped during the call" in reply, reply
    say(bot, conn, conv, "run ping")
    assert conn.wait_for_texts(3, conv, timeout=15)[2] == "pong"
    say(bot, conn, conv, "what is my name?")
    assert conn.wait_for_texts(4, conv, timeout=15)[3] == "Your name is Ada."
    assert any(m.get("source") == "user" and m.get("content") == "run crash"
               for m in stored.agent_messages(f"emulator:{conv}"))


def test_the_tool_policy_covers_mcp_tools(launch: Launch, bot_env: dict[str, str], conn: RecordingConnector,
                                          conv: str, stored: StoreProbe, tmp_path: Path) -> None:
    """Disabled MCP tools (plain and long-running) and one restricted to a user: refused, nothing runs."""
    policy = tmp_path / "tool-policy.json"
    policy.write_text(json.dumps({"tools": {"get_current_*": {"users": ["aad-ada"]}}}))
    bot = launch({**bot_env, "DISABLED_TOOLS": "echo, trigger-*", "TOOL_POLICY_FILE": str(policy)})

    def say_as(text: str, aad_object_id: str) -> None:
        activity = message(text, conversation_id=conv, service_url=conn.url)
        activity["from"]["aadObjectId"] = aad_object_id
        assert bot.post_activity(activity)[0] == 201

    for n, (text, who) in enumerate([('run echo {"message": "hi"}', "aad-bob"),
                                     ('run trigger-long-running-operation {"duration": 1, "steps": 1}', "aad-ada"),
                                     ("time in Europe/Paris", "aad-bob"),
                                     ("run ping", "aad-bob"),
                                     ("time in Europe/Paris", "aad-ada")], start=1):
        say_as(text, who)
        conn.wait_for_texts(n, conv, timeout=15)
    refused_echo, refused_job, refused_time, pong, time_for_ada = conn.texts(conv)
    assert refused_echo == "The `echo` tool is not available to you right now."
    assert refused_job == "The `trigger-long-running-operation` tool is not available to you right now."
    assert refused_time == "The `get_current_time` tool is not available to you right now."
    assert pong == "pong"  # tools the policy does not name still work
    assert time_for_ada.startswith("It is ") and time_for_ada.endswith(" in Europe/Paris."), time_for_ada
    assert stored.jobs(f"emulator:{conv}") == []
