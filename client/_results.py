"""What a request's events say about it, folded into one ``Result``.

The terminal states are the evidence's (``terminal_states`` in ``nexuscore.projections``): an
outcome (answered or failed) on ``nexus.outcomes``; on ``nexus.decisions`` a rejection, a decision
denied, or an escalation resolved other than ``dispatched`` (denied, timed_out, refused). A decision
to dispatch, an escalation, and an escalation resolved ``dispatched`` (approved: it resumes) are
on the way. Pure: ``fold`` never raises, and a state already terminal never changes, so a
re-emitted or late event cannot rewrite an answer.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from nexuscore.schemas import EscalationResolved, Event, OutcomeRecorded, RequestDecided, RequestRejected

Status = Literal["dispatched", "escalated", "answered", "denied", "rejected", "failed"]
TERMINAL: frozenset[str] = frozenset({"answered", "denied", "rejected", "failed"})
# The events that say something about a request's state; everything else on the topics is not.
RESULT_EVENTS = (RequestRejected, RequestDecided, EscalationResolved, OutcomeRecorded)


class Result(msgspec.Struct, frozen=True, kw_only=True):
    """Where one request stands. ``reason_code``/``reason``: why it was rejected, denied or failed
    (``budget_exhausted`` and ``kill_switch`` are denials of those kinds; ``escalation_denied``,
    ``escalation_timed_out`` and ``escalation_refused`` end an escalation)."""

    tenant_id: str
    request_id: str
    status: Status
    trace_id: str = ""
    reason_code: str = ""
    reason: str = ""
    policy_version: str = ""
    # escalations: when it ends with a timeout unless a person decides, and how it was resolved
    escalated: bool = False
    # The decision's event id: a reviewer's signed review names it (``causation_id``).
    decision_id: str = ""
    review_deadline: datetime | None = None
    resolution: str = ""
    # outcomes
    response: str = ""
    finish_reason: str = ""
    model: str = ""
    deployment_id: str = ""
    region: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cost_micros: int = 0
    latency_ms: float = 0.0
    cached: bool = False
    occurred_at: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def fold(current: Result | None, event: Event) -> Result | None:
    """The result after ``event`` (``current`` itself when the event changes nothing)."""
    if current is not None and current.terminal:
        return current
    base = current or Result(tenant_id=event.tenant_id, request_id=event.request_id, status="dispatched")
    base = msgspec.structs.replace(
        base, trace_id=base.trace_id or event.trace_id, occurred_at=event.occurred_at
    )
    if isinstance(event, RequestRejected):
        return msgspec.structs.replace(
            base, status="rejected", reason_code=event.reason_code, reason=event.reason,
            policy_version=event.policy_version,
        )  # fmt: skip
    if isinstance(event, RequestDecided):
        return _decided(current, base, event)
    if isinstance(event, EscalationResolved):
        return _resolved(base, event)
    if isinstance(event, OutcomeRecorded):
        return _outcome(base, event)
    return current


def _decided(current: Result | None, base: Result, event: RequestDecided) -> Result | None:
    if current is not None and current.resolution:
        return current  # a redelivered decision after the escalation it made was resolved
    common = {
        "policy_version": event.policy_version,
        "deployment_id": event.routing.deployment_id or "",
        "reason": event.verdict_reason,
        "decision_id": event.event_id,
    }
    if event.verdict == "escalated":
        return msgspec.structs.replace(
            base, status="escalated", escalated=True, review_deadline=event.review_deadline, **common
        )
    if event.verdict == "denied":
        code = (
            "budget_exhausted"
            if event.budget.action == "denied"
            else "kill_switch"
            if event.control_mode
            else "denied"
        )
        return msgspec.structs.replace(base, status="denied", reason_code=code, **common)
    return msgspec.structs.replace(base, status="dispatched", **common)


def _resolved(base: Result, event: EscalationResolved) -> Result:
    if event.resolution == "dispatched":
        return msgspec.structs.replace(
            base, status="dispatched", escalated=True, resolution="dispatched",
            deployment_id=event.deployment_id or base.deployment_id,
        )  # fmt: skip
    return msgspec.structs.replace(
        base, status="denied", escalated=True, resolution=event.resolution,
        reason_code=f"escalation_{event.resolution}",
        reason=event.review_reason or event.verdict_reason,
    )  # fmt: skip


def _outcome(base: Result, event: OutcomeRecorded) -> Result:
    return msgspec.structs.replace(
        base,
        status=event.status,
        reason_code="provider_failed" if event.status == "failed" else "",
        reason=event.error if event.status == "failed" else base.reason,
        response=event.response,
        finish_reason=event.finish_reason,
        model=event.model,
        deployment_id=event.deployment_id,
        region=event.region,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cost_micros=event.cost_micros,
        latency_ms=event.latency_ms,
        cached=event.cached,
    )
