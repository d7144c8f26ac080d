"""The HTTP edge: ``POST /api/messages`` through botbuilder's CloudAdapter, with clear 4xx answers.

botbuilder as shipped turns a non-JSON body, a bad token or a store outage into a 500. Here,
in authenticated mode, a missing or malformed ``Authorization`` header is 401 before the body is
read; the body is then read within bounds (bot/request_body.py: 413 too large, 408 too slow, 400
not JSON or nested too deeply) and checked (400/415 with a message saying what is wrong, ids with
control characters included), then the token (bot/auth.py: 401 for every kind of bad or missing
token, 503 when the signing keys cannot be fetched), and an unavailable store is 503 with
Retry-After so the channel redelivers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from botbuilder.core import Bot, TurnContext
from botbuilder.integration.aiohttp import (
    CloudAdapter,
    ConfigurationBotFrameworkAuthentication,
    ConfigurationServiceClientCredentialFactory,
)
from botbuilder.schema import Activity
from botframework.connector.auth import AuthenticateRequestResult

from bot.auth import (
    AuthRejected,
    AuthUnavailable,
    CachingCredentialFactory,
    RequestAuthenticator,
    endpoint_settings,
    preparing_ingest,
)
from bot.connector_clients import ConnectorClients
from bot.request_body import BodyRejected, read_json_body
from bot.service_urls import ServiceUrlPolicy, is_http_url
from runtime import metrics, tracing
from runtime.config import Settings
from runtime.logs import CONTROL_CHARACTERS
from storage.abc import StoreError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # Teams caps a message at about 28 KB; this leaves room for cards


@dataclass(frozen=True)
class AdapterConfig:
    """The attribute names ConfigurationBotFrameworkAuthentication reads (None: not configured)."""

    APP_ID: str
    APP_PASSWORD: str
    APP_TYPE: str
    APP_TENANTID: str
    TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL: str | None = None
    TO_BOT_FROM_CHANNEL_TOKEN_ISSUER: str | None = None
    TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL: str | None = None
    TO_CHANNEL_FROM_BOT_LOGIN_URL: str | None = None
    TO_CHANNEL_FROM_BOT_OAUTH_SCOPE: str | None = None
    OAUTH_URL: str | None = None
    CALLER_ID: str | None = None
    VALIDATE_AUTHORITY: bool = True


class EdgeAdapter(CloudAdapter):
    """botbuilder's CloudAdapter plus the authenticator the messages endpoint runs before it, and
    connector clients reused across requests (bot/connector_clients.py)."""

    def __init__(self, auth: ConfigurationBotFrameworkAuthentication, *, auth_disabled: bool,
                 allow_emulator_tokens: bool = False) -> None:
        super().__init__(auth)
        self.authenticator = RequestAuthenticator(auth, auth_disabled=auth_disabled,
                                                  allow_emulator_tokens=allow_emulator_tokens)
        self._connector_clients = ConnectorClients()

    async def process_activity(self, auth_header_or_authenticate_request_result: str | AuthenticateRequestResult,
                               activity: Activity, logic: Callable[[TurnContext], Awaitable[Any]]) -> Any:
        """``CloudAdapterBase.process_activity`` for an authenticated request, with a reused connector client
        and no user token client (this bot has no sign-in)."""
        result = auth_header_or_authenticate_request_result
        if not isinstance(result, AuthenticateRequestResult) or result.connector_factory is None:
            return await super().process_activity(result, activity, logic)
        activity.caller_id = result.caller_id
        client = await self._connector_clients.get(result.connector_factory, activity.service_url, result.audience)
        context = self._create_turn_context(activity, result.claims_identity, result.audience, client, None, logic,
                                            result.connector_factory)
        await self.run_pipeline(context, logic)
        return self._process_turn_results(context)


def _speed_up_msrest_retry_policy() -> None:
    """msrest builds every connector client's retry list by testing 999 codes against a 501-item
    *list*: about 2.9 ms per client, six clients per turn, 46% of the loop's busy time in the
    benchmarks (bench/profiling.md). The same codes as a frozenset give the same list, at once."""
    from msrest.universal_http.requests import ClientRetryPolicy

    ClientRetryPolicy.safe_codes = frozenset(ClientRetryPolicy.safe_codes)  # type: ignore[assignment]


def create_adapter(settings: Settings) -> EdgeAdapter:
    _speed_up_msrest_retry_policy()
    endpoints = endpoint_settings(dict(settings.bot_framework_endpoints))
    config = AdapterConfig(settings.app_id, settings.app_password, settings.app_type, settings.app_tenant_id,
                           VALIDATE_AUTHORITY=settings.validate_authority, **endpoints)
    if endpoints:
        log.info("Bot Framework endpoints overridden: %s",
                 ", ".join(f"{name}={value}" for name, value in dict(settings.bot_framework_endpoints).items()))
    credentials = CachingCredentialFactory(ConfigurationServiceClientCredentialFactory(config))
    adapter = EdgeAdapter(ConfigurationBotFrameworkAuthentication(config, credentials_factory=credentials),
                          auth_disabled=settings.local_mode, allow_emulator_tokens=settings.allow_emulator_tokens)

    async def on_turn_error(turn_context: TurnContext, error: Exception) -> None:
        # Store outages propagate so the edge can answer 503 and the channel redelivers.
        if isinstance(error, StoreError | sqlite3.Error | OSError):
            raise error
        log.exception("unhandled error in a turn of %s", turn_context.activity.conversation.id, exc_info=error)
        try:
            await turn_context.send_activity("Sorry, something went wrong on my side. Please try again.")
        except Exception:
            log.warning("could not tell the user about the error")

    adapter.on_turn_error = on_turn_error
    return adapter


def validate_activity(body: Any) -> list[str]:
    """What is wrong with a posted activity, in words; empty when it can be processed."""
    if not isinstance(body, dict):
        return [f"the body must be a JSON object (an activity), not {type(body).__name__}"]
    try:  # JSON allows "\ud800" escapes that are no text at all; they could never be stored or sent
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return ["the activity contains invalid Unicode (an unpaired surrogate escape such as \\ud800)"]
    problems = []
    kind = body.get("type")
    if not isinstance(kind, str) or not kind:
        problems.append("'type' is required and must be a non-empty string (e.g. \"message\")")
    conversation = body.get("conversation")
    if not isinstance(conversation, dict) or not isinstance(conversation.get("id"), str) or not conversation["id"]:
        problems.append("'conversation.id' is required and must be a non-empty string")
    service_url = body.get("serviceUrl")
    if not is_http_url(service_url):
        problems.append("'serviceUrl' is required and must be an http(s) URL")
    channel = body.get("channelId")
    if not isinstance(channel, str) or not channel:
        problems.append("'channelId' is required and must be a non-empty string (e.g. \"msteams\")")
    for name in ("id", "text"):
        if name in body and body[name] is not None and not isinstance(body[name], str):
            problems.append(f"'{name}' must be a string")
    for name in ("from", "recipient"):
        if name in body and body[name] is not None and not isinstance(body[name], dict):
            problems.append(f"'{name}' must be an object")
    if "membersAdded" in body and not isinstance(body["membersAdded"], list | type(None)):
        problems.append("'membersAdded' must be a list")
    if "entities" in body and not isinstance(body["entities"], list | type(None)):
        problems.append("'entities' must be a list")
    # Ids end up in store keys, log lines and the URLs and headers of every send: a newline in one
    # forges log lines and makes each later send fail.
    for name, value in _ids(body):
        if isinstance(value, str) and CONTROL_CHARACTERS.search(value):
            problems.append(f"'{name}' must not contain control characters (newlines, escapes)")
    return problems


def _ids(body: dict[str, Any]) -> list[tuple[str, Any]]:
    found = [(name, body.get(name)) for name in ("id", "channelId", "replyToId", "serviceUrl")]
    for parent, fields in (("conversation", ("id", "tenantId")), ("from", ("id", "aadObjectId")),
                           ("recipient", ("id",))):
        if isinstance(body.get(parent), dict):
            found.extend((f"{parent}.{name}", body[parent].get(name)) for name in fields)
    return found


def problem(status: int, title: str, detail: list[str] | str | None = None, **headers: str) -> web.Response:
    payload: dict[str, Any] = {"error": title}
    if detail:
        payload["details"] = detail if isinstance(detail, list) else [detail]
    return web.json_response(payload, status=status, headers=headers or None)


def messages_handler(adapter: CloudAdapter, bot: Bot, *, service_urls: ServiceUrlPolicy | None = None,
                     body_read_timeout: float = 10.0, max_json_depth: int = 64) -> Any:
    # An adapter not made by create_adapter gets a strict authenticator (tokens always required).
    authenticator = adapter.authenticator if isinstance(adapter, EdgeAdapter) else \
        RequestAuthenticator(adapter.bot_framework_authentication, auth_disabled=False)
    # Not given: the mode's default (Microsoft's hosts over https; loopback in local mode).
    if service_urls is None:
        service_urls = ServiceUrlPolicy(["loopback" if authenticator.auth_disabled else "microsoft"])

    async def handle(request: web.Request) -> web.Response:
        try:
            authenticator.check_header(request.headers.get("Authorization"), request.remote)
        except AuthRejected:  # before the body is read: the connection is not reused
            refused = problem(401, "unauthorized", "a valid Bot Framework token is required",
                              **{"WWW-Authenticate": "Bearer"})
            refused.force_close()
            return refused
        if request.content_type != "application/json":
            return problem(415, "unsupported media type", "send the activity as application/json")
        try:
            body = await read_json_body(request, max_bytes=MAX_BODY_BYTES, timeout=body_read_timeout,
                                        max_depth=max_json_depth)
        except BodyRejected as exc:
            rejected = problem(exc.status, exc.title, exc.detail)
            if exc.status != 400:  # the body was not read to its end
                rejected.force_close()
            return rejected
        if problems := validate_activity(body):
            conversation = body.get("conversation") if isinstance(body, dict) else None
            # Logged as sent (clipped): the log formatter escapes control characters.
            log.info("400 for an activity in conversation %s: %s",
                     str(conversation.get("id") if isinstance(conversation, dict) else None)[:200],
                     "; ".join(problems))
            return problem(400, "not a valid activity", problems)
        try:
            activity = Activity().deserialize(body)
        except Exception as exc:
            return problem(400, "not a valid activity", str(exc)[:300])
        tracing.annotate(**{"activity.type": activity.type or "", "activity.channel_id": activity.channel_id or ""})
        try:
            authenticated = await authenticator.authenticate(activity, request.headers.get("Authorization"))
        except AuthRejected:  # logged with the reason by the authenticator
            return problem(401, "unauthorized", "a valid Bot Framework token is required",
                           **{"WWW-Authenticate": "Bearer"})
        except AuthUnavailable:
            return problem(503, "temporarily unavailable", "cannot validate tokens right now; please retry",
                           **{"Retry-After": "5"})
        # Before botbuilder answers anything to activity.serviceUrl (bot/service_urls.py).
        if not service_urls.check(activity.service_url, where="edge",
                                  consequence="refused the activity (403); nothing stored or sent"):
            return problem(403, "untrusted serviceUrl", "this bot does not send to the serviceUrl the activity "
                           "names; its operator can allow it with TRUSTED_SERVICE_URLS")
        try:
            with preparing_ingest() as turn_started:  # ingest does not wait for an outbound token

                async def logic(turn_context: TurnContext) -> None:
                    turn_started()
                    await bot.on_turn(turn_context)

                invoke_response = await adapter.process_activity(authenticated, activity, logic)
        except (StoreError, sqlite3.Error, OSError) as exc:
            log.error("store unavailable while ingesting an activity; asking the channel to retry: %s", exc)
            return problem(503, "temporarily unavailable", "please retry", **{"Retry-After": "2"})
        if invoke_response is not None:
            return web.json_response(invoke_response.body, status=invoke_response.status)
        return web.Response(status=201 if activity.type == "message" else 200)

    async def traced(request: web.Request) -> web.Response:
        with tracing.tracer.start_as_current_span("ingest activity", kind=tracing.SERVER) as span:
            response = await handle(request)
            span.set_attribute("http.response.status_code", response.status)
            if 400 <= response.status < 500:
                metrics.ACTIVITIES_REJECTED.labels(str(response.status)).inc()
            return response

    return traced
