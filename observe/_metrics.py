"""The stages' Prometheus metrics, counted per batch.

A stage hands the events it produced to a ``Tally`` as it goes (a list append, or nothing at all
while metrics are off) and calls ``flush`` once per batch: only then are the events classified and
the counters moved, one ``inc`` per distinct label set. Per-message calls into prometheus-client
cost microseconds each, on the hot path of every request; per batch they cost nearly nothing.

Label values are bounded: tenants and deployments come from the policy (the decider rejects unknown
ones before anything is counted by tenant), and free-text reasons are cut down to their class
(``reason_class``) before they become a label.
"""

from __future__ import annotations

import re
from collections import Counter as Tallies
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from nexuscore.kernel.errors import NexusError
from nexuscore.observe._trace import Span, record_spans, tracing_enabled
from nexuscore.schemas import (
    ActRefused,
    DeadLettered,
    Event,
    ModelCallAttempted,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
)

DECISIONS = Counter(
    "nexuscore_decisions", "Decisions made, by verdict, tier and tenant.", ["verdict", "tier", "tenant"]
)
CONSUMER_LAG = Gauge(
    "nexuscore_consumer_lag",
    "Messages a stage has still to read, per topic partition (high watermark minus position).",
    ["stage", "topic", "partition"],
)
MODEL_CALL_SECONDS = Histogram(
    "nexuscore_model_call_seconds",
    "Latency of one model call (one attempt), by deployment and status.",
    ["deployment", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
OUTCOMES = Counter(
    "nexuscore_outcomes", "Outcomes recorded, by status and deployment.", ["status", "deployment"]
)
CIRCUIT_STATE = Gauge(
    "nexuscore_circuit_state",
    "A worker's circuit per deployment: 0 closed, 1 half-open, 2 open.",
    ["deployment"],
)
BUDGET_UTILISATION = Gauge(
    "nexuscore_budget_utilisation",
    "Share of the day's budget committed at the last decision, per tenant and feature "
    '(feature "*": the tenant\'s whole budget).',
    ["tenant", "feature"],
)
DEAD_LETTERS = Counter(
    "nexuscore_dead_letters", "Input set aside as a dead letter, by stage and reason.", ["stage", "reason"]
)
REFUSALS = Counter(
    "nexuscore_refusals",
    "Requests rejected at admission (kind request) and signed acts refused (kind act), by reason code.",
    ["stage", "kind", "reason"],
)
EVIDENCE_ROWS = Counter("nexuscore_evidence_rows_sealed", "Evidence rows sealed, by table.", ["table"])
EVIDENCE_FILES = Counter("nexuscore_evidence_files_sealed", "Evidence Parquet files sealed.")
EVIDENCE_FLUSHES = Counter("nexuscore_evidence_flushes", "Evidence flushes sealed in the manifest.")

# A runtime that never ends a batch (the faust decider) still has its events counted, this many at a time.
MAX_PENDING = 1000
CIRCUIT_LEVELS = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
_REASON_CLASS = re.compile(r"[^a-z0-9 _-]+")
_MAX_REASON = 48


class _Switch:
    on = False


def enabled() -> bool:
    return _Switch.on


def serve_metrics(port: int, host: str = "0.0.0.0") -> None:  # noqa: S104  # scraped from other hosts
    """Serve /metrics on ``port`` from a daemon thread; 0 leaves metrics off (every hook a no-op)."""
    if port == 0:
        return
    if not 0 < port < 65536:
        raise NexusError(f"--metrics-port must be 0 (off) or a port number, not {port}")
    try:
        start_http_server(port, host)
    except OSError as exc:
        raise NexusError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
    _Switch.on = True


def reason_class(reason: str) -> str:
    """A free-text reason as a bounded label: the words before its first colon (where the quoted
    input starts), lower case, letters and digits only, at most 48 characters."""
    head = reason.split(":", 1)[0].lower()
    return _REASON_CLASS.sub("", head).strip()[:_MAX_REASON] or "unspecified"


class Tally:
    """The events of one stage since its last batch (see the module docstring)."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.events: list[Event] = []
        self.spans: list[Span] = []  # open OpenTelemetry spans, ended when their batch is done

    def span(self, span: Span) -> None:
        if span.otel is not None:
            self.spans.append(span)

    def add(self, event: Event) -> None:
        if _Switch.on:
            self.events.append(event)
            if len(self.events) >= MAX_PENDING:
                self.flush()

    def extend(self, events: Iterable[Event]) -> None:
        if _Switch.on:
            self.events.extend(events)
            if len(self.events) >= MAX_PENDING:
                self.flush()

    def flush(self) -> None:
        """Move the counters by this batch's events, one call per distinct label set; end its spans."""
        if self.spans:
            spans, self.spans = self.spans, []
            for s in spans:
                s.end()
        if not self.events:
            return
        events, self.events = self.events, []
        counted: Tallies[tuple[Any, ...]] = Tallies()
        for e in events:
            _classify(e, counted, self.stage)
        for (metric, *labels), n in counted.items():
            metric.labels(*labels).inc(n)
        for e in events:
            if isinstance(e, ModelCallAttempted):
                MODEL_CALL_SECONDS.labels(e.deployment_id, e.status).observe(e.latency_ms / 1000)
            elif isinstance(e, RequestDecided):
                _utilisation(e)


def _classify(e: Event, counted: Tallies[tuple[Any, ...]], stage: str) -> None:
    if isinstance(e, RequestDecided):
        counted[(DECISIONS, e.verdict, e.routing.tier or "none", e.tenant_id)] += 1
    elif isinstance(e, RequestRejected):
        # A tenant the policy does not know is the sender's word only: one label for all of them.
        tenant = "unknown" if e.reason_code == "unknown_tenant" else e.tenant_id
        counted[(DECISIONS, "rejected", "none", tenant)] += 1
        counted[(REFUSALS, stage, "request", e.reason_code)] += 1
    elif isinstance(e, OutcomeRecorded):
        counted[(OUTCOMES, e.status, e.deployment_id)] += 1
    elif isinstance(e, DeadLettered):
        counted[(DEAD_LETTERS, stage, reason_class(e.reason))] += 1
    elif isinstance(e, ActRefused):
        counted[(REFUSALS, stage, "act", e.code)] += 1


def _utilisation(e: RequestDecided) -> None:
    """What the decision left committed: what was before it, plus its own reservation if it made one."""
    b = e.budget
    added = b.estimated_cost_micros if b.action in ("reserved", "downgraded") else 0
    if b.tenant_budget_micros:
        BUDGET_UTILISATION.labels(e.tenant_id, "*").set(
            (b.tenant_committed_micros + added) / b.tenant_budget_micros
        )
    if b.feature_budget_micros:
        BUDGET_UTILISATION.labels(e.tenant_id, e.feature).set(
            (b.feature_committed_micros + added) / b.feature_budget_micros
        )


def record_lag(stage: str, consumer: Any, fetched: Mapping[Any, list[Any]]) -> None:
    """Consumer lag of the partitions of one fetch: their high watermark minus the next offset
    (``consumer``: an aiokafka consumer, which keeps the high watermarks of what it fetched)."""
    if not _Switch.on:
        return
    for tp, records in fetched.items():
        if not records:
            continue
        high = consumer.highwater(tp)
        if high is not None:
            CONSUMER_LAG.labels(stage, tp.topic, str(tp.partition)).set(max(0, high - records[-1].offset - 1))


def record_circuits(states: Mapping[str, str]) -> None:
    """A worker's circuit per deployment (``states``: deployment -> closed, half_open or open)."""
    if not _Switch.on:
        return
    for deployment, state in states.items():
        CIRCUIT_STATE.labels(deployment).set(CIRCUIT_LEVELS.get(state, -1.0))


def record_sealed(rows: Mapping[str, int], files: int) -> None:
    """One evidence flush: rows sealed per table, and how many files."""
    if not _Switch.on:
        return
    for table, n in rows.items():
        EVIDENCE_ROWS.labels(table).inc(n)
    EVIDENCE_FILES.inc(files)
    EVIDENCE_FLUSHES.inc()


def batch_done(
    tally: Tally,
    stage: str,
    consumer: Any,
    fetched: Mapping[Any, list[Any]],
    circuits: Mapping[str, Any] | None = None,
) -> None:
    """The one call a stage makes per batch: its events counted, its lag and circuits recorded
    (``circuits``: deployment -> breaker, anything with a ``state``)."""
    if tracing_enabled():
        tally.flush()
        record_spans(
            stage, f"nexuscore.{stage}.receive", (r for records in fetched.values() for r in records)
        )
    if not _Switch.on:
        return
    tally.flush()
    record_lag(stage, consumer, fetched)
    if circuits:
        record_circuits({d: b.state for d, b in circuits.items()})
