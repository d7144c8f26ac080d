"""Open relay / SSRF through ``serviceUrl`` (issue 13, finding 2), against the real app process.

The "attacker" is a second RecordingConnector on loopback that the configuration makes untrusted
(another port of 127.0.0.1 in local mode, 127.0.0.2 in authenticated mode): an activity naming
it is refused before anything is stored or sent, the conversation's stored reference keeps
pointing at the real connector, and neither a reply nor the bot's bearer token ever reaches it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.activities import conversation_update, message, new_conversation_id
from harness.botproc import BotProcess, BotStartError, log_text, wait_for_log
from harness.connector import RecordingConnector
from harness.openid import OpenIdServer
from storage.abc import ConversationStore, InboxEvent
from tests.e2e.conftest import Deployment, Launch, StoreProbe
from tests.e2e.test_auth import stored_rows
from tests.e2e.test_conversation import say

pytestmark = pytest.mark.e2e

APP_ID = "00000000-0000-0000-0000-0000000055f0"
APP_PASSWORD = "test-secret-not-real"
REFUSED = {"error": "untrusted serviceUrl",
           "details": ["this bot does not send to the serviceUrl the activity names; its operator can allow it "
                       "with TRUSTED_SERVICE_URLS"]}


@pytest.fixture
def attacker() -> Iterator[RecordingConnector]:
    """A listener standing in for an attacker's URL: another port of 127.0.0.1."""
    with RecordingConnector() as listener:
        yield listener


@pytest.fixture
def attacker_elsewhere() -> Iterator[RecordingConnector]:
    """A listener on another loopback address (127.0.0.2), outside ``http://127.0.0.1:*``."""
    with RecordingConnector(host="127.0.0.2") as listener:
        yield listener


def only(conn: RecordingConnector) -> str:
    """TRUSTED_SERVICE_URLS naming exactly this connector."""
    return f"http://127.0.0.1:{conn.port}"




def refusal_lines(bot: Deployment) -> list[str]:
    return [line for line in log_text(bot).splitlines() if "untrusted serviceUrl" in line]


def stored_service_url(stored: StoreProbe, key: str) -> Any:
    async def read(store: ConversationStore) -> Any:
        reference = await store.get_reference(key)
        return reference and reference.get("serviceUrl")

    return stored.run(read)


# ------------------------------------------------------------------------------------------ local mode


def test_local_mode_refuses_another_service_url_and_the_conversation_stays_with_its_connector(
        launch: Launch, conn: RecordingConnector, attacker: RecordingConnector, conv: str,
        stored: StoreProbe) -> None:
    bot = launch({"ACTIVATE_LINE_SECONDS": "2", "TRUSTED_SERVICE_URLS": only(conn)})
    say(bot, conn, conv, "my name is Grace")
    say(bot, conn, conv, "activate line 555-0100")
    conn.wait_for(lambda c: any("started activating" in t for t in c.texts(conv)), timeout=15)

    # The attacker posts into the same conversation, naming its own URL: a message, a join, a card invoke.
    hijack = message("ATTACKER-TEXT what is my name?", conversation_id=conv, service_url=attacker.url)
    join = conversation_update(members_added=["user-9"], conversation_id=conv, service_url=attacker.url)
    invoke = {**message("", conversation_id=conv, service_url=attacker.url), "type": "invoke",
              "name": "adaptiveCard/action", "value": {"action": {"type": "Action.Execute", "verb": "cancel"}}}
    for activity in (hijack, join, invoke):
        status, body = bot.post_activity(activity)
        assert status == 403, body
        assert json.loads(body) == REFUSED

    # The job's result and later replies still go to the real connector, never to the attacker.
    conn.wait_for(lambda c: any("is active" in t for t in c.texts(conv)), timeout=20)
    say(bot, conn, conv, "what is my name?")
    conn.wait_for(lambda c: "Your name is Grace." in c.texts(conv), timeout=15)
    time.sleep(0.5)
    assert attacker.requests() == [], "the bot sent something to the untrusted serviceUrl"
    assert stored_service_url(stored, f"emulator:{conv}") == conn.url
    texts = json.dumps(stored.agent_messages(f"emulator:{conv}"))
    assert "ATTACKER-TEXT" not in texts, "the refused message reached the agent"

    lines = refusal_lines(bot)
    assert len(lines) == 3 and all("WARNING" in line and "TRUSTED_SERVICE_URLS" in line for line in lines)
    assert attacker.url in lines[0] and "403" in lines[0]


def test_a_stored_reference_naming_an_untrusted_url_is_never_sent_to(
        launch: Launch, conn: RecordingConnector, attacker: RecordingConnector, conv: str,
        stored: StoreProbe) -> None:
    """A reference written before the upgrade, or by whoever can write the store, with a pending message."""
    key = f"emulator:{conv}"
    reference = {"serviceUrl": attacker.url, "channelId": "emulator", "conversation": {"id": conv},
                 "bot": {"id": "bot-1", "name": "Bot"}, "user": {"id": "user-1", "name": "Ada"}}

    async def plant(store: ConversationStore) -> None:
        await store.save_reference(key, reference)
        await store.append_event(key, InboxEvent(id="planted-1", kind="message", payload={"text": "hello"}))

    stored.run(plant)
    bot = launch({"TRUSTED_SERVICE_URLS": only(conn)})
    wait_for_log(bot, "not sending to the conversation's stored reference")
    wait_for_log(bot, "dropping message")
    time.sleep(0.5)
    assert attacker.requests() == [], "the bot connected to the untrusted serviceUrl of a stored reference"

    # The next message from the real channel replaces the reference; the conversation goes on.
    say(bot, conn, conv, "hello again")
    assert "offline model" in conn.wait_for_texts(1, conv, timeout=15)[0]
    assert stored_service_url(stored, key) == conn.url
    assert attacker.requests() == []


# --------------------------------------------------------------------------------- authenticated mode


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIdServer]:
    with OpenIdServer(tmp_path_factory.mktemp("idp"), app_id=APP_ID, app_password=APP_PASSWORD) as server:
        yield server


@pytest.fixture
def auth_bot(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[list[BotProcess]]:
    """Authenticated bots started by the test; killed after it (their log printed if it failed)."""
    started: list[BotProcess] = []
    yield started
    report = getattr(request.node, "rep_call", None)
    for bot in started:
        if report is not None and report.failed:
            print(bot.log_tail(100))
        bot.kill()


def post_with_token(bot: BotProcess, idp: OpenIdServer, activity: dict[str, Any]) -> tuple[int, str]:
    """Posts with a *valid* channel token whose serviceurl claim names the activity's serviceUrl."""
    return bot.post_activity(activity, headers={"Authorization": idp.channel_token(str(activity["serviceUrl"]))})


def test_authenticated_mode_by_default_sends_only_to_microsofts_https_hosts(
        tmp_path: Path, idp: OpenIdServer, attacker_elsewhere: RecordingConnector,
        auth_bot: list[BotProcess]) -> None:
    env = {k: v for k, v in idp.bot_env().items() if k != "TRUSTED_SERVICE_URLS"}
    bot = BotProcess(tmp_path / "default", env=env).start()
    auth_bot.append(bot)
    conv = new_conversation_id("hijack")
    activity = message("hello", conversation_id=conv, service_url=attacker_elsewhere.url, channel_id="msteams")
    status, body = post_with_token(bot, idp, activity)
    assert status == 403, body
    assert json.loads(body) == REFUSED
    time.sleep(0.5)
    assert attacker_elsewhere.requests() == [], "the bot (and its token) went to an http loopback serviceUrl"
    assert stored_rows(bot.data_dir) == 0
    [line] = refusal_lines(bot)
    assert "WARNING" in line and "matches no trusted pattern" in line and "'microsoft'" in line


def test_authenticated_mode_with_an_override_refuses_what_it_does_not_list(
        tmp_path: Path, idp: OpenIdServer, conn: RecordingConnector, attacker_elsewhere: RecordingConnector,
        auth_bot: list[BotProcess]) -> None:
    bot = BotProcess(tmp_path / "override", env={**idp.bot_env(), "TRUSTED_SERVICE_URLS": only(conn)}).start()
    auth_bot.append(bot)
    conv = new_conversation_id()
    status, body = post_with_token(bot, idp, message("my name is Grace", conversation_id=conv,
                                                     service_url=conn.url, channel_id="msteams"))
    assert status == 201, body
    conn.wait_for_texts(1, conv, timeout=15)

    hijack = message("what is my name?", conversation_id=conv, service_url=attacker_elsewhere.url,
                     channel_id="msteams")
    status, body = post_with_token(bot, idp, hijack)
    assert status == 403, body

    status, body = post_with_token(bot, idp, message("what is my name?", conversation_id=conv,
                                                     service_url=conn.url, channel_id="msteams"))
    assert status == 201, body
    assert conn.wait_for_texts(2, conv, timeout=15)[1] == "Your name is Grace."
    assert all(r.headers.get("Authorization", "").startswith("Bearer ") for r in conn.delivered(conv))
    time.sleep(0.5)
    assert attacker_elsewhere.requests() == [], "a reply or the bot's token reached the untrusted serviceUrl"


def test_a_bad_trusted_service_urls_pattern_stops_the_start_with_a_clear_message(tmp_path: Path) -> None:
    bot = BotProcess(tmp_path, env={"TRUSTED_SERVICE_URLS": "https://*"})
    with pytest.raises(BotStartError):
        bot.start(timeout=15)
    assert "configuration error: TRUSTED_SERVICE_URLS" in bot.log_tail()


def test_a_service_url_python_cannot_even_parse_is_a_400_not_a_500(bot: Deployment, conv: str) -> None:
    for url in ("http://[x]/", "https://[smba.trafficmanager.net]/"):
        status, body = bot.post_activity(message("hello", conversation_id=conv, service_url=url))
        assert status == 400, body
        assert "serviceUrl" in body
