"""A round-robin HTTP reverse proxy for tests: one address in front of several bot web instances.

Like a simple load balancer (nginx ``upstream`` without weights): each request goes to the next
backend in turn; a backend that refuses the connection (it is down) is skipped and the request
tried on the next one (nginx ``proxy_next_upstream error``), and only when every backend refuses
does the proxy answer 502. Down backends are not remembered (no ``max_fails``): each request
tries from its turn, so the one after a dead backend takes its share too, and a restarted
backend gets traffic again at once. A request that reached a backend is never sent again (it may not be
idempotent): if that backend then fails, the answer is 502 (504 after the 60 s timeout).

Requests and responses are buffered whole; method, path, query, headers (without hop-by-hop
headers and ``Host``) and body are relayed as they are, so compressed bodies stay compressed.
The server runs on its own loop thread, so sync and async tests can both use it.
"""

from __future__ import annotations

import asyncio
import threading

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, MultiMapping
from yarl import URL

from harness.loop_thread import LoopServer

__all__ = ["RoundRobinProxy"]

#: Per forwarded request, from connecting to the whole response body.
FORWARD_TIMEOUT = 60.0
#: RFC 9110 section 7.6.1 connection-specific headers, never forwarded by a proxy.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "trailers", "transfer-encoding", "upgrade",
})
#: Headers aiohttp's client would add on its own: only sent when the client sent them.
_NO_AUTO_HEADERS = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


def _forwardable(headers: MultiMapping[str], drop: set[str]) -> CIMultiDict[str]:
    """A copy of ``headers`` without hop-by-hop ones, those named in ``Connection``, and ``drop``."""
    named = {token.strip().lower() for value in headers.getall("Connection", []) for token in value.split(",")}
    skip = HOP_BY_HOP | named | drop
    return CIMultiDict((key, value) for key, value in headers.items() if key.lower() not in skip)


class RoundRobinProxy(LoopServer):
    """Round-robin reverse proxy on ``http://127.0.0.1:PORT`` in front of ``backends``.

    ``backends`` are base URLs such as ``http://127.0.0.1:3978`` (a path prefix is kept: the
    request path is appended to it). Use as ``with RoundRobinProxy([a, b]) as proxy:`` and send
    requests to ``proxy.base_url``.
    """

    client_max_size = 64 * 1024 * 1024

    def __init__(self, backends: list[str], host: str = "127.0.0.1") -> None:
        super().__init__(host)
        self._lock = threading.Lock()
        self._backends = [b.rstrip("/") for b in backends]
        self._next = 0
        self._counts: dict[str, int] = {}
        self._session: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------ lifecycle

    async def _serve(self) -> None:
        # No keep-alive to the backends: tests kill and restart them, and a pooled connection to a
        # dead process would turn into an error instead of "connection refused, try the next".
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
        )
        await super()._serve()

    async def _shutdown(self) -> None:
        await super()._shutdown()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ backends

    @property
    def backends(self) -> list[str]:
        with self._lock:
            return list(self._backends)

    def set_backends(self, backends: list[str]) -> None:
        """Replace the backends; requests already being forwarded finish where they are."""
        with self._lock:
            self._backends = [b.rstrip("/") for b in backends]
            self._next = 0

    @property
    def counts(self) -> dict[str, int]:
        """Requests forwarded to each backend (it accepted the connection), by base URL (a copy)."""
        with self._lock:
            return dict(self._counts)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # ------------------------------------------------------------------ forwarding

    def _rotation(self) -> list[str]:
        """The backends in the order this request tries them, and advance the round robin."""
        with self._lock:
            backends = list(self._backends)
            if not backends:
                return []
            start = self._next % len(backends)
            self._next = (start + 1) % len(backends)
        return backends[start:] + backends[:start]

    def _count(self, backend: str) -> None:
        with self._lock:
            self._counts[backend] = self._counts.get(backend, 0) + 1

    async def _handle(self, request: web.Request) -> web.Response:
        session = self._session
        assert session is not None
        body = await request.read()
        headers = _forwardable(request.headers, {"host", "content-length"})
        refused: list[str] = []
        for backend in self._rotation():
            try:
                async with session.request(
                    request.method, URL(backend + request.raw_path, encoded=True), headers=headers, data=body,
                    allow_redirects=False,
                ) as response:
                    payload = await response.read()
            except aiohttp.ClientConnectorError as exc:
                refused.append(f"{backend}: {exc}")  # never reached it: the next one may take it
                continue
            except TimeoutError:
                self._count(backend)
                return web.Response(status=504, text=f"backend {backend} timed out after {FORWARD_TIMEOUT}s\n")
            except (aiohttp.ClientError, asyncio.IncompleteReadError) as exc:
                self._count(backend)  # it got the request: sending it again could do the work twice
                return web.Response(status=502, text=f"backend {backend} failed: {exc!r}\n")
            self._count(backend)
            return web.Response(
                status=response.status,
                reason=response.reason,
                headers=_forwardable(response.headers, {"content-length"}),
                body=payload,
            )
        detail = "\n".join(refused) or "no backends configured"
        return web.Response(status=502, text=f"no backend accepted the connection:\n{detail}\n")
