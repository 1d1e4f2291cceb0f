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

__all__ = [
    "CIRCUIT_LEVELS",
    "Tally",
    "batch_done",
    "enabled",
    "reason_class",
    "record_circuits",
    "record_lag",
    "record_sealed",
    "serve_metrics",
]
