"""Optional OpenTelemetry tracing: off unless the standard OTEL_* environment asks for it.

``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) sends spans over
OTLP/HTTP; ``OTEL_TRACES_EXPORTER=console`` prints them. ``OTEL_SERVICE_NAME`` names the
service (default ``teams-agent-<role>``). Off, every call here is OpenTelemetry's no-op.

Spans: ``ingest activity`` (web), ``agent turn`` (worker; linked to the ingest span of the
message it answers, whichever process took it in: the trace context travels in the inbox
event), ``job attempt`` and ``deliver message``. AutoGen's own spans (agent and tool calls)
nest under ``agent turn``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from opentelemetry import context, propagate, trace

log = logging.getLogger(__name__)

tracer = trace.get_tracer("teams_agent")
SERVER, CONSUMER = trace.SpanKind.SERVER, trace.SpanKind.CONSUMER

#: The inbox event payload key carrying the W3C trace context of the span that ingested it.
CARRIER_KEY = "trace"


def setup(role: str, env: Mapping[str, str] | None = None) -> bool:
    """Install a tracer provider when the environment asks for one; returns whether it did."""
    env = os.environ if env is None else env
    exporter_name = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if exporter_name == "none" or not (endpoint or exporter_name in ("otlp", "console")):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()  # reads the OTEL_EXPORTER_OTLP_* settings itself
    service = env.get("OTEL_SERVICE_NAME") or f"teams-agent-{role}"
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))  # exports on its own thread
    trace.set_tracer_provider(provider)
    log.info("OpenTelemetry tracing on: service %s, exporter %s", service, exporter_name or f"otlp ({endpoint})")
    return True


def shutdown() -> None:
    """Flush what is buffered (the provider's shutdown blocks: call it off the event loop)."""
    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def annotate(**attributes: str | int | float | bool) -> None:
    """Set attributes on the current span (a no-op when tracing is off)."""
    trace.get_current_span().set_attributes(attributes)


def carrier() -> dict[str, str]:
    """The current span's context as W3C headers (empty when tracing is off)."""
    headers: dict[str, str] = {}
    propagate.inject(headers)
    return headers


def links(headers: object) -> list[trace.Link]:
    """A link to the span a stored carrier names (none if there is none)."""
    if not isinstance(headers, dict) or not headers:
        return []
    span_context = trace.get_current_span(propagate.extract(headers, context=context.Context())).get_span_context()
    return [trace.Link(span_context)] if span_context.is_valid else []
