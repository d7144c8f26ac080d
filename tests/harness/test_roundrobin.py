"""The round-robin test proxy (harness/roundrobin.py) against two tiny aiohttp backends."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Iterator
from http.client import HTTPMessage
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from harness.botproc import free_port
from harness.loop_thread import LoopThread
from harness.roundrobin import RoundRobinProxy


class EchoBackend:
    """Answers every request with JSON describing it; ``?status=N`` picks the status."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread = LoopThread(f"EchoBackend-{name}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        described = {"backend": self.name, "method": request.method, "raw_path": request.raw_path,
                     "headers": dict(request.headers), "body": body.decode("utf-8", "replace")}
        response = web.json_response(described, status=int(request.query.get("status", "200")),
                                     headers={"X-Backend": self.name, "Connection": "close, X-Secret"})
        response.headers.add("X-Secret", "hop-by-hop, named in Connection")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        if "gzip" in request.query:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def start(self) -> None:
        self._thread = LoopThread(f"EchoBackend-{self.name}")
        self._thread.start(self._serve)

    def stop(self) -> None:
        runner = self._runner
        self._thread.stop(runner.cleanup if runner is not None else None)


def request(url: str, *, method: str = "GET", body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, HTTPMessage, bytes]:
    """One request with exactly these headers (urllib would replace ``Connection``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""), body=body,
                     headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


def backend_of(url: str) -> str:
    status, _, body = request(url)
    assert status == 200, body
    return str(json.loads(body)["backend"])


@pytest.fixture
def backends() -> Iterator[list[EchoBackend]]:
    started = [EchoBackend("a"), EchoBackend("b")]
    for backend in started:
        backend.start()
    yield started
    for backend in started:
        backend.stop()


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused


def test_requests_alternate_between_backends(backends: list[EchoBackend]) -> None:
    a, b = backends
    with RoundRobinProxy([a.url, b.url]) as proxy:
        assert proxy.base_url == f"http://127.0.0.1:{proxy.port}"
        seen = [backend_of(f"{proxy.base_url}/api/messages") for _ in range(6)]
        assert seen == ["a", "b", "a", "b", "a", "b"]
        assert proxy.counts == {a.url: 3, b.url: 3}


def test_a_dead_backend_is_skipped(backends: list[EchoBackend]) -> None:
    a, b = backends
    dead = dead_url()
    with RoundRobinProxy([a.url, dead, b.url]) as proxy:
        seen = [backend_of(f"{proxy.base_url}/healthz") for _ in range(6)]
        # The dead one's turn goes to the next backend (b), like nginx without max_fails.
        assert seen == ["a", "b", "b", "a", "b", "b"]
        assert proxy.counts == {a.url: 2, b.url: 4}
        # A backend that goes down mid-run is skipped too, and taken again once it is back.
        b_port = b.port
        b.stop()
        assert {backend_of(f"{proxy.base_url}/x") for _ in range(4)} == {"a"}
        b.port = b_port
        b.start()
        assert {backend_of(f"{proxy.base_url}/x") for _ in range(4)} == {"a", "b"}


def test_502_only_when_every_backend_is_down(backends: list[EchoBackend]) -> None:
    a, _ = backends
    with RoundRobinProxy([dead_url(), dead_url()]) as proxy:
        status, _, body = request(f"{proxy.base_url}/api/messages", method="POST", body=b"{}")
        assert status == 502
        assert b"no backend accepted the connection" in body
        assert proxy.counts == {}
        proxy.set_backends([dead_url(), a.url])
        assert [backend_of(f"{proxy.base_url}/") for _ in range(2)] == ["a", "a"]
        proxy.set_backends([])
        assert request(f"{proxy.base_url}/")[0] == 502


def test_method_path_query_headers_body_and_status_are_relayed(backends: list[EchoBackend]) -> None:
    a, _ = backends
    payload = json.dumps({"type": "message", "text": "héllo"}).encode()
    with RoundRobinProxy([a.url]) as proxy:
        status, headers, body = request(
            f"{proxy.base_url}/api/messages?status=201&x=%2F1",
            method="PUT",
            body=payload,
            headers={"Content-Type": "application/json", "Authorization": "Bearer t0ken", "Accept-Encoding": "gzip",
                     "X-Custom": "1", "Connection": "close, X-Drop-Me", "X-Drop-Me": "hop", "Keep-Alive": "5"},
        )
    assert status == 201
    echoed: dict[str, Any] = json.loads(body)
    assert echoed["method"] == "PUT"
    assert echoed["raw_path"] == "/api/messages?status=201&x=%2F1"
    assert echoed["body"] == payload.decode()
    sent = {k.lower(): v for k, v in echoed["headers"].items()}
    assert sent["content-type"] == "application/json"
    assert sent["authorization"] == "Bearer t0ken"
    assert sent["x-custom"] == "1"
    assert sent["accept-encoding"] == "gzip"
    assert sent["host"] == f"127.0.0.1:{a.port}"  # the backend's, not the proxy's
    assert "x-drop-me" not in sent and "keep-alive" not in sent
    assert "user-agent" not in sent and "accept" not in sent  # the proxy adds none of its own
    assert headers["X-Backend"] == "a"
    assert headers["Content-Type"].startswith("application/json")
    assert headers.get_all("Set-Cookie") == ["a=1", "b=2"]
    assert "X-Secret" not in headers
    assert int(headers["Content-Length"]) == len(body)


def test_error_statuses_are_relayed_not_retried(backends: list[EchoBackend]) -> None:
    a, b = backends
    with RoundRobinProxy([a.url, b.url]) as proxy:
        status, _, body = request(f"{proxy.base_url}/boom?status=500", method="POST", body=b"x")
        assert status == 500
        assert json.loads(body)["backend"] == "a"
        assert proxy.counts == {a.url: 1}


def test_a_compressed_body_is_relayed_as_it_is(backends: list[EchoBackend]) -> None:
    a, _ = backends
    with RoundRobinProxy([a.url]) as proxy:
        status, headers, body = request(f"{proxy.base_url}/z?gzip=1", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["backend"] == "a"
