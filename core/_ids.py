"""Deterministic ids: an event's id is derived from its cause, so redelivery repeats it exactly."""

from __future__ import annotations

import hashlib
from datetime import datetime

from nexuscore.schemas import Envelope, Event


def derive_id(*parts: str | int) -> str:
    """A 32-hex-digit id from the cause's id and what is derived from it."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]


def envelope_from(
    cause: Event,
    *parts: str | int,
    producer: str,
    now: datetime,
    policy_digest: str | None = None,
    root: str | None = None,
) -> Envelope:
    """The envelope of an event caused by ``cause``: same request, tenant and trace.

    Its id is derived from the tenant, ``root`` (default: the cause's event id) and ``parts``: ids
    that clients choose (request ids, event ids) are unique only per tenant, so every id derived
    from one is scoped by its tenant, and two tenants using the same request id never collide.
    """
    return Envelope(
        event_id=derive_id(cause.tenant_id, root or cause.event_id, *parts),
        request_id=cause.request_id,
        tenant_id=cause.tenant_id,
        occurred_at=now,
        producer=producer,
        causation_id=cause.event_id,
        trace_id=cause.trace_id,
        policy_digest=cause.policy_digest if policy_digest is None else policy_digest,
    )
