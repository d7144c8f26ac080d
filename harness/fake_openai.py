"""A local chat-completions server for tests: speaks the OpenAI and the Azure OpenAI protocol.

The bot's real model clients (``autogen-ext`` over the ``openai`` SDK) talk HTTP to it, so tests
exercise the exact requests the bot would send to OpenAI, an OpenAI-compatible server (Ollama,
vLLM, llama.cpp) or an Azure OpenAI deployment: paths, query strings, auth headers and bodies.

Routes (any method other than POST answers 405):

- ``/v1/chat/completions``: OpenAI (``OPENAI_BASE_URL=<url>/v1``);
- ``/openai/deployments/{deployment}/chat/completions?api-version=...``: Azure OpenAI
  (``AZURE_OPENAI_ENDPOINT=<url>``);
- any other path ending in ``/chat/completions`` (a base URL without ``/v1``).

Every request is recorded (:class:`ChatRequest`). Answers are scripted: :meth:`FakeOpenAI.enqueue`
queues replies consumed in order (:func:`text`, :func:`tool_calls`, :func:`error`, :func:`raw`, each
with an optional delay); with the queue empty, the *responder* decides (by default
:func:`echo_responder`: a plain text answer about the last message). Auth can be enforced
(:meth:`FakeOpenAI.require_auth`) to answer 401 like the real services on a wrong key. Like vLLM
and llama.cpp (and unlike OpenAI), it refuses a history whose tool calls have arguments that are
not a JSON object (``strict_history``, on by default).

It runs in a background thread with its own event loop (like harness/connector.py), so it
answers a bot process, a synchronous test and an async test on pytest's loop alike.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from harness.loop_thread import LoopServer
from runtime.untrusted import tool_output_data

__all__ = [
    "ChatRequest",
    "FakeOpenAI",
    "Reply",
    "completion",
    "content_filtered_prompt",
    "echo_responder",
    "error",
    "rate_limited",
    "raw",
    "text",
    "tool_call",
    "tool_calls",
]

JSON = dict[str, Any]
_ids = itertools.count(1)


@dataclass(frozen=True)
class ChatRequest:
    """One HTTP request a model client made."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: JSON | None
    time: float = field(default_factory=time.monotonic)  # arrival, before any delay
    status: int = 0  # what the fake answered (0 while the answer is pending)

    @property
    def deployment(self) -> str | None:
        """The Azure deployment named in the path, if any."""
        parts = self.path.strip("/").split("/")
        if len(parts) >= 4 and parts[:2] == ["openai", "deployments"]:
            return parts[2]
        return None

    @property
    def messages(self) -> list[JSON]:
        return list((self.body or {}).get("messages") or [])

    @property
    def last_message(self) -> JSON:
        return self.messages[-1] if self.messages else {}

    @property
    def system_prompt(self) -> str:
        return "\n".join(str(m.get("content")) for m in self.messages if m.get("role") in ("system", "developer"))

    @property
    def tool_names(self) -> list[str]:
        return [t["function"]["name"] for t in (self.body or {}).get("tools") or []]

    @property
    def tool_results(self) -> list[JSON]:
        """The ``tool`` messages after the last assistant tool call (what the model is told)."""
        results: list[JSON] = []
        for message in reversed(self.messages):
            if message.get("role") != "tool":
                break
            results.insert(0, message)
        return results


@dataclass(frozen=True)
class Reply:
    """A scripted answer: ``body`` as JSON (or ``raw`` bytes), after ``delay`` seconds."""

    status: int = 200
    body: JSON | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    raw: bytes | None = None
    content_type: str = "application/json"
    #: Seconds between two chunks when the request asked for a stream (``"stream": true``).
    chunk_delay: float = 0.0


Responder = Callable[[ChatRequest], Reply]


def completion(message: JSON, finish_reason: str, model: str = "fake-model") -> JSON:
    n = next(_ids)
    return {
        "id": f"chatcmpl-fake{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }


def text(content: str | None, *, finish_reason: str = "stop", delay: float = 0.0,
         headers: dict[str, str] | None = None, chunk_delay: float = 0.0) -> Reply:
    """An assistant message (``finish_reason="content_filter"`` and ``content=None`` for a filtered answer);
    streamed word by word, ``chunk_delay`` apart, when the request asks for a stream."""
    return Reply(body=completion({"role": "assistant", "content": content}, finish_reason),
                 headers=dict(headers or {}), delay=delay, chunk_delay=chunk_delay)


def tool_call(name: str, arguments: str | JSON, call_id: str | None = None) -> JSON:
    """One tool call; ``arguments`` as a dict is JSON-encoded, a string is sent verbatim (even if malformed)."""
    return {
        "id": call_id or f"call_fake{next(_ids)}",
        "type": "function",
        "function": {"name": name, "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)},
    }


def tool_calls(*calls: JSON, content: str | None = None, delay: float = 0.0) -> Reply:
    """An assistant message asking for the given tool calls (see :func:`tool_call`)."""
    return Reply(body=completion({"role": "assistant", "content": content, "tool_calls": list(calls)}, "tool_calls"),
                 delay=delay)


def error(status: int, message: str = "", *, code: str | None = None, type: str | None = None,
          headers: dict[str, str] | None = None, delay: float = 0.0, extra: JSON | None = None) -> Reply:
    """An error answer in the OpenAI/Azure shape ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message or f"fake error {status}", "type": type, "param": None, "code": code,
                      **(extra or {})}}
    return Reply(status=status, body=body, headers=dict(headers or {}), delay=delay)


def raw(status: int, payload: bytes, *, content_type: str = "text/plain", delay: float = 0.0,
        headers: dict[str, str] | None = None) -> Reply:
    """Bytes sent verbatim (e.g. an HTML error page from a proxy)."""
    return Reply(status=status, raw=payload, content_type=content_type, delay=delay, headers=dict(headers or {}))


def rate_limited(retry_after: float | None = 1, *, delay: float = 0.0) -> Reply:
    """429 as OpenAI sends it, with ``Retry-After`` seconds (None: no header)."""
    headers = {"Retry-After": f"{retry_after:g}"} if retry_after is not None else {}
    return error(429, "Rate limit reached for requests. Please try again later.", type="requests",
                 code="rate_limit_exceeded", headers=headers, delay=delay)


def content_filtered_prompt() -> Reply:
    """Azure's answer when the *prompt* trips the content filter: HTTP 400, code ``content_filter``."""
    return error(400, "The response was filtered due to the prompt triggering Azure OpenAI's content management "
                 "policy. Please modify your prompt and retry.", code="content_filter", extra={
                     "status": 400, "param": "prompt",
                     "innererror": {"code": "ResponsibleAIPolicyViolation",
                                    "content_filter_result": {"violence": {"filtered": True, "severity": "high"}}}})


def echo_responder(request: ChatRequest) -> Reply:
    """Default answer: a text that shows what the model was given last.

    - after tool results: the ``message`` field of each JSON result (or the raw content), joined
      (read from inside the bot's untrusted-data markers, as a model would);
    - for a user message: ``"echo: <its text>"``.
    """
    if results := request.tool_results:
        parts = []
        for result in results:
            said = tool_output_data(str(result.get("content", "")))
            try:
                data = json.loads(said)
            except ValueError:
                data = None
            parts.append(str(data["message"]) if isinstance(data, dict) and "message" in data else said)
        return text("\n\n".join(parts))
    content: Any = request.last_message.get("content")
    if isinstance(content, list):  # content parts
        content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return text(f"echo: {content}")


def _unparseable_tool_arguments(messages: list[JSON]) -> str | None:
    for message in messages:
        for call in message.get("tool_calls") or []:
            arguments = call.get("function", {}).get("arguments")
            try:
                if isinstance(json.loads(arguments), dict):
                    continue
            except (TypeError, ValueError):
                pass
            return str(arguments)
    return None


class FakeOpenAI(LoopServer):
    """The fake server. ``with FakeOpenAI() as fake:``; ``fake.openai_base_url`` / ``fake.azure_endpoint``."""

    shutdown_timeout = 2.0

    def __init__(self, host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._lock = threading.Lock()
        self._queue: list[Reply] = []
        self._responder: Responder = echo_responder
        self._requests: list[ChatRequest] = []
        self._auth: tuple[str, str] | None = None  # (header, expected value)
        self.strict_history = True

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash)."""
        return self.base_url

    @property
    def openai_base_url(self) -> str:
        """What to set as ``OPENAI_BASE_URL``."""
        return f"{self.url}/v1"

    @property
    def azure_endpoint(self) -> str:
        """What to set as ``AZURE_OPENAI_ENDPOINT``."""
        return self.url

    # ------------------------------------------------------------------ scripting

    def enqueue(self, *replies: Reply) -> None:
        """Answer the next requests with these replies, in order (then the responder again)."""
        with self._lock:
            self._queue.extend(replies)

    def set_responder(self, responder: Responder | None) -> None:
        """What answers when the queue is empty (None: :func:`echo_responder`)."""
        with self._lock:
            self._responder = responder or echo_responder

    def require_auth(self, header: str | None, value: str = "") -> None:
        """Answer 401 unless ``header`` (e.g. ``authorization`` or ``api-key``) equals ``value``; None: no check."""
        with self._lock:
            self._auth = (header.lower(), value) if header else None

    def reset(self) -> None:
        """Forget requests, queued replies, responder and auth (between tests)."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
            self._responder = echo_responder
            self._auth = None
            self.strict_history = True

    @property
    def pending_replies(self) -> int:
        with self._lock:
            return len(self._queue)

    # ------------------------------------------------------------------ handler

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        arrived = time.monotonic()
        payload = await request.read()
        try:
            body = json.loads(payload) if payload else None
        except ValueError:
            body = None
        entry = ChatRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body if isinstance(body, dict) else None,
            time=arrived,
        )
        with self._lock:
            index = len(self._requests)
            self._requests.append(entry)
            auth = self._auth

        reply = self._choose(entry, auth)
        await self._sleep(reply.delay)  # stop() ends pending delays at once
        with self._lock:
            self._requests[index] = ChatRequest(**{**entry.__dict__, "status": reply.status})
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, content_type=reply.content_type,
                                headers=reply.headers)
        if entry.body is not None and entry.body.get("stream") and reply.status == 200 and reply.body \
                and reply.body.get("object") == "chat.completion":
            return await self._stream(request, reply, entry.body)
        return web.json_response(reply.body, status=reply.status, headers=reply.headers)

    async def _stream(self, request: web.Request, reply: Reply, asked: JSON) -> web.StreamResponse:
        """A completion as OpenAI streams it (server-sent events): the text word by word, the tool
        calls, the finish reason, the usage if ``stream_options.include_usage``, then ``[DONE]``."""
        assert reply.body is not None
        response = web.StreamResponse(status=200, headers={**reply.headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        [choice] = reply.body["choices"]
        message = choice["message"]
        base = {k: reply.body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

        async def event(delta: JSON, finish: str | None = None, **extra: Any) -> None:
            chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
                     **extra}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        await event({"role": "assistant", "content": ""})
        for word in re.findall(r"\S+\s*|\s+", message.get("content") or ""):
            await self._sleep(reply.chunk_delay)
            await event({"content": word})
        for index, call in enumerate(message.get("tool_calls") or ()):
            await event({"tool_calls": [{"index": index, **call}]})
        await event({}, choice["finish_reason"])
        if (asked.get("stream_options") or {}).get("include_usage"):
            await response.write(f"data: {json.dumps({**base, 'choices': [], 'usage': reply.body['usage']})}\n\n"
                                 .encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _choose(self, entry: ChatRequest, auth: tuple[str, str] | None) -> Reply:
        if entry.method != "POST":
            return error(405, f"{entry.method} is not supported here", type="invalid_request_error")
        if not entry.path.endswith("/chat/completions"):
            return error(404, f"no route for {entry.path}", type="invalid_request_error", code="404")
        if auth is not None and entry.headers.get(auth[0]) != auth[1]:
            if auth[0] == "api-key":  # Azure's wording
                return error(401, "Access denied due to invalid subscription key or wrong API endpoint. Make sure "
                             "to provide a valid key for an active subscription and use a correct regional API "
                             "endpoint for your resource.", code="401")
            return error(401, "Incorrect API key provided: sk-***. You can find your API key at "
                         "https://platform.openai.com/account/api-keys.", type="invalid_request_error",
                         code="invalid_api_key")
        if entry.body is None:
            return error(400, "We could not parse the JSON body of your request.", type="invalid_request_error")
        if self.strict_history and (bad := _unparseable_tool_arguments(entry.messages)):
            # vLLM and llama.cpp parse the history's tool calls; OpenAI passes them on.
            return error(400, f"Invalid 'messages': tool call arguments are not a JSON object: {bad!r}",
                         type="invalid_request_error", code="invalid_tool_call_arguments")
        with self._lock:
            if self._queue:
                reply = self._queue.pop(0)
                responder = None
            else:
                responder = self._responder
        if responder is not None:
            reply = responder(entry)
        if reply.body is not None and reply.status == 200 and "model" in reply.body:
            # Echo the requested model like the real services do (the SDK compares them).
            reply = Reply(status=reply.status, body={**reply.body, "model": entry.body.get("model", "fake-model")},
                          headers=reply.headers, delay=reply.delay, chunk_delay=reply.chunk_delay)
        return reply

    # ------------------------------------------------------------------ accessors

    def requests(self) -> list[ChatRequest]:
        with self._lock:
            return list(self._requests)

    def chat_requests(self) -> list[ChatRequest]:
        """Requests to a chat-completions path."""
        return [r for r in self.requests() if r.path.endswith("/chat/completions")]

    def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[ChatRequest]:
        """Block until at least ``count`` requests arrived (sync tests only)."""
        deadline = time.monotonic() + timeout
        while len(self.requests()) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected >= {count} model request(s) within {timeout}s, "
                                     f"got {len(self.requests())}")
            time.sleep(0.02)
        return self.requests()

    async def awaiting_requests(self, count: int, timeout: float = 10.0) -> list[ChatRequest]:
        """Async :meth:`wait_for_requests`."""
        deadline = time.monotonic() + timeout
        while len(self.requests()) < count:
            if time.monotonic() >= deadline:
                raise AssertionError(f"expected >= {count} model request(s) within {timeout}s")
            await asyncio.sleep(0.02)
        return self.requests()

