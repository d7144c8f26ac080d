"""Self-tests for the end-to-end test support code (no app needed)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import aiohttp
import pytest

from harness import activities
from harness.botproc import BotProcess, BotStartError, free_port, http_request
from harness.connector import RecordingConnector

TEAMS_CONV = "19:abc@thread.skype;messageid=1"


@pytest.fixture
def connector() -> Iterator[RecordingConnector]:
    with RecordingConnector() as conn:
        yield conn


def _activities_url(
    connector: RecordingConnector, conversation_id: str, activity_id: str | None = None
) -> str:
    url = (
        f"{connector.url}v3/conversations/{quote(conversation_id, safe='')}/activities"
    )
    return f"{url}/{quote(activity_id, safe='')}" if activity_id else url


def _post(url: str, payload: dict[str, object]) -> tuple[int, str]:
    return http_request(
        url,
        method="POST",
        body=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
    )


@pytest.mark.asyncio
async def test_records_send_via_aiohttp_with_encoded_teams_id(
    connector: RecordingConnector,
) -> None:
    url = _activities_url(connector, TEAMS_CONV)
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json={"type": "message", "text": "hello"}) as resp,
    ):
        assert resp.status == 200
        new_id = (await resp.json())["id"]

    [req] = connector.requests()
    assert (req.method, req.conversation_id, req.activity_id) == (
        "POST",
        TEAMS_CONV,
        None,
    )
    assert req.response_id == new_id
    assert connector.texts(TEAMS_CONV) == ["hello"]
    assert await connector.awaiting_messages(1, TEAMS_CONV, timeout=1) == [
        {"type": "message", "text": "hello"}
    ]


def test_records_reply_via_urllib(connector: RecordingConnector) -> None:
    status, _ = _post(
        _activities_url(connector, TEAMS_CONV, "act:1"), {"type": "typing"}
    )
    assert status == 200
    status, _ = _post(
        _activities_url(connector, TEAMS_CONV, "act:1"),
        {"type": "message", "text": "hi"},
    )
    assert status == 200

    assert [r.activity_id for r in connector.requests()] == ["act:1", "act:1"]
    assert connector.activities(type="typing", conversation_id=TEAMS_CONV) == [
        {"type": "typing"}
    ]
    assert connector.texts() == ["hi"]
    assert connector.texts("other") == []


def test_update_delete_members_and_unknown_routes(
    connector: RecordingConnector,
) -> None:
    url = _activities_url(connector, TEAMS_CONV, "a1")
    req = urllib.request.Request(
        url,
        data=b'{"type":"message","text":"edited"}',
        method="PUT",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req) as resp:
        assert json.loads(resp.read()) == {"id": "a1"}
    assert http_request(url, method="DELETE")[0] == 200
    members_url = (
        f"{connector.url}v3/conversations/{quote(TEAMS_CONV, safe='')}/members"
    )
    status, body = http_request(members_url)
    assert status == 200 and len(json.loads(body)) == 1
    assert http_request(f"{connector.url}nope")[0] == 404

    assert connector.texts() == []  # texts() are new messages; the edit is an update
    [update] = connector.updates()
    assert update.activity is not None and update.activity["text"] == "edited"
    assert [r.method for r in connector.requests()] == ["PUT", "DELETE", "GET", "GET"]
    connector.clear()
    assert connector.requests() == [] and connector.messages() == []


def test_fail_next_fails_exactly_one_request(connector: RecordingConnector) -> None:
    connector.fail_next(1, 429, {"Retry-After": "1"})
    url = _activities_url(connector, "conv-1")
    req = urllib.request.Request(
        url,
        data=b'{"type":"message","text":"a"}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req)
    assert info.value.code == 429 and info.value.headers["Retry-After"] == "1"
    info.value.close()

    assert _post(url, {"type": "message", "text": "b"})[0] == 200
    assert [f.activity for f in connector.failed] == [{"type": "message", "text": "a"}]
    assert connector.failed[0].status == 429
    assert connector.texts() == ["b"]


def test_set_delay_slows_responses(connector: RecordingConnector) -> None:
    connector.set_delay(0.2)
    started = time.monotonic()
    assert (
        _post(_activities_url(connector, "c"), {"type": "message", "text": "x"})[0]
        == 200
    )
    assert time.monotonic() - started >= 0.2


def test_wait_for_messages_times_out_with_texts(connector: RecordingConnector) -> None:
    _post(_activities_url(connector, "c"), {"type": "message", "text": "only one"})
    started = time.monotonic()
    with pytest.raises(AssertionError, match="only one"):
        connector.wait_for_messages(2, timeout=0.2)
    assert time.monotonic() - started < 2
    assert connector.wait_for_messages(1, "c", timeout=0.2)[0]["text"] == "only one"


@pytest.mark.asyncio
async def test_botbuilder_connector_client_round_trip(
    connector: RecordingConnector,
) -> None:
    """The real ConnectorClient (what the bot uses) must hit our routes."""
    from botbuilder.schema import Activity
    from botframework.connector.aio import ConnectorClient
    from botframework.connector.auth import MicrosoftAppCredentials

    incoming = Activity().deserialize(
        activities.teams_channel_mention(
            "hi", conversation_id=TEAMS_CONV, service_url=connector.url
        )
    )
    async with ConnectorClient(
        MicrosoftAppCredentials("", ""), base_url=connector.url
    ) as client:
        reply = Activity(
            type="message", text="pong", conversation=incoming.conversation
        )
        sent = await client.conversations.reply_to_activity(
            TEAMS_CONV, incoming.id, reply
        )
        edit = Activity(type="message", text="pong!")
        await client.conversations.update_activity(TEAMS_CONV, sent.id, edit)

    assert incoming.entities[0].type == "mention" and incoming.conversation.is_group
    posted, updated = connector.delivered(TEAMS_CONV)
    assert (
        posted.activity_id == incoming.id
        and updated.activity_id == sent.id == posted.response_id
    )
    assert connector.texts(TEAMS_CONV) == ["pong"]
    assert [u.activity["text"] for u in connector.updates(TEAMS_CONV) if u.activity] == ["pong!"]


def test_activity_builders() -> None:
    conv = activities.new_conversation_id()
    assert conv != activities.new_conversation_id()
    msg = activities.message(
        "hi", conversation_id=conv, service_url="http://x/", reply_to_id="r"
    )
    assert msg["conversation"] == {"id": conv, "conversationType": "personal"}
    assert msg["timestamp"].endswith("Z") and msg["replyToId"] == "r"
    update = activities.conversation_update(
        members_added=["bot-1", "user-1"], conversation_id=conv, service_url="http://x/"
    )
    assert update["membersAdded"] == [{"id": "bot-1"}, {"id": "user-1"}]
    assert free_port() > 0


FAKE_APP = """
import json, os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self._reply(200 if self.path == "/healthz" else 404, b"ok")

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            json.loads(body)
        except ValueError:
            return self._reply(400, b"bad json")
        self._reply(201, os.environ["DATA_DIR"].encode())

    def _reply(self, status, body):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

print("fake bot up", os.environ["EXTRA"], flush=True)
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
"""


def test_bot_process_lifecycle_with_fake_app(tmp_path: Path) -> None:
    """BotProcess against a stand-in script, so it is checked without the real app."""
    script = tmp_path / "fake_app.py"
    script.write_text(FAKE_APP)
    data_dir = tmp_path / "data"
    with BotProcess(data_dir, env={"EXTRA": "x1"}, script=str(script)) as bot:
        first_pid = bot.pid
        assert bot.alive and bot.get("/healthz") == (200, "ok")
        assert bot.post_activity({"type": "message"}) == (201, str(data_dir))
        assert bot.post_activity({}, raw_body=b"{nope")[0] == 400
        bot.restart(timeout=10)
        assert bot.alive and bot.pid != first_pid
        assert bot.terminate() is not None and not bot.alive
    assert [p.name for p in bot.log_files] == ["bot-1.log", "bot-2.log"]
    assert bot.log_tail().count("fake bot up x1") == 2


def test_bot_process_start_failure_shows_log(tmp_path: Path) -> None:
    script = tmp_path / "crash.py"
    script.write_text("print('boom before listening'); raise SystemExit(3)\n")
    bot = BotProcess(tmp_path, script=str(script))
    with pytest.raises(BotStartError, match="boom before listening"):
        bot.start(timeout=10)
    assert not bot.alive and bot.returncode == 3
