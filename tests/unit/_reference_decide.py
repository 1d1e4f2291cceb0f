"""A frozen copy of ``decide()`` (and the private helpers it used) as it was before the decision
was split into stages (core/_route.py and the budget and decode stages).

Do not edit: ``test_decide_stages.py`` checks that today's ``decide`` gives exactly what this copy
gives, for every input. Only the result types (``Decision``, ``Rejection``) are today's, so that the
two compare by value.
"""

# fmt: off

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime

import msgspec

from nexuscore.core import BudgetState, Decision, Rejection
from nexuscore.core._latency import MIN_SAMPLES
from nexuscore.policy import DecodeStrategy, Deployment, Match, RoutingPolicy, Tenant, tier_rank
from nexuscore.schemas import (
    TIERS,
    BudgetDecision,
    DecodeDecision,
    InferenceRequested,
    LatencyObservation,
    Reason,
    ResidencyDecision,
    RoutingDecision,
    Tier,
    Verdict,
)

_RISK_WEIGHT = {"low": 0.1, "medium": 0.25, "high": 0.45, "critical": 0.6}


# What the Latency Controller observed of (deployment id, decode strategy), if anything.
LatencyView = Callable[[str, str], LatencyObservation | None]


def estimate_input_tokens(prompt: str) -> int:
    """Roughly four characters a token: the same rule the simulated provider bills by."""
    return max(1, len(prompt) // 4)


def estimate_complexity(request: InferenceRequested, input_tokens: int) -> float:
    if request.complexity is not None:
        return request.complexity
    raw = (
        _RISK_WEIGHT[request.risk_class]
        + min(0.4, input_tokens / 5000)
        + 0.1 * len(request.required_capabilities)
    )
    return round(min(1.0, raw), 4)


def matches(when: Match, request: InferenceRequested, complexity: float) -> bool:
    if when.task_types and request.task_type not in when.task_types:
        return False
    if when.risk_classes and request.risk_class not in when.risk_classes:
        return False
    if when.capabilities and not set(when.capabilities) <= set(request.required_capabilities):
        return False
    return not (when.min_complexity is not None and complexity < when.min_complexity)


def admit(request: InferenceRequested, policy: RoutingPolicy) -> Rejection | Tenant:
    """Admission: is this a request the policy knows how to decide at all?"""
    tenant = policy.tenants_by_id.get(request.tenant_id)
    if tenant is None:
        return Rejection(
            code="unknown_tenant", reason=f"tenant {request.tenant_id!r} is not in policy {policy.version}"
        )
    if not any(f.id == request.feature for f in tenant.features):
        return Rejection(
            code="unknown_feature",
            reason=f"feature {request.feature!r} is not configured for tenant {tenant.id!r}",
        )
    if request.task_type not in policy.task_types:
        # The rules were written for the listed task types only; anything else would be routed by
        # complexity alone, as if no rule applied to it.
        return Rejection(
            code="unknown_task_type",
            reason=f"task type {request.task_type!r} is not in policy {policy.version}",
        )
    if request.data_classification not in policy.residency_by_class:
        return Rejection(
            code="no_residency_rule",
            reason=f"no residency rule covers {request.data_classification!r} data",
        )
    tokens = estimate_input_tokens(request.prompt)
    if tokens > policy.max_input_tokens:
        return Rejection(
            code="input_too_large",
            reason=f"about {tokens} input tokens exceed the policy limit of {policy.max_input_tokens}",
        )
    if tokens + request.max_output_tokens > policy.max_context_tokens:
        return Rejection(
            code="context_too_large",
            reason=(
                f"{tokens} input + {request.max_output_tokens} output tokens exceed every deployment's "
                f"context (largest {policy.max_context_tokens})"
            ),
        )
    return tenant


# The broker takes messages of up to 1 MiB. A dispatch carries the prompt once, beside fields the
# schema bounds (a few KiB at most): a prompt of at most this many UTF-8 bytes always fits. Tokens
# alone do not bound it (four characters a token, and a character may take four bytes).
MAX_PROMPT_BYTES = 512 * 1024


def admit_size(request: InferenceRequested) -> Rejection | None:
    """Admission by encoded size: no accepted request may produce an event the broker refuses."""
    size = len(request.prompt.encode("utf-8", "surrogatepass"))
    if size > MAX_PROMPT_BYTES:
        return Rejection(
            code="request_too_large",
            reason=f"the prompt is {size} bytes of UTF-8, over the gateway's limit of {MAX_PROMPT_BYTES}",
        )
    return None


def _residency(request: InferenceRequested, policy: RoutingPolicy, tenant: Tenant) -> ResidencyDecision:
    rule = policy.residency_by_class[request.data_classification]
    allowed = sorted({tenant.home_region if r == "home" else r for r in rule.allowed})
    return ResidencyDecision(
        home_region=tenant.home_region,
        allowed_regions=allowed,
        rule_id=rule.id,
        transfer_basis=rule.transfer_basis,
    )


def routing_confidence(
    request: InferenceRequested, policy: RoutingPolicy, complexity: float, floor: Tier
) -> float:
    """1.0 when a rule set the floor or the caller gave the complexity; otherwise the closer the
    estimated complexity lies to the small/mid boundary, the less sure the tier is (0.5 on it)."""
    if request.complexity is not None or floor != "small":
        return 1.0
    return round(min(1.0, 0.5 + abs(complexity - policy.routing.mid_complexity)), 4)


def reference_decide(
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
    admitted = admit(request, policy)
    if isinstance(admitted, Rejection):
        return admitted
    too_large = admit_size(request)
    if too_large is not None:
        return too_large
    tenant = admitted
    feature = next(f for f in tenant.features if f.id == request.feature)
    reasons: list[Reason] = []
    input_tokens = estimate_input_tokens(request.prompt)
    day = now.date().isoformat()

    residency = _residency(request, policy, tenant)
    reasons.append(
        Reason(
            stage="residency",
            kind="rule_fired",
            subject=residency.rule_id,
            detail=f"{request.data_classification} data of a {tenant.home_region} tenant: "
            f"allowed in {', '.join(residency.allowed_regions)}",
        )
    )

    # --- routing: the smallest tier the request can trust --------------------------------------
    complexity = estimate_complexity(request, input_tokens)
    floor: Tier = "small"
    for rule in policy.routing.rules:
        if matches(rule.when, request, complexity):
            reasons.append(
                Reason(
                    stage="routing", kind="rule_fired", subject=rule.id, detail=rule.reason or rule.min_tier
                )
            )
            if tier_rank(rule.min_tier) > tier_rank(floor):
                floor = rule.min_tier
    suggested: Tier = "mid" if complexity >= policy.routing.mid_complexity else "small"
    preferred: Tier = suggested if tier_rank(suggested) > tier_rank(floor) else floor
    if suggested == "mid" and preferred == "mid" and floor != "mid":
        reasons.append(
            Reason(
                stage="routing",
                kind="note",
                subject="complexity",
                detail=f"complexity {complexity} >= {policy.routing.mid_complexity} suggests mid",
            )
        )

    needed = input_tokens + request.max_output_tokens
    required = set(request.required_capabilities)
    allowed = set(residency.allowed_regions)
    eligible: list[Deployment] = []
    for d in policy.deployments:
        why = ""
        stage = "routing"
        if d.region not in allowed:
            stage = "residency"
            why = f"region {d.region} is outside {', '.join(residency.allowed_regions)}"
        elif not required <= set(d.capabilities):
            why = f"lacks capabilities {', '.join(sorted(required - set(d.capabilities)))}"
        elif d.context_tokens < needed:
            why = f"context {d.context_tokens} < {needed} tokens needed"
        elif tier_rank(d.tier) < tier_rank(floor):
            why = f"tier {d.tier} is below the floor {floor}"
        if why:
            reasons.append(Reason(stage=stage, kind="rejected_alternative", subject=d.id, detail=why))  # type: ignore[arg-type]  # stage is one of the two literals above
        else:
            eligible.append(d)

    def cost(d: Deployment) -> int:
        return d.cost_micros(input_tokens, request.max_output_tokens)

    # Step up from the preferred tier only as far as mid: frontier is never a fallback, only a floor.
    ceiling: Tier = "frontier" if floor == "frontier" else "mid"
    tier: Tier | None = None
    for t in TIERS[tier_rank(preferred) : tier_rank(ceiling) + 1]:
        if any(d.tier == t for d in eligible):
            tier = t
            break
    if tier is not None and tier != preferred:
        reasons.append(
            Reason(
                stage="routing",
                kind="note",
                subject="step_up",
                detail=f"no eligible {preferred} deployment; using {tier}",
            )
        )
    ranked = sorted((d for d in eligible if d.tier == tier), key=lambda d: (cost(d), d.id))
    chosen = ranked[0] if ranked else None
    for d in eligible:
        if d is chosen:
            continue
        if tier is not None and tier_rank(d.tier) > tier_rank(tier):
            detail = f"tier {d.tier} is above {tier}, the smallest adequate tier"
        elif d.tier == tier:
            detail = f"estimated {cost(d)} micro-USD, more than {chosen.id if chosen else '-'}"
        else:
            detail = f"tier {d.tier} is below the preferred {preferred}; kept as a budget fallback"
        reasons.append(Reason(stage="routing", kind="rejected_alternative", subject=d.id, detail=detail))

    confidence = routing_confidence(request, policy, complexity, floor)
    routing = RoutingDecision(
        complexity=complexity,
        floor_tier=floor,
        preferred_tier=preferred,
        tier=tier,
        deployment_id=chosen.id if chosen else None,
        eligible=[d.id for d in eligible],
        confidence=confidence,
    )
    window = state.window(day)
    tenant_budget = int(tenant.daily_budget_usd * 1_000_000)
    feature_budget = int(feature.daily_budget_usd * 1_000_000)

    def budget(action: str, d: Deployment | None, estimate: int) -> BudgetDecision:
        return BudgetDecision(
            action=action,  # type: ignore[arg-type]  # callers pass one of the declared literals
            window=day,
            estimated_cost_micros=estimate,
            tenant_budget_micros=tenant_budget,
            tenant_committed_micros=window.tenant_committed,
            feature_budget_micros=feature_budget,
            feature_committed_micros=window.feature_committed(request.feature),
            deployment_id=d.id if d else None,
            tier=d.tier if d else None,
        )

    def finish(
        verdict: Verdict,
        why: str,
        b: BudgetDecision,
        d: Deployment | None,
        dec: DecodeDecision | None,
        fallbacks: tuple[tuple[Deployment, str], ...] = (),
    ) -> Decision:
        final_routing = routing
        if d is not None and (d.id != routing.deployment_id or fallbacks):
            final_routing = msgspec.structs.replace(
                routing, deployment_id=d.id, fallbacks=[f.id for f, _ in fallbacks]
            )
        return Decision(
            verdict=verdict,
            verdict_reason=why,
            residency=residency,
            routing=final_routing,
            budget=b,
            decode=dec,
            reasons=tuple(reasons),
            deployment=d,
            input_tokens=input_tokens,
            day=day,
            fallbacks=fallbacks,
        )

    if chosen is None:
        why = f"no deployment in {', '.join(residency.allowed_regions)} meets tier {preferred} and the request's needs"
        return finish(
            "denied", "no_eligible_deployment: " + why, budget("not_applicable", None, 0), None, None
        )

    # --- escalation: some requests are for a person, not a model --------------------------------
    # A policy's rules first (the more specific reason), then the router's own doubt.
    if approved_by:
        reasons.append(
            Reason(stage="escalation", kind="note", subject="review", detail=f"approved by {approved_by}")
        )
    else:
        why, deadline_s = "", policy.review_deadline_s
        esc = next((e for e in policy.escalation if matches(e.when, request, complexity)), None)
        if esc is not None:
            reasons.append(Reason(stage="escalation", kind="rule_fired", subject=esc.id, detail=esc.reason))
            why, deadline_s = f"{esc.id}: {esc.reason}", esc.review_deadline_s or deadline_s
        elif confidence < policy.routing.min_confidence:
            detail = (
                f"routing confidence {confidence} < {policy.routing.min_confidence}: estimated complexity "
                f"{complexity} is too close to the {policy.routing.mid_complexity} small/mid boundary"
            )
            reasons.append(
                Reason(stage="escalation", kind="rule_fired", subject="low-confidence", detail=detail)
            )
            why = f"low-confidence: {detail}"
        if why:
            escalated = finish("escalated", why, budget("not_applicable", chosen, cost(chosen)), None, None)
            return msgspec.structs.replace(escalated, review_deadline_s=deadline_s)

    # --- budget: reserve the estimate, or downgrade, or deny ------------------------------------
    options = ranked + sorted(
        (d for d in eligible if tier_rank(d.tier) < tier_rank(chosen.tier)),
        key=lambda d: (-tier_rank(d.tier), cost(d), d.id),
    )
    fitting: Deployment | None = None
    for d in options:
        estimate = cost(d)
        if window.tenant_committed + estimate > tenant_budget:
            why = f"tenant budget: {window.tenant_committed} + {estimate} > {tenant_budget} micro-USD"
        elif window.feature_committed(request.feature) + estimate > feature_budget:
            why = f"feature budget: {window.feature_committed(request.feature)} + {estimate} > {feature_budget} micro-USD"
        else:
            fitting = d
            break
        reasons.append(Reason(stage="budget", kind="rejected_alternative", subject=d.id, detail=why))
    if fitting is None:
        return finish(
            "denied",
            f"budget_exhausted: no eligible deployment fits the {day} budget of {tenant.id}/{request.feature}",
            budget("denied", chosen, cost(chosen)),
            None,
            None,
        )
    action = "reserved" if fitting is chosen else "downgraded"
    if fitting is not chosen:
        reasons.append(
            Reason(
                stage="budget",
                kind="note",
                subject=fitting.id,
                detail=f"downgraded from {chosen.id} to fit the budget",
            )
        )

    def fits_budget(d: Deployment) -> bool:
        estimate = cost(d)
        return (
            window.tenant_committed + estimate <= tenant_budget
            and window.feature_committed(request.feature) + estimate <= feature_budget
        )

    # The failover chain: the fitting deployment, then the same tier's others that the budget allows.
    chain = [fitting] + sorted(
        (d for d in eligible if d.tier == fitting.tier and d is not fitting and fits_budget(d)),
        key=lambda d: (cost(d), d.id),
    )

    # --- decode: the latency SLO sets the budget; the Latency Controller predicts ---------------
    slo = request.latency_slo_ms or feature.latency_slo_ms
    observations: list[LatencyObservation] = []

    def predict(d: Deployment, s: DecodeStrategy) -> tuple[int, str]:
        seen = latency(d.id, s.name) if latency else None
        if seen is not None:
            observations.append(seen)
            if seen.samples >= MIN_SAMPLES:
                return seen.p95_ms, "observed"
        return math.ceil(s.ttft_ms + s.ms_per_output_token * request.max_output_tokens), "policy"

    predictions = {d.id: [(s, *predict(d, s)) for s in d.decode] for d in chain}

    def best(d: Deployment) -> tuple[DecodeStrategy, int, str, bool]:
        fit = next(((s, p, b) for s, p, b in predictions[d.id] if p <= slo), None)
        if fit is not None:
            return fit[0], fit[1], fit[2], True
        s, p, b = min(predictions[d.id], key=lambda spb: spb[1])
        return s, p, b, False

    # Each deployment's best strategy, worked out once (decide is replay's hot path too).
    bests = {d.id: best(d) for d in chain}
    picked = next((d for d in chain if bests[d.id][3]), fitting)
    strategy, predicted, basis, fits = bests[picked.id]
    for d in chain:
        if d is picked:
            break
        reasons.append(
            Reason(
                stage="decode",
                kind="rejected_alternative",
                subject=d.id,
                detail=f"predicts {bests[d.id][1]} ms ({bests[d.id][2]}), over the {slo} ms SLO",
            )
        )
    if not fits:
        reasons.append(
            Reason(
                stage="decode",
                kind="note",
                subject=strategy.name,
                detail=f"no strategy fits {slo} ms; fastest predicts {predicted} ms",
            )
        )
    for s, p, b in predictions[picked.id]:
        if s is not strategy:
            reasons.append(
                Reason(
                    stage="decode",
                    kind="rejected_alternative",
                    subject=s.name,
                    detail=f"predicts {p} ms ({b})",
                )
            )
    decode = DecodeDecision(
        strategy=strategy.name,
        latency_slo_ms=slo,
        predicted_latency_ms=predicted,
        fits_slo=fits,
        basis=basis,
        observations=observations,
    )
    fallbacks = tuple((d, bests[d.id][0].name) for d in chain if d is not picked)
    # The reservation covers the dearest deployment the worker may fail over to, so a failover can
    # never spend more than was held.
    reserved = max(cost(d) for d in chain)
    if fallbacks:
        reasons.append(
            Reason(
                stage="routing",
                kind="note",
                subject="failover",
                detail=f"may fail over to {', '.join(d.id for d, _ in fallbacks)}; {reserved} micro-USD held",
            )
        )
    budget_decision = budget(action, picked, reserved)
    return finish(
        "dispatch",
        f"{action} on {picked.id} ({picked.tier}, {picked.region})",
        budget_decision,
        picked,
        decode,
        fallbacks,
    )
