"""The pure steps the decision agent and replay share: (state, input) -> (state, events).

Time (``now``) and the producer's name come in as data; ids are derived from the input's id.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

import msgspec

from nexuscore.core._budget import BudgetState, Reservation, bump, release, reserve, settle
from nexuscore.core._controls import TOOL_CAPABILITIES, CachedAnswer, answer_key, prompt_digest
from nexuscore.core._decide import Decision, LatencyView, Rejection, decide
from nexuscore.core._ids import derive_id, envelope_from
from nexuscore.policy import NO_CONTROLS, Controls, Refusal, RoutingPolicy
from nexuscore.schemas import (
    ActRefused,
    BudgetSettled,
    DispatchRequested,
    EscalationResolved,
    Event,
    FallbackTarget,
    InferenceRequested,
    KillSwitchChanged,
    OutcomeRecorded,
    PolicyStageChanged,
    Reason,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
    ShadowDecisionRecorded,
)

# Reads the offline answer cache (a faust Table in the decider, a dict in tests).
AnswerLookup = Callable[[bytes], CachedAnswer | None]


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
        review_deadline=now + timedelta(seconds=result.review_deadline_s)
        if result.review_deadline_s
        else None,
        control_mode=result.control_mode,
    )


def dispatch_event(
    request: InferenceRequested,
    decision: Decision,
    decided: RequestDecided | EscalationResolved,
    producer: str,
    now: datetime,
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
        fallbacks=[
            FallbackTarget(
                deployment_id=f.id,
                provider=f.provider,
                endpoint=f.endpoint,
                model=f.model,
                region=f.region,
                decode_strategy=strategy,
                input_price_micros_per_1k=f.input_micros_per_1k,
                output_price_micros_per_1k=f.output_micros_per_1k,
            )
            for f, strategy in decision.fallbacks
        ],
        latency_slo_ms=decision.decode.latency_slo_ms,
        predicted_latency_ms=decision.decode.predicted_latency_ms,
    )


def _overridden(decision: Decision, why: str, detail: str, mode: str) -> Decision:
    """A decision an operator control stopped: recorded in full, with the control as its reason."""
    return msgspec.structs.replace(
        decision,
        control_mode=mode,
        verdict="denied",
        verdict_reason=why,
        budget=msgspec.structs.replace(decision.budget, action="not_applicable"),
        decode=None,
        fallbacks=(),
        reasons=(
            *decision.reasons,
            Reason(stage="admission", kind="rule_fired", subject="kill_switch", detail=detail),
        ),
    )


def _cached(
    request: InferenceRequested, decision: Decision, policy: RoutingPolicy, answers: AnswerLookup
) -> CachedAnswer | None:
    """An answer kept for this tenant, policy and prompt from a model the decision allowed."""
    sha = prompt_digest(request.prompt)
    for d in decision.chain:
        hit = answers(answer_key(request.tenant_id, policy.digest, d.model, sha))
        if hit is not None and hit.region in decision.residency.allowed_regions:
            return hit
    return None


def _apply_controls(
    request: InferenceRequested,
    decision: Decision,
    policy: RoutingPolicy,
    controls: Controls,
    answers: AnswerLookup | None,
) -> tuple[Decision, CachedAnswer | None]:
    """Kill switches: off denies; offline answers from the cache (tools disabled) or denies."""
    switch = controls.for_request(request.tenant_id, request.feature)
    if switch is None or decision.verdict != "dispatch":
        return decision, None
    if switch.mode == "off":
        return _overridden(
            decision, f"kill_switch: {switch.describe()}", switch.describe(), switch.mode
        ), None
    if TOOL_CAPABILITIES & set(request.required_capabilities):
        why = f"offline: tools are disabled while {switch.describe()}"
        return _overridden(decision, why, switch.describe(), switch.mode), None
    hit = _cached(request, decision, policy, answers) if answers is not None else None
    if hit is None:
        why = f"offline: no cached answer for this prompt under this policy; {switch.describe()}"
        return _overridden(decision, why, switch.describe(), switch.mode), None
    answered = msgspec.structs.replace(
        decision,
        control_mode=switch.mode,
        verdict_reason=f"offline: answered from the cache (request {hit.request_id}, {hit.deployment_id})",
        budget=msgspec.structs.replace(decision.budget, action="not_applicable", estimated_cost_micros=0),
        fallbacks=(),
        reasons=(
            *decision.reasons,
            Reason(stage="admission", kind="rule_fired", subject="offline", detail=switch.describe()),
        ),
    )
    return answered, hit


def cached_outcome(
    request: InferenceRequested, decided: RequestDecided, hit: CachedAnswer, producer: str, now: datetime
) -> OutcomeRecorded:
    """The outcome of a request answered offline: marked cached, no model called, nothing billed."""
    return OutcomeRecorded(
        **envelope_from(decided, "outcome", producer=producer, now=now),
        status="answered",
        feature=request.feature,
        deployment_id=hit.deployment_id,
        model=hit.model,
        model_version=hit.model_version,
        region=hit.region,
        attempts=1,
        input_tokens=0,
        output_tokens=0,
        cost_micros=0,
        latency_ms=0.0,
        response=hit.response,
        finish_reason=hit.finish_reason,
        data_subject=request.data_subject,
        cached=True,
        cached_from=hit.request_id,
    )


def on_request(
    state: BudgetState,
    request: InferenceRequested,
    policy: RoutingPolicy,
    producer: str,
    now: datetime,
    held: Reservation | None = None,
    stage: str = "active",
    *,
    controls: Controls = NO_CONTROLS,
    latency: LatencyView | None = None,
    answers: AnswerLookup | None = None,
) -> tuple[BudgetState, Reservation | None, list[Event]]:
    """Decide a request and fold the decision into the budget state.

    Returns the new state, the reservation to keep until the outcome (or None), and the events.
    ``held`` is the reservation already kept for this request: a redelivered request is decided
    again against the state without its own reservation, and re-emits its decision (same event
    ids, dropped downstream) without holding the budget twice. ``controls`` are the operators'
    kill switches; ``answers`` reads the offline cache; ``latency`` is the controller's window.
    """
    result = decide(
        request, policy, release(state, held) if held is not None else state, now, latency=latency
    )
    hit = None
    if isinstance(result, Decision):
        result, hit = _apply_controls(request, result, policy, controls, answers)
    decided = decision_event(request, result, policy, state.version, producer, now, stage)
    if isinstance(result, Rejection):
        return state, None, [decided]
    assert isinstance(decided, RequestDecided)
    if hit is not None:
        return bump(state), None, [decided, cached_outcome(request, decided, hit, producer, now)]
    if result.verdict != "dispatch":
        # Redelivered after an approved review resumed it: the reservation it holds stays.
        return (state, held, [decided]) if held is not None else (bump(state), None, [decided])
    events: list[Event] = [decided, dispatch_event(request, result, decided, producer, now)]
    if held is not None:
        return state, held, events
    reservation = reservation_for(request, result)
    return reserve(state, reservation), reservation, events


def reservation_for(request: InferenceRequested, decision: Decision) -> Reservation:
    return Reservation(
        day=decision.day,
        feature=request.feature,
        amount=decision.budget.estimated_cost_micros,
        prompt_sha256=prompt_digest(request.prompt),
        cacheable=not (TOOL_CAPABILITIES & set(request.required_capabilities)),
    )


def on_review(
    state: BudgetState,
    request: InferenceRequested,
    escalated: RequestDecided,
    review: ReviewRecorded,
    policy: RoutingPolicy,
    producer: str,
    now: datetime,
    *,
    controls: Controls = NO_CONTROLS,
    latency: LatencyView | None = None,
) -> tuple[BudgetState, Reservation | None, list[Event]]:
    """Apply a person's review (or the deadline passing) to an escalated request.

    Approved in time: the request is decided again under ``policy`` without the escalation stage
    (budget, latency and kill switches as of now) and, if that allows a call, dispatched. Denied or
    too late: it ends here, with the review and its reason recorded.
    """
    late = escalated.review_deadline is not None and now > escalated.review_deadline
    envelope = envelope_from(escalated, "resolution", producer=producer, now=now, policy_digest=policy.digest)

    def resolved(resolution: str, why: str, decision: Decision | None = None) -> EscalationResolved:
        dispatched = decision is not None and decision.verdict == "dispatch"
        return EscalationResolved(
            **envelope,
            resolution=resolution,
            review_event_id=review.event_id,
            reviewer=review.reviewer,
            review_reason=review.reason,
            verdict_reason=why,
            policy_version=policy.version,
            feature=request.feature,
            budget=decision.budget if decision else None,
            decode=decision.decode if decision else None,
            deployment_id=decision.deployment.id if dispatched and decision and decision.deployment else None,
            reasons=list(decision.reasons) if decision else [],
            state_version=state.version,
        )

    if review.action == "denied" and not late:
        return bump(state), None, [resolved("denied", f"denied by {review.reviewer}: {review.reason}")]
    if review.action != "approved" or late:
        return (
            bump(state),
            None,
            [resolved("timed_out", f"no review before the deadline {escalated.review_deadline}")],
        )
    result = decide(request, policy, state, now, latency=latency, approved_by=review.reviewer)
    if isinstance(result, Rejection):
        why = f"approved by {review.reviewer}, but the policy now rejects it: {result.reason}"
        return bump(state), None, [resolved("refused", why)]
    result, _ = _apply_controls(request, result, policy, controls, None)
    if result.verdict != "dispatch":
        return (
            bump(state),
            None,
            [resolved("refused", f"approved by {review.reviewer}, but {result.verdict_reason}", result)],
        )
    event = resolved("dispatched", result.verdict_reason, result)
    reservation = reservation_for(request, result)
    return (
        reserve(state, reservation),
        reservation,
        [event, dispatch_event(request, result, event, producer, now)],
    )


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


def answer_to_keep(outcome: OutcomeRecorded, held: Reservation | None) -> tuple[bytes, CachedAnswer] | None:
    """The offline cache entry an answered call leaves (none for tool calls or cached answers)."""
    if held is None or not held.cacheable or not held.prompt_sha256:
        return None
    if outcome.cached or outcome.status != "answered":
        return None
    key = answer_key(outcome.tenant_id, outcome.policy_digest, outcome.model, held.prompt_sha256)
    return key, CachedAnswer(
        request_id=outcome.request_id,
        deployment_id=outcome.deployment_id,
        model=outcome.model,
        model_version=outcome.model_version,
        region=outcome.region,
        response=outcome.response,
        input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens,
        finish_reason=outcome.finish_reason,
    )


def refusal_event(
    act: ReviewRecorded | PolicyStageChanged | KillSwitchChanged,
    refusal: Refusal,
    source: tuple[str, int, int],
    producer: str,
    now: datetime,
) -> ActRefused:
    """The evidence of a refused human act. Its id derives from where the act was read, so every
    copy of a replayed act is a refusal of its own, never dropped as a duplicate."""
    topic, partition, offset = source
    kind = {ReviewRecorded: "review", PolicyStageChanged: "policy_stage", KillSwitchChanged: "kill_switch"}
    actor = act.reviewer if isinstance(act, ReviewRecorded) else act.actor
    return ActRefused(
        event_id=derive_id(act.tenant_id, "refused", topic, partition, offset),
        request_id=act.request_id,
        tenant_id=act.tenant_id,
        occurred_at=now,
        producer=producer,
        causation_id=act.event_id,
        trace_id=act.trace_id,
        policy_digest=act.policy_digest,
        act=kind[type(act)],
        act_event_id=act.event_id,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        key_id=act.key_id,
        claimed_actor=actor[:200],
        code=refusal.code,
        reason=refusal.reason[:2000],
    )
