"""The proactive sender's HTTP path (bot/connector_api.py, bot/sender.py): the JSON botbuilder sent,
the URLs, the Authorization header, one keep-alive session, the errors as DeliveryError."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from botbuilder.core import BotAdapter, TurnContext
from botbuilder.core.conversation_reference_extension import get_continuation_activity
from botbuilder.schema import Activity, ConversationReference, Entity, ResourceResponse
from botframework.connector import models
from botframework.connector.auth import MicrosoftAppCredentials
from msrest import Serializer

from bot.auth import OutboundTokenError
from bot.connector_api import USER_AGENT, activities_url, outgoing
from bot.edge import create_adapter
from bot.sender import ProactiveSender
from bot.service_urls import ServiceUrlPolicy
from runtime.config import Settings
from runtime.protocol import DeliveryError

UUID1 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-1[0-9a-f]{3}-[0-9a-f]{4}-[0-9a-f]{12}$")
TEAMS: dict[str, Any] = {
    "activityId": "in-1", "user": {"id": "29:user", "name": "Ada", "aadObjectId": "aad-1", "role": "user"},
    "bot": {"id": "28:bot", "name": "Bot"}, "channelId": "msteams", "locale": "en-US",
    "conversation": {"id": "a:1;messageid=1@thread.tacv2", "conversationType": "personal", "tenantId": "t-1",
                     "isGroup": False},
    "serviceUrl": "https://smba.trafficmanager.net/amer/"}
EMULATOR = {"user": {"id": "u"}, "bot": {"id": "b"}, "conversation": {"id": "c2"}, "channelId": "emulator",
            "serviceUrl": "http://127.0.0.1:9"}
DIRECT_LINE = {**EMULATOR, "channelId": "directline"}
ACTIVITIES: list[dict[str, Any]] = [
    {"type": "message", "text": "hi"},
    {"text": "no type, no input hint"},
    {"type": "typing"},
    {"type": "typing", "text": "Thinking", "entities": [{"type": "streaminfo", "streamType": "informative",
                                                         "streamSequence": 1}]},
    {"type": "message", "text": "x", "locale": "fr-FR", "replyToId": "r9", "id": "own", "inputHint": "expectingInput",
     "entities": [{"type": "streaminfo", "streamId": "s1", "streamType": "final", "nested": {"a": [1, None]},
                   "empty": None},
                  {"type": "https://schema.org/Message", "@type": "Message", "@context": "https://schema.org",
                   "additionalType": ["AIGeneratedContent"],
                   "citation": [{"@type": "Claim", "position": 1, "appearance": {"name": "n", "abstract": "a"}}]}],
     "channelData": {"feedbackLoopEnabled": True, "n": None},
     "attachments": [{"contentType": "application/vnd.microsoft.card.adaptive",
                      "content": {"type": "AdaptiveCard", "body": [], "x": None}, "unknown": 1}],
     "suggestedActions": {"actions": [{"type": "imBack", "title": "t", "value": "v", "extra": 2}]},
     "summary": None, "unknownField": 5, "textFormat": "markdown", "from": {"id": "someone else"},
     "conversation": {"id": "elsewhere"}, "serviceUrl": "https://evil.example/", "channelId": "other"},
]


class _Entity(Entity):
    """What the sender used before: an entity with all its fields."""

    _attribute_map = {**Entity._attribute_map, "additional_properties": {"key": "", "type": "{object}"}}  # noqa: RUF012


class Capture(BotAdapter):
    """botbuilder's own turn: what it hands to the connector client."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Activity] = []

    async def send_activities(self, context: TurnContext, activities: list[Activity]) -> list[ResourceResponse]:
        self.sent.extend(activities)
        return [ResourceResponse(id="x") for _ in activities]

    async def update_activity(self, context: TurnContext, activity: Activity) -> None:
        self.sent.append(activity)

    async def delete_activity(self, context: TurnContext, reference: ConversationReference) -> None:
        raise NotImplementedError


async def botbuilder_json(reference: dict[str, Any], activity: dict[str, Any], update_id: str | None) -> Any:
    """The body msrest serialised for the old path (bot/sender.py before issue 17's transport)."""
    outgoing_activity = Activity().deserialize(copy.deepcopy(activity))
    if isinstance(activity.get("entities"), list):
        outgoing_activity.entities = [_Entity().deserialize(e) for e in activity["entities"]]
    adapter = Capture()
    context = TurnContext(adapter, get_continuation_activity(ConversationReference().deserialize(reference)))
    if update_id is not None:
        outgoing_activity.id = update_id
        outgoing_activity.conversation = context.activity.conversation
        await context.update_activity(outgoing_activity)
    else:
        await context.send_activity(outgoing_activity)
    [sent] = adapter.sent
    serializer = Serializer({k: v for k, v in models.__dict__.items() if isinstance(v, type)})
    return json.loads(json.dumps(serializer.body(sent, "Activity")))


@pytest.mark.parametrize("update_id", [None, "act:1/2"])
@pytest.mark.parametrize("reference", [TEAMS, EMULATOR, DIRECT_LINE], ids=["teams", "emulator", "directline"])
@pytest.mark.parametrize("activity", ACTIVITIES, ids=range(len(ACTIVITIES)))
async def test_the_json_is_what_botbuilder_sent(reference: dict[str, Any], activity: dict[str, Any],
                                                update_id: str | None) -> None:
    expected = await botbuilder_json(reference, activity, update_id)
    ours = outgoing(reference, copy.deepcopy(activity), update_id=update_id)
    if reference["channelId"] == "directline":
        assert ours.get("replyToId") == expected.get("replyToId")  # the activity's own, if any
    else:  # both the id of a fresh continuation activity
        assert UUID1.match(ours.pop("replyToId")) and UUID1.match(expected.pop("replyToId"))
    assert ours == expected


def test_urls_are_quoted_as_msrest_quotes_them() -> None:
    assert activities_url("https://smba.trafficmanager.net/amer/", "a:1;messageid=1@thread/x?y#z %") == \
        "https://smba.trafficmanager.net/amer/v3/conversations/a%3A1%3Bmessageid%3D1%40thread%2Fx%3Fy%23z%20%25/activities"
    assert activities_url("http://127.0.0.1:9", "c", "act:1/2") == "http://127.0.0.1:9/v3/conversations/c/activities/act%3A1%2F2"


# ------------------------------------------------------------------------------------ over HTTP

class Connector:
    """A connector on this loop that records method, raw path, headers, body and the client's port."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.answer: tuple[int, dict[str, Any] | None, dict[str, str]] = (200, None, {})
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({"method": request.method, "path": request.raw_path, "headers": dict(request.headers),
                          "body": json.loads(body), "peer": request.transport.get_extra_info("peername") if
                          request.transport else None})
        status, error, headers = self.answer
        if status != 200:
            return web.json_response(error, status=status, headers=headers)
        return web.json_response({"id": f"sent-{len(self.seen)}"})


@pytest.fixture
async def connector() -> AsyncIterator[Connector]:
    fake = Connector()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
    yield fake
    await runner.cleanup()


def local_sender(**options: Any) -> ProactiveSender:
    adapter = create_adapter(Settings.from_env({}, dotenv=None))  # local mode: no app id
    return ProactiveSender(adapter, "", service_urls=ServiceUrlPolicy(["loopback"]), per_conversation_per_second=0,
                           base_delay=0.01, **options)


class FakeCredentialFactory:
    def __init__(self, credentials: MicrosoftAppCredentials) -> None:
        self.credentials = credentials

    async def create_credentials(self, *args: object) -> MicrosoftAppCredentials:
        return self.credentials


class AppAdapter:
    """An adapter whose connector factory hands out ``credentials`` (as botbuilder's _ConnectorFactoryImpl)."""

    def __init__(self, credentials: MicrosoftAppCredentials) -> None:
        factory = type("Factory", (), {"_credential_factory": FakeCredentialFactory(credentials), "_app_id": "app",
                                       "_to_channel_from_bot_oauth_scope": "scope", "_login_endpoint": "login",
                                       "_validate_authority": True})()
        self.bot_framework_authentication = type("Auth", (), {"create_connector_factory": lambda _, claims: factory})()

    def create_claims_identity(self, app_id: str) -> object:
        return object()


async def test_sends_go_to_the_reply_url_over_one_session(connector: Connector) -> None:
    sender = local_sender()
    reference = {**TEAMS, "serviceUrl": connector.url}
    try:
        assert await sender.send(reference, {"type": "message", "text": "one"}) == "sent-1"
        assert await sender.send({**DIRECT_LINE, "serviceUrl": connector.url}, {"text": "two", "replyToId": "r9"}) \
            == "sent-2"
        assert await sender.send({**DIRECT_LINE, "serviceUrl": connector.url}, {"text": "three"}) == "sent-3"
        await sender.typing(reference)
        await sender.update(reference, "act:1", {"type": "message", "text": "four"})
    finally:
        await sender.close()
    first, second, third, typing, update = connector.seen
    reply_to = first["body"]["replyToId"]
    assert first["method"] == "POST" and first["path"] == f"/v3/conversations/a%3A1%3Bmessageid%3D1%40thread.tacv2" \
        f"/activities/{reply_to}" and first["headers"]["x-ms-conversation-id"] == TEAMS["conversation"]["id"]
    assert second["path"] == "/v3/conversations/c2/activities/r9"
    assert third["path"] == "/v3/conversations/c2/activities" and "x-ms-conversation-id" not in third["headers"]
    assert typing["body"]["type"] == "typing"
    assert update["method"] == "PUT" and update["path"].endswith("/activities/act%3A1")
    assert update["body"]["id"] == "act:1"
    for seen in connector.seen:
        assert "Authorization" not in seen["headers"]  # local mode, as botbuilder: no app id, no token
        assert seen["headers"]["User-Agent"] == USER_AGENT
        assert seen["headers"]["Content-Type"] == "application/json; charset=utf-8"
    assert len({seen["peer"] for seen in connector.seen}) == 1, "a new connection per send: no keep-alive"


async def test_the_bots_token_arrives_as_a_bearer_header(connector: Connector, monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = MicrosoftAppCredentials("app", "secret")
    monkeypatch.setattr(credentials, "get_access_token", lambda force_refresh=False: "the-token")
    sender = ProactiveSender(AppAdapter(credentials), "app",  # type: ignore[arg-type]
                             service_urls=ServiceUrlPolicy(["loopback"]), per_conversation_per_second=0)
    try:
        await sender.send({**EMULATOR, "serviceUrl": connector.url}, {"text": "hi"})
    finally:
        await sender.close()
    assert connector.seen[0]["headers"]["Authorization"] == "Bearer the-token"


async def test_no_token_is_a_transient_error_before_any_connection(connector: Connector,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    credentials = MicrosoftAppCredentials("app", "secret")

    def refused(force_refresh: bool = False) -> str:
        raise OutboundTokenError("no token for the Bot Connector: invalid_client")

    monkeypatch.setattr(credentials, "get_access_token", refused)
    sender = ProactiveSender(AppAdapter(credentials), "app", attempts=1,  # type: ignore[arg-type]
                             service_urls=ServiceUrlPolicy(["loopback"]), per_conversation_per_second=0)
    with pytest.raises(DeliveryError) as caught:
        await sender.send({**EMULATOR, "serviceUrl": connector.url}, {"text": "hi"})
    await sender.close()
    assert not caught.value.permanent and "invalid_client" in str(caught.value)
    assert connector.seen == []


@pytest.mark.parametrize(("status", "permanent"), [(403, True), (404, True), (429, False), (500, False), (409, False)])
async def test_statuses_become_delivery_errors(connector: Connector, status: int, permanent: bool) -> None:
    connector.answer = (status, {"error": {"code": "ContentStreamNotAllowed", "message": "not here"}},
                        {"Retry-After": "2"})
    sender = local_sender(attempts=1)
    with pytest.raises(DeliveryError) as caught:
        await sender.send({**EMULATOR, "serviceUrl": connector.url}, {"text": "hi"})
    await sender.close()
    assert caught.value.permanent is permanent and caught.value.retry_after == 2.0
    assert str(caught.value) == f"connector answered {status}: (ContentStreamNotAllowed) not here"


async def test_a_closed_sender_keeps_the_message_for_later(connector: Connector) -> None:
    sender = local_sender(attempts=1)
    await sender.send({**EMULATOR, "serviceUrl": connector.url}, {"text": "hi"})
    await sender.close()
    with pytest.raises(DeliveryError) as caught:
        await sender.send({**EMULATOR, "serviceUrl": connector.url}, {"text": "after"})
    assert not caught.value.permanent and len(connector.seen) == 1


async def test_an_untrusted_reference_never_opens_the_session() -> None:
    sender = local_sender()
    with pytest.raises(DeliveryError):
        await sender.send({**EMULATOR, "serviceUrl": "https://evil.example/"}, {"text": "hi"})
    assert sender._connector._session is None
