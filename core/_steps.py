"""The pure steps the decision agent and replay share: (state, input) -> (state, events).

Time (``now``) and the producer's name come in as data; ids are derived from the input's id.
"""

from __future__ import annotations

from datetime import datetime

from nexuscore.core._budget import BudgetState, Reservation, bump, release, reserve, settle
from nexuscore.core._decide import Decision, Rejection, decide
from nexuscore.core._ids import envelope_from
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import (
    BudgetSettled,
    DispatchRequested,
    Event,
    InferenceRequested,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ShadowDecisionRecorded,
)


def decision_event(
    request: InferenceRequested,
    result: Rejection | Decision,
    policy: RoutingPolicy,
    state_version: int,
    producer: str,
    now: datetime,
    stage: str = "active",
) -> RequestRejected | RequestDecided:
    # Derived from the request id, not the event id: a client that retries a request under a new
    # event id gets the same decision ids, so one request never has two terminal states.
    common = envelope_from(
        request, "decision", producer=producer, now=now, policy_digest=policy.digest, root=request.request_id
    )
    if isinstance(result, Rejection):
        return RequestRejected(
            **common,
            reason_code=result.code,
            reason=result.reason,
            policy_version=policy.version,
            policy_stage=stage,
        )
    return RequestDecided(
        **common,
        verdict=result.verdict,
        verdict_reason=result.verdict_reason,
        policy_version=policy.version,
        feature=request.feature,
        residency=result.residency,
        routing=result.routing,
        budget=result.budget,
        decode=result.decode,
        reasons=list(result.reasons),
        state_version=state_version,
        policy_stage=stage,
    )


def dispatch_event(
    request: InferenceRequested, decision: Decision, decided: RequestDecided, producer: str, now: datetime
) -> DispatchRequested:
    d = decision.deployment
    assert d is not None and decision.decode is not None
    envelope = envelope_from(decided, "dispatch", producer=producer, now=now)
    return DispatchRequested(
        **envelope,
        feature=request.feature,
        deployment_id=d.id,
        provider=d.provider,
        endpoint=d.endpoint,
        model=d.model,
        region=d.region,
        allowed_regions=decision.residency.allowed_regions,
        decode_strategy=decision.decode.strategy,
        prompt=request.prompt,
        max_output_tokens=request.max_output_tokens,
        input_price_micros_per_1k=d.input_micros_per_1k,
        output_price_micros_per_1k=d.output_micros_per_1k,
        estimated_cost_micros=decision.budget.estimated_cost_micros,
        idempotency_key=envelope["event_id"],
        requested_at=request.occurred_at,
        data_subject=request.data_subject,
    )


def on_request(
    state: BudgetState,
    request: InferenceRequested,
    policy: RoutingPolicy,
    producer: str,
    now: datetime,
    held: Reservation | None = None,
    stage: str = "active",
) -> tuple[BudgetState, Reservation | None, list[Event]]:
    """Decide a request and fold the decision into the budget state.

    Returns the new state, the reservation to keep until the outcome (or None), and the events.
    ``held`` is the reservation already kept for this request: a redelivered request is decided
    again against the state without its own reservation, and re-emits its decision (same event
    ids, dropped downstream) without holding the budget twice.
    """
    result = decide(request, policy, release(state, held) if held is not None else state, now)
    decided = decision_event(request, result, policy, state.version, producer, now, stage)
    if isinstance(result, Rejection):
        return state, None, [decided]
    assert isinstance(decided, RequestDecided)
    if result.verdict != "dispatch":
        return bump(state), None, [decided]
    events: list[Event] = [decided, dispatch_event(request, result, decided, producer, now)]
    if held is not None:
        return state, held, events
    reservation = Reservation(
        day=result.day, feature=request.feature, amount=result.budget.estimated_cost_micros
    )
    return reserve(state, reservation), reservation, events


def on_outcome(
    state: BudgetState, held: Reservation | None, outcome: OutcomeRecorded, producer: str, now: datetime
) -> tuple[BudgetState, list[Event]]:
    """Settle the request's reservation with its actual cost; without one (a duplicate), do nothing."""
    if held is None:
        return state, []
    version = state.version
    new_state, settlement = settle(state, held, outcome.cost_micros)
    event = BudgetSettled(
        **envelope_from(outcome, "settlement", producer=producer, now=now),
        feature=settlement.feature,
        window=settlement.day,
        reserved_micros=settlement.reserved,
        actual_micros=settlement.actual,
        tenant_spent_micros=settlement.tenant_spent,
        feature_spent_micros=settlement.feature_spent,
        state_version=version,
    )
    return new_state, [event]


def shadow_event(
    state: BudgetState,
    request: InferenceRequested,
    shadow: RoutingPolicy,
    decided: RequestDecided | RequestRejected,
    producer: str,
    now: datetime,
    held: Reservation | None = None,
) -> ShadowDecisionRecorded:
    """What ``shadow`` would have decided, against the same budget state: recorded, never enforced."""
    result = decide(request, shadow, release(state, held) if held is not None else state, now)
    envelope = envelope_from(
        request,
        "shadow",
        shadow.digest,
        producer=producer,
        now=now,
        policy_digest=shadow.digest,
        root=request.request_id,
    )
    if isinstance(result, Rejection):
        verdict, reason, tier, deployment, cost, strategy, regions = (
            "rejected", result.reason, None, None, 0, None, [],
        )  # fmt: skip
    else:
        verdict, reason = result.verdict, result.verdict_reason
        tier, deployment = result.budget.tier, result.budget.deployment_id
        cost, regions = result.budget.estimated_cost_micros, result.residency.allowed_regions
        strategy = result.decode.strategy if result.decode is not None else None
    active: tuple[str, str | None] = (
        (decided.verdict, decided.budget.deployment_id)
        if isinstance(decided, RequestDecided)
        else ("rejected", None)
    )
    return ShadowDecisionRecorded(
        **envelope,
        active_digest=decided.policy_digest,
        policy_version=shadow.version,
        verdict=verdict,
        verdict_reason=reason,
        tier=tier,
        deployment_id=deployment,
        estimated_cost_micros=cost,
        decode_strategy=strategy,
        allowed_regions=list(regions),
        differs=(verdict, deployment) != active,
    )
