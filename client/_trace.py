"""The trace context a producer publishes with (``traceparent``): the stages put one request's
events in one trace, whose trace id is the request's ``trace_id`` field. Parsing and the header's
form are ``nexuscore.observe``'s (the stages read it with the same functions).

Pure: the random ids come in as arguments (the client draws them).
"""

from __future__ import annotations

import msgspec

from nexuscore import observe


class TraceContext(msgspec.Struct, frozen=True):
    """The trace a request belongs to and the span that published it."""

    trace_id: str
    span_id: str

    @property
    def traceparent(self) -> str:
        # Sampled: a governed request is always worth its trace.
        return observe.traceparent(self.trace_id, self.span_id)


def parse_traceparent(value: str) -> TraceContext | None:
    """The caller's trace context, or None when the header is malformed (the spec says: ignore it
    and start a new trace, never fail the request for it)."""
    # Only version 00 is continued: the client writes version 00, and a later version's other
    # fields cannot be carried into it.
    parsed = observe.parse_traceparent(value) if value.strip().startswith("00-") else None
    return None if parsed is None else TraceContext(*parsed)


def child_context(caller: str | None, new_trace_id: str, new_span_id: str) -> TraceContext:
    """The context to publish with: the caller's trace (if it sent a valid one) or a new trace, and
    a new span id of our own (the publish is a span; the stages' spans are its children)."""
    parent = parse_traceparent(caller) if caller else None
    return TraceContext(parent.trace_id if parent else new_trace_id, new_span_id)
