"""bot/auth.py in-process: settings, tenant policy, botbuilder's built-in (production) token path,
and that neither token validation nor the bot's outbound token blocks the event loop."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from botbuilder.core import ActivityHandler, TurnContext
from botbuilder.schema import Activity
from botframework.connector.auth import ChannelValidation, MicrosoftAppCredentials

from bot.auth import (
    PUBLIC_CLOUD_ENDPOINTS,
    REFUSAL_TEXT,
    AuthRejected,
    AuthUnavailable,
    CachingCredentialFactory,
    RequestAuthenticator,
    TenantPolicy,
    activity_tenants,
    endpoint_settings,
    rejection_reason,
)
from bot.edge import create_adapter, messages_handler
from harness.activities import message
from harness.openid import OpenIdServer
from runtime.config import ConfigError, Settings

APP_ID = "app-0001"
PASSWORD = "secret-0001"
SERVICE_URL = "https://smba.trafficmanager.net/emea/"


# ------------------------------------------------------------------------------------- settings


def test_settings_read_the_auth_options() -> None:
    settings = Settings.from_env({
        "ALLOWED_TENANTS": " Tenant-A ,tenant-b,, ",
        "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": "https://login.example.us/v1/.well-known/openidconfiguration",
        "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER": "https://api.botframework.us",
        "VALIDATE_AUTHORITY": "false",
    }, dotenv=None)
    assert settings.allowed_tenants == frozenset({"tenant-a", "tenant-b"})
    assert dict(settings.bot_framework_endpoints) == {
        "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": "https://login.example.us/v1/.well-known/openidconfiguration",
        "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER": "https://api.botframework.us",
    }
    assert settings.validate_authority is False
    defaults = Settings.from_env({}, dotenv=None)
    assert (defaults.allowed_tenants, defaults.bot_framework_endpoints, defaults.validate_authority) == \
        (frozenset(), (), True)


@pytest.mark.parametrize(("name", "value"), [
    ("TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL", "http://login.botframework.com/v1/.well-known/openidconfiguration"),
    ("TO_CHANNEL_FROM_BOT_LOGIN_URL", "login.microsoftonline.com/botframework.com"),
    ("VALIDATE_AUTHORITY", "maybe"),
])
def test_a_bad_auth_setting_is_a_config_error_naming_it(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value}, dotenv=None)


def test_endpoint_overrides_are_completed_with_public_cloud_values() -> None:
    assert endpoint_settings({}) == {}
    assert endpoint_settings({"TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": ""}) == {}
    completed = endpoint_settings({"TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": "https://x/meta"})
    assert completed == {**PUBLIC_CLOUD_ENDPOINTS, "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL": "https://x/meta"}
    assert completed["TO_BOT_FROM_CHANNEL_TOKEN_ISSUER"] == "https://api.botframework.com"
    assert completed["CALLER_ID"] == "urn:botframework:azure"


def test_rejection_reasons_never_repeat_claim_values() -> None:
    reason = rejection_reason(PermissionError("Unauthorized. Invalid AppId passed on token: ", "evil-app"))
    assert "another app id" in reason and "evil-app" not in reason
    reason = rejection_reason(PermissionError("Invalid AppId passed on token: evil-app"))
    assert "evil-app" not in reason
    reason = rejection_reason(PermissionError("Unknown Emulator Token version 'attacker text'."))
    assert "attacker text" not in reason and "Unknown Emulator Token version" in reason
    assert "'ver' claim" in rejection_reason(PermissionError("'ver' claim is required on Emulator Tokens."))
    assert "not a well-formed JWT" in rejection_reason(jwt.DecodeError("Not enough segments"))


# ------------------------------------------------------------------------------------- tenants


def activity(**fields: Any) -> Activity:
    body = {"type": "message", "conversation": {"id": "c"}, "serviceUrl": SERVICE_URL, "channelId": "msteams",
            **fields}
    return Activity().deserialize(body)


def test_tenant_ids_come_from_channel_data_and_the_conversation() -> None:
    assert activity_tenants(activity(channelData={"tenant": {"id": "T1"}})) == {"t1"}
    assert activity_tenants(activity(conversation={"id": "c", "tenantId": "T2"})) == {"t2"}  # as Teams sends it
    assert activity_tenants(activity(conversation={"id": "c", "tenantID": "T3"})) == {"t3"}  # botbuilder's name
    assert activity_tenants(activity()) == set()


def test_tenant_policy() -> None:
    everyone = TenantPolicy()
    assert not everyone.enabled and everyone.allows(activity())
    policy = TenantPolicy(["T1", " t2 "])
    assert policy.allows(activity(channelData={"tenant": {"id": "t1"}}))
    assert policy.allows(activity(channelData={"tenant": {"id": "T2"}}, conversation={"id": "c", "tenantId": "T1"}))
    assert not policy.allows(activity(channelData={"tenant": {"id": "t9"}}))
    assert not policy.allows(activity(channelData={"tenant": {"id": "t1"}}, conversation={"id": "c", "tenantId": "t9"}))
    assert not policy.allows(activity()), "an activity naming no tenant must be refused when a list is set"


# ------------------------------------------------------------------------------------- the built-in path


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenIdServer]:
    with OpenIdServer(tmp_path_factory.mktemp("idp"), app_id=APP_ID, app_password=PASSWORD) as server:
        yield server


@pytest.fixture
def trust_idp(idp: OpenIdServer, monkeypatch: pytest.MonkeyPatch) -> OpenIdServer:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(idp.ca_file))
    return idp


class RecordingBot(ActivityHandler):
    def __init__(self) -> None:
        self.turns: list[Activity] = []

    async def on_turn(self, turn_context: TurnContext) -> None:
        self.turns.append(turn_context.activity)


@pytest.fixture
async def edge_client() -> AsyncIterator[Callable[[Settings], Awaitable[tuple[TestClient[Any, Any], RecordingBot]]]]:
    clients: list[TestClient[Any, Any]] = []

    async def make(settings: Settings) -> tuple[TestClient[Any, Any], RecordingBot]:
        bot = RecordingBot()
        app = web.Application()
        app.router.add_post("/api/messages", messages_handler(create_adapter(settings), bot))
        client = TestClient(TestServer(app))
        await client.start_server()
        clients.append(client)
        return client, bot

    yield make
    for client in clients:
        await client.close()


BUILT_IN_CASES: list[tuple[str, Callable[[OpenIdServer], str | None], int]] = [
    ("missing", lambda idp: None, 401),
    ("garbage", lambda idp: "Bearer abc.def", 401),
    ("expired", lambda idp: idp.channel_token(SERVICE_URL, starts_in=-7200, lifetime=3600), 401),
    ("not yet valid", lambda idp: idp.channel_token(SERVICE_URL, starts_in=3600), 401),
    ("another key", lambda idp: idp.channel_token(SERVICE_URL, key=idp.rogue_key), 401),
    ("unknown kid", lambda idp: idp.channel_token(SERVICE_URL, key=idp.rogue_key, kid="gone"), 401),
    ("wrong audience", lambda idp: idp.channel_token(SERVICE_URL, aud="other"), 401),
    ("wrong issuer", lambda idp: idp.channel_token(SERVICE_URL, iss="https://evil.example"), 401),
    ("serviceUrl mismatch", lambda idp: idp.channel_token("https://evil.example/"), 401),
    ("valid", lambda idp: idp.channel_token(SERVICE_URL), 201),
]


@pytest.mark.parametrize(("case", "header", "expected"), BUILT_IN_CASES, ids=[c[0] for c in BUILT_IN_CASES])
async def test_production_token_path_answers_401_for_every_bad_token(
        trust_idp: OpenIdServer, monkeypatch: pytest.MonkeyPatch, edge_client: Any, case: str,
        header: Callable[[OpenIdServer], str | None], expected: int) -> None:
    """No endpoint overrides: botbuilder's built-in public-cloud validation (what production runs),
    with only its channel metadata URL pointed at the local server."""
    monkeypatch.setattr(ChannelValidation, "open_id_metadata_endpoint", trust_idp.channel_metadata_url)

    async def no_outbound_token(self: CachingCredentialFactory, state: object) -> None:
        """The public-cloud login URL is login.microsoftonline.com: never called from tests."""

    monkeypatch.setattr(CachingCredentialFactory, "_prefetch", no_outbound_token)
    settings = Settings.from_env({"MicrosoftAppId": APP_ID, "MicrosoftAppPassword": PASSWORD}, dotenv=None)
    assert settings.bot_framework_endpoints == ()
    client, bot = await edge_client(settings)
    value = header(trust_idp)
    response = await client.post(
        "/api/messages", data=json.dumps(message("hi", conversation_id="c1", service_url=SERVICE_URL,
                                                 channel_id="msteams")),
        headers={"Content-Type": "application/json", **({"Authorization": value} if value else {})})
    assert response.status == expected, await response.text()
    assert len(bot.turns) == (1 if expected == 201 else 0)
    if expected == 401:
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert (await response.json())["error"] == "unauthorized"


# ------------------------------------------------------------------------------------- the event loop


class LoopWatch:
    """Measures the longest time the event loop did not get to run a 10 ms ticker."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            self.worst = max(self.worst, now - last - 0.01)
            last = now

    async def __aenter__(self) -> LoopWatch:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


@pytest.fixture
def slow_idp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenIdServer]:
    """A fresh server (so botbuilder's process-wide metadata cache has never seen its URL)."""
    with OpenIdServer(tmp_path / "slow-idp", app_id=APP_ID, app_password=PASSWORD) as server:
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(server.ca_file))
        yield server


def authenticator_for(idp: OpenIdServer, *, timeout: float = 20.0) -> RequestAuthenticator:
    env = {k: v for k, v in idp.bot_env().items() if k != "REQUESTS_CA_BUNDLE"}
    adapter = create_adapter(Settings.from_env(env, dotenv=None))
    return RequestAuthenticator(adapter.bot_framework_authentication, auth_disabled=False, timeout=timeout)


async def test_fetching_signing_keys_does_not_block_the_loop(slow_idp: OpenIdServer) -> None:
    slow_idp.set_delays(metadata=0.8)
    authenticator = authenticator_for(slow_idp)
    async with LoopWatch() as watch:
        result = await authenticator.authenticate(activity(serviceUrl=SERVICE_URL),
                                                  slow_idp.channel_token(SERVICE_URL))
    assert result.claims_identity.is_authenticated
    assert slow_idp.metadata_hits == 1
    assert watch.worst < 0.2, f"the event loop stalled for {watch.worst:.2f} s while fetching keys"


async def test_a_hanging_key_server_is_503_not_a_hang(slow_idp: OpenIdServer) -> None:
    slow_idp.set_delays(metadata=3.0)
    authenticator = authenticator_for(slow_idp, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(AuthUnavailable):
        await authenticator.authenticate(activity(serviceUrl=SERVICE_URL), slow_idp.channel_token(SERVICE_URL))
    assert time.monotonic() - started < 2.0


async def test_local_mode_accepts_no_token_and_refuses_any(idp: OpenIdServer) -> None:
    adapter = create_adapter(Settings.from_env({}, dotenv=None))
    authenticator = adapter.authenticator
    assert authenticator.auth_disabled
    result = await authenticator.authenticate(activity(), None)
    assert result.claims_identity.is_authenticated  # botbuilder's anonymous identity
    for header in ("Bearer garbage", idp.channel_token(SERVICE_URL)):
        with pytest.raises(AuthRejected, match="local mode"):
            await authenticator.authenticate(activity(), header)


async def test_the_outbound_token_is_fetched_off_the_loop_once(slow_idp: OpenIdServer) -> None:
    slow_idp.set_delays(token=0.8)
    env = {k: v for k, v in slow_idp.bot_env().items() if k != "REQUESTS_CA_BUNDLE"}
    adapter = create_adapter(Settings.from_env(env, dotenv=None))
    connector_factory = adapter.bot_framework_authentication.create_connector_factory(
        adapter.create_claims_identity(APP_ID))
    async with LoopWatch() as watch:
        first = await connector_factory.create(SERVICE_URL, "https://api.botframework.com")
        second = await connector_factory.create(SERVICE_URL, "https://api.botframework.com")
        credentials = first.config.credentials
        assert credentials is second.config.credentials, "credentials (and MSAL's token cache) are not reused"
        # What msrest does, synchronously, before every connector call: must be an MSAL cache hit now.
        started = time.monotonic()
        session = credentials.signed_session(requests.Session())
        assert time.monotonic() - started < 0.1
    assert watch.worst < 0.2, f"the event loop stalled for {watch.worst:.2f} s while getting a token"
    [grant] = slow_idp.token_requests()
    assert session.headers["Authorization"] == f"Bearer {grant.access_token}"
    assert isinstance(credentials, MicrosoftAppCredentials)


async def test_refusal_text_is_the_documented_one() -> None:
    assert REFUSAL_TEXT == "This bot is not available for your organization."
