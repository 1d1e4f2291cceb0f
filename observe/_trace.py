"""W3C trace context across the stages, and OpenTelemetry spans when it is configured.

One request is one trace. Its trace id is the request's ``trace_id`` field when that is a valid W3C
trace id (the SDK and the gateway set it to the id of the ``traceparent`` header they send), else one
derived from the tenant and request id: every event of the request carries it (``envelope_from``),
so the evidence rows' ``trace_id`` is the trace's id. Span ids are derived from the stage and the
event a span handled, so a stage re-processing an input after a crash makes the same span again,
and a stage can name its parent's span from the event alone when a record carries no header.

Each stage puts ``traceparent: 00-<trace id>-<its span id>-01`` on the records it produces (and the
worker on its provider calls); the next stage's span is that span's child. Spans are exported only
when OpenTelemetry is configured (``configure_tracing``: the standard OTEL_* environment
variables); otherwise nothing is built and the hooks return at once.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from nexuscore.kernel.errors import NexusError
from nexuscore.schemas import Event

TRACEPARENT = "traceparent"
Headers = list[tuple[str, bytes]]
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


class _Tracing:
    on = False


def tracing_enabled() -> bool:
    return _Tracing.on


def valid_trace_id(value: str) -> bool:
    return bool(_HEX32.fullmatch(value)) and value != _ZERO_TRACE


def parse_traceparent(value: bytes | str | None) -> tuple[str, str] | None:
    """(trace id, parent span id) of a valid W3C ``traceparent`` (version 00 read as the spec says,
    any later version by its first four fields), else None."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    found = _TRACEPARENT.match(text.strip()[:256])
    if found is None or found[1] == "ff" or found[2] == _ZERO_TRACE or found[3] == _ZERO_SPAN:
        return None
    if found[1] == "00" and len(text.strip()) != 55:
        return None
    return found[2], found[3]


def trace_id_of(trace_id: str, tenant_id: str, request_id: str) -> str:
    """The request's trace id: its own if valid, else derived from its tenant and id (stable)."""
    if valid_trace_id(trace_id):
        return trace_id
    return hashlib.sha256(f"trace\x1f{tenant_id}\x1f{request_id}".encode()).hexdigest()[:32]


def span_id_of(stage: str, event_id: str) -> str:
    """The span id of ``stage`` handling (or producing) the event ``event_id``."""
    digest = hashlib.sha256(f"{stage}\x1f{event_id}".encode()).hexdigest()
    return digest[:16] if digest[:16] != _ZERO_SPAN else digest[16:32]


def traceparent(trace_id: str, span_id: str) -> str:
    return f"00-{trace_id}-{span_id}-01"


def header_value(headers: Sequence[tuple[str, bytes]] | None, name: str = TRACEPARENT) -> bytes | None:
    for key, value in headers or ():
        if key == name:
            return value
    return None


# --- spans (only when OpenTelemetry is configured) ---------------------------------------------------


def configure_tracing(service: str, provider: Any = None) -> bool:
    """Export spans if OpenTelemetry is configured: ``provider`` (a TracerProvider, for tests), or
    the standard environment variables (OTEL_TRACES_EXPORTER=otlp|console|none, OTEL_EXPORTER_OTLP_*,
    OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER, OTEL_SDK_DISABLED). True if
    spans are on; NexusError for an exporter this build cannot provide."""
    if provider is None:
        provider = _provider_from_environment(service)
    if provider is None:
        return False
    trace.set_tracer_provider(provider)
    _Tracing.on = True
    return True


def stop_tracing() -> None:
    """No more spans from this process (the provider set stays; OpenTelemetry allows one)."""
    _Tracing.on = False


def _provider_from_environment(service: str) -> Any:
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    disabled = os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true"
    if disabled or exporter_name == "none" or not (exporter_name or endpoint):
        return None
    # The SDK only when asked for: the API alone costs nothing.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": f"nexuscore-{service}"}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter_name == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        return provider
    if exporter_name not in ("", "otlp"):
        raise NexusError(
            f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported: use otlp, console or none"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
            OTLPSpanExporter,
        )
    except ImportError:
        raise NexusError(
            "OTLP export needs the exporter package: pip install 'nexuscore[otlp]' "
            "(or set OTEL_TRACES_EXPORTER=console)"
        ) from None
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider


class Span:
    """A stage's span over one input: its id goes into the headers of what it produces. With
    OpenTelemetry on it is a real span (``end`` exports it); off, only a derived id, and nothing else."""

    __slots__ = ("otel", "span_id", "trace_id")

    def __init__(self, trace_id: str, span_id: str, otel: Any = None) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.otel = otel

    @property
    def traceparent(self) -> str:
        return traceparent(self.trace_id, self.span_id)

    @property
    def headers(self) -> Headers:
        return [(TRACEPARENT, self.traceparent.encode())]

    def end(self, end_ns: int | None = None) -> None:
        if self.otel is not None:
            self.otel.end(end_time=end_ns)


def start_span(
    stage: str,
    name: str,
    trace_id: str,
    parent_span_id: str,
    handled_id: str,
    attributes: Mapping[str, str | int | float] | None = None,
    start_ns: int | None = None,
) -> Span:
    """``stage``'s span over the input ``handled_id``, child of ``parent_span_id`` in ``trace_id``."""
    if not _Tracing.on:
        return Span(trace_id, span_id_of(stage, handled_id))
    parent = SpanContext(
        trace_id=int(trace_id, 16), span_id=int(parent_span_id, 16), is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )  # fmt: skip
    otel = trace.get_tracer("nexuscore").start_span(
        name,
        context=trace.set_span_in_context(NonRecordingSpan(parent)),
        kind=SpanKind.CONSUMER,
        start_time=start_ns,
        attributes={"nexuscore.stage": stage, **(attributes or {})},
    )
    span_id = otel.get_span_context().span_id
    return Span(trace_id, f"{span_id:016x}" if span_id else span_id_of(stage, handled_id), otel)


def with_trace(event: Event) -> Event:
    """The event with its request's trace id (its own when valid, else the derived one)."""
    if valid_trace_id(event.trace_id):
        return event
    return msgspec.structs.replace(
        event, trace_id=trace_id_of(event.trace_id, event.tenant_id, event.request_id)
    )


def output_span(stage: str, name: str, first: Event) -> Span:
    """``stage``'s span over the input whose first output is ``first`` (its cause: ``causation_id``)."""
    trace_id = trace_id_of(first.trace_id, first.tenant_id, first.request_id)
    handled = first.causation_id or first.event_id
    attributes = {"nexuscore.tenant_id": first.tenant_id, "nexuscore.request_id": first.request_id}
    return start_span(stage, name, trace_id, span_id_of("producer", handled), handled, attributes)


def event_span(
    stage: str, name: str, cause: Event, headers: Sequence[tuple[str, bytes]] | None = None
) -> Span:
    """``stage``'s span over the event ``cause``: a child of the span named by the record's
    ``traceparent`` when it is valid and of the request's trace, else of the cause's producer."""
    trace_id = trace_id_of(cause.trace_id, cause.tenant_id, cause.request_id)
    context = parse_traceparent(header_value(headers))
    parent = (
        context[1]
        if context is not None and context[0] == trace_id
        else span_id_of("producer", cause.event_id)
    )
    attributes = {"nexuscore.tenant_id": cause.tenant_id, "nexuscore.request_id": cause.request_id}
    return start_span(stage, name, trace_id, parent, cause.event_id, attributes)


def record_spans(stage: str, name: str, records: Iterable[Any]) -> None:
    """A span per consumed record that carries a valid ``traceparent``: child of its producer's span."""
    if not _Tracing.on:
        return
    for r in records:
        context = parse_traceparent(header_value(r.headers))
        if context is not None:
            attributes = {"messaging.destination.name": r.topic, "messaging.kafka.offset": r.offset}
            start_span(stage, name, context[0], context[1], f"{r.topic}/{r.offset}", attributes).end()
