"""The producer SDK: build a request, check it by the decider's own rules, publish it keyed by its
tenant with a W3C ``traceparent``, and await its terminal state over one shared consumer.

``NexusClient`` is async; ``SyncNexusClient`` wraps it for blocking code. Above schemas, policy, core
and transport; never imports the stream runtime.
"""

from nexuscore.client._build import (
    InvalidRequest,
    RequestSpec,
    build_request,
    encode_checked,
    request_event_id,
)
from nexuscore.client._client import ClientStats, NexusClient, ResultTimeout, Sent
from nexuscore.client._results import RESULT_EVENTS, TERMINAL, Result, Status, fold
from nexuscore.client._sync import SyncNexusClient
from nexuscore.client._trace import TraceContext, child_context, parse_traceparent

__all__ = [
    "RESULT_EVENTS",
    "TERMINAL",
    "ClientStats",
    "InvalidRequest",
    "NexusClient",
    "RequestSpec",
    "Result",
    "ResultTimeout",
    "Sent",
    "Status",
    "SyncNexusClient",
    "TraceContext",
    "build_request",
    "child_context",
    "encode_checked",
    "fold",
    "parse_traceparent",
    "request_event_id",
]
