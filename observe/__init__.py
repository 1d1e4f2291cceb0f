"""What operators see of the running stages: Prometheus metrics counted per batch, and W3C trace
context carried in Kafka record headers (with OpenTelemetry spans when it is configured).

Below the stages and the transport, above the core: it reads events, never decides anything, and
costs nearly nothing while metrics and tracing are off (every hook returns at once)."""

from nexuscore.observe._metrics import (
    CIRCUIT_LEVELS,
    Tally,
    batch_done,
    enabled,
    reason_class,
    record_circuits,
    record_lag,
    record_sealed,
    serve_metrics,
)
from nexuscore.observe._trace import (
    TRACEPARENT,
    Headers,
    Span,
    configure_tracing,
    event_span,
    header_value,
    output_span,
    parse_traceparent,
    record_spans,
    span_id_of,
    stop_tracing,
    trace_id_of,
    traceparent,
    tracing_enabled,
    valid_trace_id,
    with_trace,
)

__all__ = [
    "CIRCUIT_LEVELS",
    "TRACEPARENT",
    "Headers",
    "Span",
    "Tally",
    "batch_done",
    "configure_tracing",
    "enabled",
    "event_span",
    "header_value",
    "output_span",
    "parse_traceparent",
    "reason_class",
    "record_circuits",
    "record_lag",
    "record_sealed",
    "record_spans",
    "serve_metrics",
    "span_id_of",
    "stop_tracing",
    "trace_id_of",
    "traceparent",
    "tracing_enabled",
    "valid_trace_id",
    "with_trace",
]
