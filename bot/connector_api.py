"""The Bot Connector REST API (v3) for proactive sends, over one long-lived aiohttp session.

What botbuilder's path did per send (``continue_conversation`` → ``TurnContext.send_activity`` →
msrest ``ConversationsOperations`` → ``requests`` in a worker thread) cost 2.5-4 ms of CPU a turn
(issue 17): model (de)serialisation, the turn context, a thread hop. This module makes the same
HTTP request from plain JSON. :func:`outgoing` is the activity botbuilder put on the wire:

- only the fields of botbuilder's schema (msrest drops the others), no nulls; entities whole
  (streaminfo, the AI label, citations: issue 15);
- ``from`` the reference's bot, ``recipient`` its user, ``conversation``, ``channelId`` and
  ``serviceUrl`` from it, no ``locale`` (the continuation activity has none), and ``replyToId`` the
  continuation activity's id, a fresh uuid1, except on Direct Line and Web Chat
  (``TurnContext.get_conversation_reference``); so a send goes to the reply URL;
- a send has no ``id``, ``type`` "message" and ``inputHint`` "acceptingInput" unless set; an update
  has the id of the message it replaces.

``tests/bot/test_connector_api.py`` checks that against botbuilder's own functions.
"""

from __future__ import annotations

import json
import urllib.request
import uuid
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import aiohttp
import botbuilder.schema as schema
from botbuilder.core.about import __version__ as BOTBUILDER_VERSION
from msrest.serialization import Model
from yarl import URL

from runtime.protocol import JSON

#: botbuilder's, so the channel sees the same client; then ours.
USER_AGENT = (f"Microsoft-BotFramework/3.1 (BotBuilder Python/{BOTBUILDER_VERSION}) durable-teams-agent "
              f"aiohttp/{aiohttp.__version__}")
ACCEPTED = (200, 201, 202)  # what msrest's ConversationsOperations accepts; anything else is an error
_NO_REPLY_CHANNELS = ("directline", "webchat")  # get_conversation_reference gives them no activity id


class ConnectorError(Exception):
    """The connector answered with a status other than 200, 201 or 202. ``str()`` is msrest's
    "(code) message" when the body is the usual ``{"error": {...}}``."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(f"({code}) {message}" if code else message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


# ------------------------------------------------------------------------------------ the activity

def _fields() -> dict[str, tuple[tuple[str, str], ...]]:
    """Wire key and type of each field of each botbuilder schema model (read once)."""
    models = {name: cls for name, cls in vars(schema).items() if isinstance(cls, type) and issubclass(cls, Model)}
    return {name: tuple((spec["key"], spec["type"]) for spec in cls._attribute_map.values() if spec["key"])
            for name, cls in models.items()}


_FIELDS = _fields()


def _project(value: Any, kind: str) -> Any:
    """``value`` as msrest deserialises and serialises it as ``kind``: models keep their fields only,
    without nulls; ``object`` and the basic types pass as they are."""
    if kind.startswith("[") and kind.endswith("]"):
        if not isinstance(value, list):
            return None
        inner = kind[1:-1]
        if inner == "Entity":  # an entity is kept whole, its nulls too (bot/sender.py's _Entity did that)
            return [{k: v for k, v in e.items() if not (k == "type" and v is None)} for e in value
                    if isinstance(e, dict)]
        return [None if item is None else _project(item, inner) for item in value]
    if kind.startswith("{") and kind.endswith("}"):
        return {k: _project(v, kind[1:-1]) for k, v in value.items()} if isinstance(value, dict) else None
    fields = _FIELDS.get(kind)
    if fields is None:
        return value
    if not isinstance(value, dict):
        return None
    projected = {}
    for key, sub in fields:
        item = value.get(key)
        if item is not None and (item := _project(item, sub)) is not None:
            projected[key] = item
    return projected


def outgoing(reference: JSON, activity: JSON, *, update_id: str | None = None) -> JSON:
    """The activity botbuilder sent for ``activity`` to ``reference`` (see the module docstring)."""
    body: JSON = _project(activity, "Activity")
    body.pop("locale", None)
    for key, value in (("channelId", reference.get("channelId")), ("serviceUrl", reference.get("serviceUrl")),
                       ("conversation", _project(reference.get("conversation"), "ConversationAccount")),
                       ("from", _project(reference.get("bot"), "ChannelAccount")),
                       ("recipient", _project(reference.get("user"), "ChannelAccount"))):
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    if reference.get("channelId") not in _NO_REPLY_CHANNELS:
        body["replyToId"] = str(uuid.uuid1())
    if update_id is not None:
        body["id"] = update_id
    else:
        body.pop("id", None)
        body["type"] = body.get("type") or "message"
        body["inputHint"] = body.get("inputHint") or "acceptingInput"
    return body


def activities_url(service_url: str, conversation_id: str, activity_id: str | None = None) -> str:
    """``{serviceUrl}/v3/conversations/{id}/activities[/{activityId}]``, the segments quoted as msrest does."""
    path = f"v3/conversations/{quote(conversation_id, safe='')}/activities"
    if activity_id is not None:
        path += f"/{quote(activity_id, safe='')}"
    return urljoin(service_url.rstrip("/") + "/", path)


# ------------------------------------------------------------------------------------ the transport

class BotConnector:
    """Sends and updates activities; one ``aiohttp.ClientSession`` (keep-alive) for every service URL,
    opened at the first call, closed by :meth:`close`. No cookies; proxies from the environment
    (``HTTPS_PROXY``, ``NO_PROXY``) as ``requests`` used them."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._proxies: dict[tuple[str, str], str | None] = {}

    async def send(self, reference: JSON, activity: JSON, *, update_id: str | None = None,
                   authorization: str | None = None) -> str | None:
        """POST (a reply when the activity has a replyToId) or, with ``update_id``, PUT; returns the id
        the connector gave (update: None). Raises ConnectorError, aiohttp.ClientError, ValueError."""
        body = outgoing(reference, activity, update_id=update_id)
        conversation_id = (body.get("conversation") or {}).get("id")
        service_url = body.get("serviceUrl")
        if not isinstance(conversation_id, str) or not conversation_id or not isinstance(service_url, str):
            raise ValueError("the conversation reference names no conversation id or service URL")
        headers = {"Accept": "application/json", "Content-Type": "application/json; charset=utf-8"}
        if authorization:
            headers["Authorization"] = authorization
        if update_id is not None:
            method, url = "PUT", activities_url(service_url, conversation_id, update_id)
        else:
            method, reply_to = "POST", body.get("replyToId") or None
            url = activities_url(service_url, conversation_id, reply_to)
            if reply_to is not None:  # msrest's reply_to_activity sets it, send_to_conversation does not
                headers["x-ms-conversation-id"] = conversation_id
        answer = await self._call(method, url, json.dumps(body), headers)
        if update_id is not None:
            return None
        if answer is None:
            return ""  # botbuilder's ResourceResponse(id=activity.id or "") for an empty answer
        return answer.get("id") if isinstance(answer, dict) else None

    async def _call(self, method: str, url: str, data: str, headers: dict[str, str]) -> Any:
        session = self._open()
        async with session.request(method, URL(url, encoded=True), data=data.encode(), headers=headers,
                                   proxy=self._proxy(url)) as response:
            raw = await response.read()
            if response.status not in ACCEPTED:
                raise _error(response.status, response.reason, response.headers.get("Retry-After"), raw)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:  # shutting down: the message stays in the outbox for the next start
            raise aiohttp.ClientConnectionError("the Bot Connector session is closed")
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT},
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=None))  # the sender's own
        return self._session

    def _proxy(self, url: str) -> str | None:
        """The proxy for ``url`` from the environment, read once per scheme and host (aiohttp's own
        ``trust_env`` would read ~/.netrc on a thread for every request)."""
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        if key not in self._proxies:
            bypass = urllib.request.proxy_bypass(key[1])  # Linux: NO_PROXY only
            self._proxies[key] = None if bypass else urllib.request.getproxies_environment().get(key[0])
        return self._proxies[key]

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()


def _error(status: int, reason: str | None, retry_after: str | None, raw: bytes) -> ConnectorError:
    code = message = None
    try:
        error = json.loads(raw).get("error")
        code, message = error.get("code"), error.get("message")
    except (ValueError, AttributeError):
        pass
    seconds: float | None = None
    if retry_after:
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = None
    return ConnectorError(status, str(message or f"Operation returned an invalid status code {reason!r}"),
                          code=str(code) if code else None, retry_after=seconds)
