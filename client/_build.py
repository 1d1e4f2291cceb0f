"""Building a request and checking it by the decider's own rules, before it is sent.

Pure: ids, trace and time come in as arguments. The checks are the decider's, in its order:

1. the wire: the event is encoded and decoded again by the same Avro codec and msgspec constraints
   the decider decodes with (``max_output_tokens`` 1..32768, ``complexity`` 0..1, ``latency_slo_ms``
   1..3,600,000, request id 1..128 printable characters, enumerations of risk class and data
   classification, ...); a failure here would be a dead letter;
2. admission (``nexuscore.core.admit``, then the size limit), when the client holds the policy: a
   failure here would be a ``request_rejected`` decision.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import msgspec

from nexuscore.core import Rejection, admit, admit_size, derive_id
from nexuscore.kernel.errors import DecodeError, NexusError
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec, InferenceRequested


class InvalidRequest(NexusError):
    """A request the pipeline would refuse: ``code`` is the decider's reason code (``invalid_request``
    for what it would dead-letter), the message its reason. Raised before anything is sent."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class RequestSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a producer asks for (the envelope is the client's business)."""

    tenant_id: str
    feature: str
    task_type: str
    risk_class: str
    data_classification: str
    prompt: str
    max_output_tokens: int
    required_capabilities: Sequence[str] = ()
    complexity: float | None = None
    latency_slo_ms: int | None = None
    data_subject: str = ""


def request_event_id(tenant_id: str, request_id: str) -> str:
    """A request's event id is a function of (tenant, request id): a retry is the very same event,
    which every stage and the evidence drop as a duplicate."""
    return derive_id(tenant_id, request_id, "inference_requested")


def build_request(
    spec: RequestSpec, *, request_id: str, trace_id: str, now: datetime, producer: str
) -> InferenceRequested:
    """The request event (unchecked: see ``encode_checked``)."""
    fields = msgspec.structs.asdict(spec)
    fields["required_capabilities"] = list(spec.required_capabilities)
    return InferenceRequested(
        event_id=request_event_id(spec.tenant_id, request_id),
        request_id=request_id,
        occurred_at=now,
        producer=producer,
        trace_id=trace_id,
        **fields,
    )


def encode_checked(codec: AvroCodec, request: InferenceRequested, policy: RoutingPolicy | None) -> bytes:
    """The request's wire bytes, once the decider's checks pass; else ``InvalidRequest``."""
    if not request.tenant_id or not request.tenant_id.isprintable() or len(request.tenant_id) > 200:
        # The tenant id is the message key: it must name one tenant.
        raise InvalidRequest(
            "invalid_request", f"tenant id {request.tenant_id!r} is empty, too long or not printable"
        )
    try:
        value = codec.encode(request)
        codec.decode(value, (InferenceRequested,))
    except DecodeError as exc:
        raise InvalidRequest("invalid_request", str(exc)) from exc
    except (TypeError, ValueError, OverflowError, AttributeError) as exc:  # fastavro on a wrong type
        raise InvalidRequest("invalid_request", f"invalid inference_requested.v1: {exc}") from exc
    refused = check_admission(request, policy)
    if refused is not None:
        raise InvalidRequest(refused.code, refused.reason)
    return value


def check_admission(request: InferenceRequested, policy: RoutingPolicy | None) -> Rejection | None:
    """The decider's admission of a well-formed request, under ``policy`` (the size limit alone
    without one)."""
    if policy is not None:
        admitted = admit(request, policy)
        if isinstance(admitted, Rejection):
            return admitted
    return admit_size(request)
