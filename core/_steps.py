"""The pure steps the decision agent and replay share: (state, input) -> (state, events).

Time (``now``) and the producer's name come in as data; ids are derived from the input's id.
"""

from __future__ import annotations

from datetime import datetime

from nexuscore.core._budget import BudgetState, bump, reserve, settle
from nexuscore.core._decide import Decision, Rejection, decide
from nexuscore.core._ids import derive_id
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import (
    BudgetSettled,
    DispatchRequested,
    Envelope,
    Event,
    InferenceRequested,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
)


def decision_event(
    request: InferenceRequested,
    result: Rejection | Decision,
    policy: RoutingPolicy,
    state_version: int,
    producer: str,
    now: datetime,
) -> RequestRejected | RequestDecided:
    common = Envelope(
        event_id=derive_id(request.event_id, "decision"),
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        occurred_at=now,
        producer=producer,
        causation_id=request.event_id,
        trace_id=request.trace_id,
        policy_digest=policy.digest,
    )
    if isinstance(result, Rejection):
        return RequestRejected(
            **common, reason_code=result.code, reason=result.reason, policy_version=policy.version
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
    )


def dispatch_event(
    request: InferenceRequested, decision: Decision, decided: RequestDecided, producer: str, now: datetime
) -> DispatchRequested:
    d = decision.deployment
    assert d is not None and decision.decode is not None
    event_id = derive_id(request.event_id, "dispatch")
    return DispatchRequested(
        event_id=event_id,
        request_id=request.request_id,
        tenant_id=request.tenant_id,
        occurred_at=now,
        producer=producer,
        causation_id=decided.event_id,
        trace_id=request.trace_id,
        policy_digest=decided.policy_digest,
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
        idempotency_key=event_id,
        requested_at=request.occurred_at,
    )


def on_request(
    state: BudgetState, request: InferenceRequested, policy: RoutingPolicy, producer: str, now: datetime
) -> tuple[BudgetState, list[Event]]:
    """Decide a request and fold the decision into the budget state."""
    result = decide(request, policy, state)
    decided = decision_event(request, result, policy, state.version, producer, now)
    if isinstance(result, Rejection):
        return state, [decided]
    assert isinstance(decided, RequestDecided)
    if result.verdict != "dispatch":
        return bump(state), [decided]
    new_state = reserve(
        state, request.request_id, result.day, request.feature, result.budget.estimated_cost_micros
    )
    return new_state, [decided, dispatch_event(request, result, decided, producer, now)]


def on_outcome(
    state: BudgetState, outcome: OutcomeRecorded, producer: str, now: datetime
) -> tuple[BudgetState, list[Event]]:
    """Settle the request's reservation with its actual cost."""
    version = state.version
    new_state, settlement = settle(state, outcome.request_id, outcome.cost_micros)
    if settlement is None:
        return state, []
    event = BudgetSettled(
        event_id=derive_id(outcome.event_id, "settlement"),
        request_id=outcome.request_id,
        tenant_id=outcome.tenant_id,
        occurred_at=now,
        producer=producer,
        causation_id=outcome.event_id,
        trace_id=outcome.trace_id,
        policy_digest=outcome.policy_digest,
        feature=settlement.feature,
        window=settlement.day,
        reserved_micros=settlement.reserved,
        actual_micros=settlement.actual,
        tenant_spent_micros=settlement.tenant_spent,
        feature_spent_micros=settlement.feature_spent,
        state_version=version,
    )
    return new_state, [event]
