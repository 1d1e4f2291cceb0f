"""W3C trace context (``traceparent``): the one header a producer sets so that the stages can put
one request's events in one trace, and whose trace id is the request's ``trace_id`` field.

Pure: the random ids come in as arguments (the client draws them).
"""

from __future__ import annotations

import re

import msgspec

# version 00, 32 hex trace id, 16 hex parent (span) id, 2 hex flags; lowercase only (the spec's).
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


class TraceContext(msgspec.Struct, frozen=True):
    """The trace a request belongs to and the span that published it."""

    trace_id: str
    span_id: str

    @property
    def traceparent(self) -> str:
        # Sampled: a governed request is always worth its trace.
        return f"00-{self.trace_id}-{self.span_id}-01"


def parse_traceparent(value: str) -> TraceContext | None:
    """The caller's trace context, or None when the header is malformed (the spec says: ignore it
    and start a new trace, never fail the request for it)."""
    m = _TRACEPARENT.match(value.strip())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
        return None
    return TraceContext(m.group(1), m.group(2))


def child_context(caller: str | None, new_trace_id: str, new_span_id: str) -> TraceContext:
    """The context to publish with: the caller's trace (if it sent a valid one) or a new trace, and
    a new span id of our own (the publish is a span; the stages' spans are its children)."""
    parent = parse_traceparent(caller) if caller else None
    return TraceContext(parent.trace_id if parent else new_trace_id, new_span_id)
