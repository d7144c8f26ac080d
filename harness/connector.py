"""A fake Bot Framework Connector service for end-to-end tests.

The bot answers users by calling the Connector REST API (v3) at the activity's
``serviceUrl``.  Pointing ``serviceUrl`` at a :class:`RecordingConnector` lets a
test observe exactly what the bot sent, and inject throttling/server errors to
exercise retry logic, without any network access or Microsoft credentials.

The server runs in a background thread with its own event loop so it keeps
answering while a synchronous test blocks in :meth:`RecordingConnector.wait_for`
and also while an async test awaits on pytest's loop.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from harness.loop_thread import LoopServer

__all__ = ["Recorded", "RecordingConnector"]

#: Activity dict as sent by the bot (Bot Framework JSON, camelCase keys).
Activity = dict[str, Any]


@dataclass(frozen=True)
class Recorded:
    """One HTTP request the bot made to the connector.

    ``status`` is what the fake answered and ``response_id`` the activity id it
    handed back (POST/PUT), so tests can correlate a later update/delete with
    the message it targets.
    """

    method: str
    path: str
    conversation_id: str | None
    activity_id: str | None
    activity: Activity | None
    headers: dict[str, str]
    time: float = field(default_factory=time.monotonic)  # arrival, before any delay
    status: int = 200
    response_id: str | None = None


@dataclass(frozen=True)
class _Fault:
    """Pending fault injection: answer the next ``remaining`` requests with ``status``."""

    remaining: int
    status: int
    headers: dict[str, str]


def _stream_type(activity: Activity | None) -> str | None:
    """The ``streamType`` of an activity's ``streaminfo`` entity (None: not part of a stream)."""
    for entity in (activity or {}).get("entities") or ():
        if isinstance(entity, dict) and entity.get("type") == "streaminfo":
            return str(entity.get("streamType"))
    return None


class RecordingConnector(LoopServer):
    """Fake Connector service that records every activity the bot delivers.

    Use as ``with RecordingConnector() as connector:`` and pass
    ``connector.url`` as the ``serviceUrl`` of incoming activities.
    """

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._lock = threading.Lock()
        self._requests: list[Recorded] = []
        self._failed: list[Recorded] = []
        self._delivered: list[Recorded] = []
        self._fault: _Fault | None = None
        self._stream_fault: tuple[_Fault, str | None, str] | None = None
        self._delay = 0.0

    @property
    def url(self) -> str:
        """Base URL to use as ``serviceUrl`` (with trailing slash)."""
        return f"{self.base_url}/"

    # ------------------------------------------------------------------ faults

    def fail_next(
        self, n: int, status: int, headers: dict[str, str] | None = None
    ) -> None:
        """Answer the next ``n`` requests with ``status`` (e.g. 429 + Retry-After, 500).

        Failed requests go to :attr:`failed`, never to the delivered activities,
        so tests can assert the bot retried. ``n=0`` cancels a pending fault (and a :meth:`fail_stream`).
        """
        with self._lock:
            self._fault = _Fault(n, status, dict(headers or {})) if n > 0 else None
            if n <= 0:  # cancels the stream faults too (the fixtures' reset between tests)
                self._stream_fault = None

    def fail_stream(self, n: int, status: int, *, stream_type: str | None = None,
                    code: str = "ContentStreamNotAllowed", headers: dict[str, str] | None = None) -> None:
        """Answer the next ``n`` activities that carry a ``streaminfo`` entity (of ``stream_type``:
        informative, streaming or final; None: any) with ``status`` and Teams' error ``code``, e.g.
        403 ContentStreamNotAllowed or 429 + Retry-After. Other activities are answered as usual."""
        with self._lock:
            self._stream_fault = (_Fault(n, status, dict(headers or {})), stream_type, code) if n > 0 else None

    def set_delay(self, seconds: float) -> None:
        """Delay every response by ``seconds`` to simulate a slow Connector."""
        with self._lock:
            self._delay = max(0.0, seconds)

    # ------------------------------------------------------------------ handler

    async def _handle(self, request: web.Request) -> web.Response:
        """Route one Connector API call, record it and answer like Azure would."""
        arrived = time.monotonic()
        raw_path = request.raw_path.split("?", 1)[0]
        # Conversation ids are URL-encoded by msrest (Teams ids hold ':', ';', '@').
        parts = [unquote(p) for p in raw_path.split("/") if p]
        conversation_id = (
            parts[2]
            if len(parts) >= 3 and parts[:2] == ["v3", "conversations"]
            else None
        )
        activity_id = parts[4] if len(parts) == 5 and parts[3] == "activities" else None

        body = await request.read()
        activity: Activity | None = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
            activity = parsed if isinstance(parsed, dict) else None

        code = None
        with self._lock:
            delay = self._delay
            fault = self._fault
            if fault is not None:
                left = fault.remaining - 1
                self._fault = (
                    _Fault(left, fault.status, fault.headers) if left > 0 else None
                )
            elif self._stream_fault is not None and _stream_type(activity) is not None \
                    and self._stream_fault[1] in (None, _stream_type(activity)):
                fault, stream_type, code = self._stream_fault
                left = fault.remaining - 1
                self._stream_fault = (_Fault(left, fault.status, fault.headers), stream_type, code) if left else None
        if delay:
            await asyncio.sleep(delay)

        def record(status: int, response_id: str | None = None) -> Recorded:
            return Recorded(
                method=request.method,
                path=request.path,
                conversation_id=conversation_id,
                activity_id=activity_id,
                activity=activity,
                headers=dict(request.headers),
                time=arrived,
                status=status,
                response_id=response_id,
            )

        if fault is not None:
            with self._lock:
                self._failed.append(record(fault.status))
            error = {
                "error": {
                    "code": code or f"Injected{fault.status}",
                    "message": "injected failure",
                }
            }
            return web.json_response(error, status=fault.status, headers=fault.headers)

        method = request.method
        tail = parts[3:] if conversation_id is not None else None
        on_conversation = tail == ["activities"]  # send to conversation
        on_activity = activity_id is not None  # reply / update / delete
        response_id: str | None = None
        if method == "POST" and (on_conversation or on_activity):
            response_id = str(uuid.uuid4())
        elif method == "PUT" and on_activity:
            response_id = activity_id

        response: web.Response
        if response_id is not None:
            response = web.json_response({"id": response_id})
        elif method == "DELETE" and on_activity:
            response = web.Response(status=200)
        elif method == "GET" and tail == ["members"]:
            response = web.json_response([{"id": "user-1", "name": "Ada"}])
        else:
            error = {
                "error": {
                    "code": "NotFound",
                    "message": f"{method} {request.path} not faked",
                }
            }
            response = web.json_response(error, status=404)

        entry = record(response.status, response_id)
        with self._lock:
            self._requests.append(entry)
            if response_id is not None and activity is not None:
                self._delivered.append(entry)
        return response

    # ------------------------------------------------------------------ accessors

    def requests(self) -> list[Recorded]:
        """All non-failed requests, in arrival order (copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def failed(self) -> list[Recorded]:
        """Requests answered by :meth:`fail_next` (copy)."""
        with self._lock:
            return list(self._failed)

    def delivered(self, conversation_id: str | None = None) -> list[Recorded]:
        """Successful activity POSTs/PUTs as :class:`Recorded` (to see ids, routes)."""
        with self._lock:
            entries = list(self._delivered)
        if conversation_id is not None:
            entries = [e for e in entries if e.conversation_id == conversation_id]
        return entries

    def activities(
        self, type: str | None = None, conversation_id: str | None = None
    ) -> list[Activity]:
        """Delivered activity dicts, optionally filtered by ``type`` and conversation."""
        result = [
            e.activity
            for e in self.delivered(conversation_id)
            if e.activity is not None
        ]
        if type is not None:
            result = [a for a in result if a.get("type") == type]
        return result

    def messages(self, conversation_id: str | None = None) -> list[Activity]:
        """Delivered new ``message`` activities (sends and replies, not updates)."""
        return [e.activity for e in self.delivered(conversation_id)
                if e.method == "POST" and e.activity is not None and e.activity.get("type") == "message"]

    def updates(self, conversation_id: str | None = None) -> list[Recorded]:
        """Delivered updates of earlier messages (PUT), with the id of the message they replace."""
        return [e for e in self.delivered(conversation_id) if e.method == "PUT"]

    def wait_for_texts(self, count: int, conversation_id: str | None = None, timeout: float = 10.0) -> list[str]:
        """Wait for at least ``count`` new messages with text (cards without text don't count)."""
        try:
            self.wait_for(lambda c: len(c.texts(conversation_id)) >= count, timeout)
        except AssertionError as exc:
            raise AssertionError(f"expected >= {count} text message(s) for {conversation_id!r}: {exc}") from None
        return self.texts(conversation_id)

    def texts(self, conversation_id: str | None = None) -> list[str]:
        """``text`` of delivered messages, skipping messages without text (cards)."""
        return [
            m["text"]
            for m in self.messages(conversation_id)
            if m.get("text") is not None
        ]

    def stream_sends(self, conversation_id: str | None = None) -> list[Recorded]:
        """Accepted activities of a stream (typing chunks and the final message), in order."""
        return [e for e in self.delivered(conversation_id) if _stream_type(e.activity) is not None]

    def clear(self) -> None:
        """Forget everything recorded (pending faults and delay are kept)."""
        with self._lock:
            self._requests.clear()
            self._failed.clear()
            self._delivered.clear()

    # ------------------------------------------------------------------ waiting

    def _describe(self) -> str:
        """Summary for timeout messages: what the bot did send so far."""
        with self._lock:
            n_requests, n_failed = len(self._requests), len(self._failed)
        return (
            f"texts delivered so far: {self.texts()!r}; "
            f"{n_requests} request(s) recorded, {n_failed} failed"
        )

    def wait_for(
        self,
        predicate: Callable[[RecordingConnector], bool],
        timeout: float = 10.0,
        interval: float = 0.05,
    ) -> None:
        """Block until ``predicate(self)`` is true; AssertionError on timeout.

        Only use from code that does not run the bot on the calling thread's
        event loop (use :meth:`awaiting` there instead).
        """
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"condition not met within {timeout}s; {self._describe()}"
                )
            time.sleep(interval)

    async def awaiting(
        self,
        predicate: Callable[[RecordingConnector], bool],
        timeout: float = 10.0,
        interval: float = 0.05,
    ) -> None:
        """Async :meth:`wait_for`: yields to the event loop while polling."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"condition not met within {timeout}s; {self._describe()}"
                )
            await asyncio.sleep(interval)

    def wait_for_messages(
        self, count: int, conversation_id: str | None = None, timeout: float = 10.0
    ) -> list[Activity]:
        """Wait for at least ``count`` delivered messages and return all of them."""
        try:
            self.wait_for(lambda c: len(c.messages(conversation_id)) >= count, timeout)
        except AssertionError as exc:
            raise AssertionError(
                f"expected >= {count} message(s) for {conversation_id!r}: {exc}"
            ) from None
        return self.messages(conversation_id)

    async def awaiting_messages(
        self, count: int, conversation_id: str | None = None, timeout: float = 10.0
    ) -> list[Activity]:
        """Async :meth:`wait_for_messages` for tests running on an event loop."""
        try:
            await self.awaiting(
                lambda c: len(c.messages(conversation_id)) >= count, timeout
            )
        except AssertionError as exc:
            raise AssertionError(
                f"expected >= {count} message(s) for {conversation_id!r}: {exc}"
            ) from None
        return self.messages(conversation_id)
