"""The HTTP edge: ``POST /api/messages`` through botbuilder's CloudAdapter, with clear 4xx answers.

botbuilder as shipped turns a non-JSON body, a bad token or a store outage into a 500. Here
the body is checked first (400/413/415 with a message saying what is wrong), auth failures
are 401, and an unavailable store is 503 with Retry-After so the channel redelivers.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from aiohttp import web
from botbuilder.core import Bot, TurnContext
from botbuilder.integration.aiohttp import CloudAdapter, ConfigurationBotFrameworkAuthentication
from botbuilder.schema import Activity

from config import Settings
from storage.abc import StoreError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # Teams caps a message at about 28 KB; this leaves room for cards


@dataclass(frozen=True)
class AdapterConfig:
    """The attribute names ConfigurationBotFrameworkAuthentication reads."""

    APP_ID: str
    APP_PASSWORD: str
    APP_TYPE: str
    APP_TENANTID: str


def create_adapter(settings: Settings) -> CloudAdapter:
    config = AdapterConfig(settings.app_id, settings.app_password, settings.app_type, settings.app_tenant_id)
    adapter = CloudAdapter(ConfigurationBotFrameworkAuthentication(config))

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
    problems = []
    kind = body.get("type")
    if not isinstance(kind, str) or not kind:
        problems.append("'type' is required and must be a non-empty string (e.g. \"message\")")
    conversation = body.get("conversation")
    if not isinstance(conversation, dict) or not isinstance(conversation.get("id"), str) or not conversation["id"]:
        problems.append("'conversation.id' is required and must be a non-empty string")
    service_url = body.get("serviceUrl")
    if not isinstance(service_url, str) or urlparse(service_url).scheme not in ("http", "https") \
            or not urlparse(service_url).netloc:
        problems.append("'serviceUrl' is required and must be an http(s) URL")
    for name in ("id", "text", "channelId"):
        if name in body and body[name] is not None and not isinstance(body[name], str):
            problems.append(f"'{name}' must be a string")
    for name in ("from", "recipient"):
        if name in body and body[name] is not None and not isinstance(body[name], dict):
            problems.append(f"'{name}' must be an object")
    if "membersAdded" in body and not isinstance(body["membersAdded"], list | type(None)):
        problems.append("'membersAdded' must be a list")
    if "entities" in body and not isinstance(body["entities"], list | type(None)):
        problems.append("'entities' must be a list")
    return problems


def problem(status: int, title: str, detail: list[str] | str | None = None, **headers: str) -> web.Response:
    payload: dict[str, Any] = {"error": title}
    if detail:
        payload["details"] = detail if isinstance(detail, list) else [detail]
    return web.json_response(payload, status=status, headers=headers or None)


def messages_handler(adapter: CloudAdapter, bot: Bot) -> Any:
    async def handle(request: web.Request) -> web.Response:
        if request.content_type != "application/json":
            return problem(415, "unsupported media type", "send the activity as application/json")
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            return problem(413, "activity too large", f"the limit is {MAX_BODY_BYTES} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return problem(413, "activity too large", f"the limit is {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            return problem(400, "the body is not valid JSON")
        if problems := validate_activity(body):
            return problem(400, "not a valid activity", problems)
        try:
            activity = Activity().deserialize(body)
        except Exception as exc:
            return problem(400, "not a valid activity", str(exc)[:300])
        auth_header = request.headers.get("Authorization", "")
        try:
            invoke_response = await adapter.process_activity(auth_header, activity, bot.on_turn)
        except PermissionError as exc:
            log.info("rejected an activity with a missing or invalid token: %s", exc)
            return problem(401, "unauthorized", "a valid Bot Framework token is required")
        except (StoreError, sqlite3.Error, OSError) as exc:
            log.error("store unavailable while ingesting an activity; asking the channel to retry: %s", exc)
            return problem(503, "temporarily unavailable", "please retry", **{"Retry-After": "2"})
        if invoke_response is not None:
            return web.json_response(invoke_response.body, status=invoke_response.status)
        return web.Response(status=201 if activity.type == "message" else 200)

    return handle
