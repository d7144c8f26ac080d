"""A fake OpenTelemetry collector: takes OTLP/HTTP trace exports (protobuf) and keeps the spans.

What the bot's exporter sends is decoded with the official protobuf classes
(``opentelemetry-proto``), so a test sees exactly what a real collector would receive.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from harness.loop_thread import LoopServer


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: tuple[tuple[str, str], ...]  # (trace id, span id) in hex
    attributes: dict[str, object]


class OtlpCollector(LoopServer):
    def __init__(self) -> None:
        super().__init__()
        self._spans: list[Span] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """For ``OTEL_EXPORTER_OTLP_ENDPOINT`` (the exporter appends ``/v1/traces``)."""
        return self.base_url

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        return app

    async def _export(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        spans = []
        for resource_spans in export.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    spans.append(Span(
                        service=service, name=span.name, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        attributes={a.key: getattr(a.value, a.value.WhichOneof("value") or "string_value")
                                    for a in span.attributes},
                    ))
        with self._lock:
            self._spans.extend(spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def spans(self, name: str | None = None) -> list[Span]:
        with self._lock:
            return [s for s in self._spans if name is None or s.name == name]

    def wait_for(self, name: str, count: int = 1, timeout: float = 15.0) -> list[Span]:
        deadline = time.monotonic() + timeout
        while len(found := self.spans(name)) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} {name!r} span(s) after {timeout} s; have "
                                     f"{sorted({s.name for s in self.spans()})}")
            time.sleep(0.05)
        return found
