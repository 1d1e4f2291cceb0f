"""The decision: admission -> residency -> routing -> escalation -> budget -> decode.

``decide`` is a pure function of (request, policy, budget state): no I/O, no clock, no randomness.
Every rule that fires and every alternative rejected is written down as a ``Reason``.

It composes three stages:

- ``route`` (``core/_route.py``): admission, residency, routing and the escalation verdict, from the
  request's decision-relevant attributes (``route_key``) and the policy alone, so cacheable;
- ``budget_stage`` (``core/_budget_stage.py``): the budget window's committed amounts;
- ``decode_stage`` (``core/_decode_stage.py``): the Latency Controller's observations.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from nexuscore.core._admit import MAX_PROMPT_BYTES, Rejection, admit, admit_size, estimate_input_tokens
from nexuscore.core._budget import BudgetState, Window
from nexuscore.core._budget_stage import BudgetAction, Budgeted, budget_decision, budget_stage
from nexuscore.core._decode_stage import Decoded, LatencyView, decode_stage
from nexuscore.core._route import Route, estimate_complexity, matches, route, routing_confidence
from nexuscore.policy import Deployment, RoutingPolicy
from nexuscore.schemas import (
    BudgetDecision,
    DecodeDecision,
    InferenceRequested,
    Reason,
    ResidencyDecision,
    RoutingDecision,
    Verdict,
)

__all__ = [
    "MAX_PROMPT_BYTES",
    "Decision",
    "LatencyView",
    "Rejection",
    "admit",
    "admit_size",
    "decide",
    "decide_on_route",
    "estimate_complexity",
    "estimate_input_tokens",
    "matches",
    "routing_confidence",
]


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    """Everything decided for an admitted request."""

    verdict: Verdict
    verdict_reason: str
    residency: ResidencyDecision
    routing: RoutingDecision
    budget: BudgetDecision
    decode: DecodeDecision | None
    reasons: tuple[Reason, ...]
    deployment: Deployment | None
    input_tokens: int
    day: str
    # Where the worker may fail over to, in order, with the decode strategy chosen for each.
    fallbacks: tuple[tuple[Deployment, str], ...] = ()
    # For an escalation: how long a person has to decide.
    review_deadline_s: int = 0
    # The operator switch that shaped it ("off", "offline"), or "" when none did: a fact of its own,
    # so that replay applies the switch's effect without reading it back out of prose.
    control_mode: str = ""

    @property
    def chain(self) -> tuple[Deployment, ...]:
        """The deployment to call, then where to fail over to."""
        return (self.deployment, *(d for d, _ in self.fallbacks)) if self.deployment else ()


def decide(
    request: InferenceRequested,
    policy: RoutingPolicy,
    state: BudgetState,
    now: datetime,
    *,
    latency: LatencyView | None = None,
    approved_by: str = "",
) -> Rejection | Decision:
    """Decide one request at time ``now``. Pure: the same inputs always give the same decision.

    The budget window is the UTC day of ``now`` (the decider's clock), never the caller's own
    timestamp: a request dated in the future must not open a fresh budget. ``latency`` is what the
    Latency Controller has observed of each deployment; ``approved_by`` names the reviewer who
    approved an escalated request, which then skips the escalation stage.
    """
    routed = route(request, policy)
    if isinstance(routed, Rejection):
        return routed
    return decide_on_route(routed, request, state, now, latency=latency, approved_by=approved_by)


def decide_on_route(
    routed: Route,
    request: InferenceRequested,
    state: BudgetState,
    now: datetime,
    *,
    latency: LatencyView | None = None,
    approved_by: str = "",
) -> Decision:
    """The rest of ``decide`` once ``route(request, policy)`` (or a ``RouteCache``) gave ``routed``:
    escalation, budget and decode. Of ``request`` it reads only ``latency_slo_ms``."""
    day = now.date().isoformat()
    window = state.window(day)
    chosen = routed.chosen
    if chosen is None:
        return _no_eligible_deployment(routed, day, window)
    if not approved_by and routed.escalation is not None:
        return _escalated(routed, day, window, chosen)
    reasons = routed.reasons
    if approved_by:
        approval = Reason(
            stage="escalation", kind="note", subject="review", detail=f"approved by {approved_by}"
        )
        reasons = (*reasons, approval)
    budgeted = budget_stage(routed, window)
    if budgeted.fitting is None:
        return _budget_exhausted(routed, day, window, chosen, (*reasons, *budgeted.reasons))
    slo = request.latency_slo_ms or routed.feature_slo_ms
    decoded = decode_stage(budgeted.chain, slo, routed.max_output_tokens, latency)
    return _dispatched(routed, day, window, (*reasons, *budgeted.reasons), budgeted, decoded)


def _decision(
    routed: Route,
    day: str,
    verdict: Verdict,
    why: str,
    budget: BudgetDecision,
    reasons: tuple[Reason, ...],
    *,
    deployment: Deployment | None = None,
    decode: DecodeDecision | None = None,
    fallbacks: tuple[tuple[Deployment, str], ...] = (),
    review_deadline_s: int = 0,
) -> Decision:
    routing = routed.routing
    if deployment is not None and (deployment.id != routing.deployment_id or fallbacks):
        routing = msgspec.structs.replace(
            routing, deployment_id=deployment.id, fallbacks=[f.id for f, _ in fallbacks]
        )
    return Decision(
        verdict=verdict,
        verdict_reason=why,
        residency=routed.residency,
        routing=routing,
        budget=budget,
        decode=decode,
        reasons=reasons,
        deployment=deployment,
        input_tokens=routed.input_tokens,
        day=day,
        fallbacks=fallbacks,
        review_deadline_s=review_deadline_s,
    )


def _no_eligible_deployment(routed: Route, day: str, window: Window) -> Decision:
    regions = ", ".join(routed.residency.allowed_regions)
    preferred = routed.routing.preferred_tier
    why = f"no deployment in {regions} meets tier {preferred} and the request's needs"
    budget = budget_decision(routed, day, window, "not_applicable", None, 0)
    return _decision(routed, day, "denied", "no_eligible_deployment: " + why, budget, routed.reasons)


def _escalated(routed: Route, day: str, window: Window, chosen: Deployment) -> Decision:
    escalation = routed.escalation
    assert escalation is not None
    budget = budget_decision(routed, day, window, "not_applicable", chosen, routed.cost(chosen))
    reasons = (*routed.reasons, escalation.reason)
    return _decision(
        routed, day, "escalated", escalation.why, budget, reasons, review_deadline_s=escalation.deadline_s
    )


def _budget_exhausted(
    routed: Route, day: str, window: Window, chosen: Deployment, reasons: tuple[Reason, ...]
) -> Decision:
    why = f"budget_exhausted: no eligible deployment fits the {day} budget of {routed.tenant_id}/{routed.feature}"
    budget = budget_decision(routed, day, window, "denied", chosen, routed.cost(chosen))
    return _decision(routed, day, "denied", why, budget, reasons)


def _dispatched(
    routed: Route,
    day: str,
    window: Window,
    reasons: tuple[Reason, ...],
    budgeted: Budgeted,
    decoded: Decoded,
) -> Decision:
    picked, fallbacks = decoded.picked, decoded.fallbacks
    # The reservation covers the dearest deployment the worker may fail over to, so a failover can
    # never spend more than was held.
    reserved = max(routed.cost(d) for d in budgeted.chain)
    reasons = (*reasons, *decoded.reasons)
    if fallbacks:
        detail = f"may fail over to {', '.join(d.id for d, _ in fallbacks)}; {reserved} micro-USD held"
        reasons = (*reasons, Reason(stage="routing", kind="note", subject="failover", detail=detail))
    action: BudgetAction = budgeted.action
    return _decision(
        routed, day, "dispatch", f"{action} on {picked.id} ({picked.tier}, {picked.region})",
        budget_decision(routed, day, window, action, picked, reserved), reasons,
        deployment=picked, decode=decoded.decode, fallbacks=fallbacks,
    )  # fmt: skip
