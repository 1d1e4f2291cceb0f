"""Routing: what a decision owes to the request's decision-relevant attributes and the policy alone.

``route(request, policy)`` runs admission, residency, routing (floor, preferred tier, eligible
deployments, the tier and its ranking, confidence) and works out the escalation verdict, each with
its reasons in order. It reads no state (budgets, latency windows) and no clock, and of the request
only what ``route_key`` returns: two requests with the same key get equal routes under one policy,
so a ``Route`` can be cached per (policy digest, key) (``RouteCache``). The state-dependent stages,
budget and decode, follow in ``core/_budget_stage.py`` and ``core/_decode_stage.py``; ``decide``
(``core/_decide.py``) composes them.
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec

from nexuscore.core._admit import Rejection, admit, admit_size, estimate_input_tokens, oversize_bytes
from nexuscore.policy import Deployment, Match, RoutingPolicy, Tenant
from nexuscore.schemas import TIERS, InferenceRequested, Reason, ResidencyDecision, RoutingDecision, Tier

_RISK_WEIGHT = {"low": 0.1, "medium": 0.25, "high": 0.45, "critical": 0.6}
# ``policy.tier_rank`` as a table: the routing stages compare tiers some thirty times a request.
_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}


def estimate_complexity(request: InferenceRequested, input_tokens: int) -> float:
    if request.complexity is not None:
        return request.complexity
    return estimated_complexity(request.risk_class, input_tokens, len(request.required_capabilities))


def estimated_complexity(risk_class: str, input_tokens: int, capabilities_listed: int) -> float:
    """The router's estimate when the caller gave none (replay's planner calls it per row too)."""
    raw = _RISK_WEIGHT[risk_class] + min(0.4, input_tokens / 5000) + 0.1 * capabilities_listed
    return round(min(1.0, raw), 4)


def confidence_of(complexity: float, policy: RoutingPolicy) -> float:
    """The confidence of an estimated complexity on the small floor (see ``routing_confidence``)."""
    return round(min(1.0, 0.5 + abs(complexity - policy.routing.mid_complexity)), 4)


def matches(when: Match, request: InferenceRequested, complexity: float) -> bool:
    if when.task_types and request.task_type not in when.task_types:
        return False
    if when.risk_classes and request.risk_class not in when.risk_classes:
        return False
    if when.capabilities and not set(when.capabilities) <= set(request.required_capabilities):
        return False
    return not (when.min_complexity is not None and complexity < when.min_complexity)


def routing_confidence(
    request: InferenceRequested, policy: RoutingPolicy, complexity: float, floor: Tier
) -> float:
    """1.0 when a rule set the floor or the caller gave the complexity; otherwise the closer the
    estimated complexity lies to the small/mid boundary, the less sure the tier is (0.5 on it)."""
    if request.complexity is not None or floor != "small":
        return 1.0
    return confidence_of(complexity, policy)


class Escalation(msgspec.Struct, frozen=True, kw_only=True):
    """The escalation stage's verdict, applied unless a reviewer has already approved the request."""

    reason: Reason
    # The decision's verdict reason, and how long a person has to decide.
    why: str
    deadline_s: int


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """Everything decided before the budget and decode stages, reasons in order.

    A pure function of (policy, ``route_key(request)``). ``chosen`` is None when no deployment is
    eligible (the decision is then a denial); ``escalation`` is set only when one was chosen.
    """

    tenant_id: str
    feature: str
    input_tokens: int
    max_output_tokens: int
    residency: ResidencyDecision
    routing: RoutingDecision
    # Admission passed; residency, routing: the rules that fired and the alternatives rejected.
    reasons: tuple[Reason, ...]
    # Eligible deployments in policy order, and with their estimated costs (micro-USD).
    eligible: tuple[Deployment, ...]
    costs: dict[str, int]
    chosen: Deployment | None
    # What the budget stage tries in order: the chosen tier cheapest first, then the lower tiers
    # (larger first, cheapest first), never below the floor.
    options: tuple[Deployment, ...]
    escalation: Escalation | None
    tenant_budget_micros: int
    feature_budget_micros: int
    feature_slo_ms: int

    def cost(self, d: Deployment) -> int:
        """The estimated cost of an eligible deployment (micro-USD)."""
        return self.costs[d.id]


def route(request: InferenceRequested, policy: RoutingPolicy) -> Route | Rejection:
    """Admit and route one request. Pure, and a function of ``route_key(request)`` and the policy."""
    admitted = admit(request, policy)
    if isinstance(admitted, Rejection):
        return admitted
    too_large = admit_size(request)
    if too_large is not None:
        return too_large
    return _routed(request, policy, admitted)


def _routed(request: InferenceRequested, policy: RoutingPolicy, tenant: Tenant) -> Route:
    feature = next(f for f in tenant.features if f.id == request.feature)
    input_tokens = estimate_input_tokens(request.prompt)
    residency, residency_reason = _residency(request, policy, tenant)
    complexity = estimate_complexity(request, input_tokens)
    floor, floor_reasons = _floor(request, policy, complexity)
    preferred, preferred_reasons = _preferred(policy, complexity, floor)
    eligible, unfit_reasons = _eligible(request, policy, residency, input_tokens, floor)
    costs = {d.id: d.cost_micros(input_tokens, request.max_output_tokens) for d in eligible}
    tier, tier_reasons = _tier(eligible, floor, preferred)
    ranked = sorted((d for d in eligible if d.tier == tier), key=lambda d: (costs[d.id], d.id))
    chosen = ranked[0] if ranked else None
    confidence = routing_confidence(request, policy, complexity, floor)
    return Route(
        tenant_id=tenant.id,
        feature=feature.id,
        input_tokens=input_tokens,
        max_output_tokens=request.max_output_tokens,
        residency=residency,
        routing=RoutingDecision(
            complexity=complexity,
            floor_tier=floor,
            preferred_tier=preferred,
            tier=tier,
            deployment_id=chosen.id if chosen else None,
            eligible=[d.id for d in eligible],
            confidence=confidence,
        ),
        reasons=(
            residency_reason,
            *floor_reasons,
            *preferred_reasons,
            *unfit_reasons,
            *tier_reasons,
            *_passed_over(eligible, chosen, tier, preferred, costs),
        ),
        eligible=tuple(eligible),
        costs=costs,
        chosen=chosen,
        options=_budget_options(ranked, eligible, chosen, costs),
        escalation=_escalation(request, policy, complexity, confidence) if chosen else None,
        tenant_budget_micros=int(tenant.daily_budget_usd * 1_000_000),
        feature_budget_micros=int(feature.daily_budget_usd * 1_000_000),
        feature_slo_ms=feature.latency_slo_ms,
    )


def _residency(
    request: InferenceRequested, policy: RoutingPolicy, tenant: Tenant
) -> tuple[ResidencyDecision, Reason]:
    rule = policy.residency_by_class[request.data_classification]
    allowed = sorted({tenant.home_region if r == "home" else r for r in rule.allowed})
    decision = ResidencyDecision(
        home_region=tenant.home_region,
        allowed_regions=allowed,
        rule_id=rule.id,
        transfer_basis=rule.transfer_basis,
    )
    reason = Reason(
        stage="residency",
        kind="rule_fired",
        subject=rule.id,
        detail=f"{request.data_classification} data of a {tenant.home_region} tenant: "
        f"allowed in {', '.join(allowed)}",
    )
    return decision, reason


def _floor(
    request: InferenceRequested, policy: RoutingPolicy, complexity: float
) -> tuple[Tier, list[Reason]]:
    """The smallest tier the routing rules that match allow, and those rules."""
    floor: Tier = "small"
    fired: list[Reason] = []
    for rule in policy.routing.rules:
        if matches(rule.when, request, complexity):
            detail = rule.reason or rule.min_tier
            fired.append(Reason(stage="routing", kind="rule_fired", subject=rule.id, detail=detail))
            if _RANK[rule.min_tier] > _RANK[floor]:
                floor = rule.min_tier
    return floor, fired


def _preferred(policy: RoutingPolicy, complexity: float, floor: Tier) -> tuple[Tier, list[Reason]]:
    """The tier the complexity suggests, never below the floor."""
    suggested: Tier = "mid" if complexity >= policy.routing.mid_complexity else "small"
    preferred: Tier = suggested if _RANK[suggested] > _RANK[floor] else floor
    if suggested == "mid" and preferred == "mid" and floor != "mid":
        detail = f"complexity {complexity} >= {policy.routing.mid_complexity} suggests mid"
        return preferred, [Reason(stage="routing", kind="note", subject="complexity", detail=detail)]
    return preferred, []


def _eligible(
    request: InferenceRequested,
    policy: RoutingPolicy,
    residency: ResidencyDecision,
    input_tokens: int,
    floor: Tier,
) -> tuple[list[Deployment], list[Reason]]:
    """The deployments that may serve the request, in policy order, and why each other may not."""
    needed = input_tokens + request.max_output_tokens
    required = set(request.required_capabilities)
    allowed = set(residency.allowed_regions)
    eligible: list[Deployment] = []
    unfit: list[Reason] = []
    for d in policy.deployments:
        if d.region not in allowed:
            detail = f"region {d.region} is outside {', '.join(residency.allowed_regions)}"
            unfit.append(Reason(stage="residency", kind="rejected_alternative", subject=d.id, detail=detail))
            continue
        if not required <= set(d.capabilities):
            detail = f"lacks capabilities {', '.join(sorted(required - set(d.capabilities)))}"
        elif d.context_tokens < needed:
            detail = f"context {d.context_tokens} < {needed} tokens needed"
        elif _RANK[d.tier] < _RANK[floor]:
            detail = f"tier {d.tier} is below the floor {floor}"
        else:
            eligible.append(d)
            continue
        unfit.append(Reason(stage="routing", kind="rejected_alternative", subject=d.id, detail=detail))
    return eligible, unfit


def _tier(eligible: list[Deployment], floor: Tier, preferred: Tier) -> tuple[Tier | None, list[Reason]]:
    """The smallest tier with an eligible deployment, from the preferred one up to mid (frontier is
    never a fallback, only a floor)."""
    ceiling: Tier = "frontier" if floor == "frontier" else "mid"
    tier = next(
        (t for t in TIERS[_RANK[preferred] : _RANK[ceiling] + 1] if any(d.tier == t for d in eligible)),
        None,
    )
    if tier is not None and tier != preferred:
        detail = f"no eligible {preferred} deployment; using {tier}"
        return tier, [Reason(stage="routing", kind="note", subject="step_up", detail=detail)]
    return tier, []


def _passed_over(
    eligible: list[Deployment],
    chosen: Deployment | None,
    tier: Tier | None,
    preferred: Tier,
    costs: dict[str, int],
) -> list[Reason]:
    """Why each eligible deployment but the chosen one was not chosen."""
    reasons: list[Reason] = []
    for d in eligible:
        if d is chosen:
            continue
        if tier is not None and _RANK[d.tier] > _RANK[tier]:
            detail = f"tier {d.tier} is above {tier}, the smallest adequate tier"
        elif d.tier == tier:
            detail = f"estimated {costs[d.id]} micro-USD, more than {chosen.id if chosen else '-'}"
        else:
            detail = f"tier {d.tier} is below the preferred {preferred}; kept as a budget fallback"
        reasons.append(Reason(stage="routing", kind="rejected_alternative", subject=d.id, detail=detail))
    return reasons


def _budget_options(
    ranked: list[Deployment], eligible: list[Deployment], chosen: Deployment | None, costs: dict[str, int]
) -> tuple[Deployment, ...]:
    if chosen is None:
        return ()
    lower = sorted(
        (d for d in eligible if _RANK[d.tier] < _RANK[chosen.tier]),
        key=lambda d: (-_RANK[d.tier], costs[d.id], d.id),
    )
    return (*ranked, *lower)


def _escalation(
    request: InferenceRequested, policy: RoutingPolicy, complexity: float, confidence: float
) -> Escalation | None:
    """A policy's escalation rules first (the more specific reason), then the router's own doubt."""
    esc = next((e for e in policy.escalation if matches(e.when, request, complexity)), None)
    if esc is not None:
        return Escalation(
            reason=Reason(stage="escalation", kind="rule_fired", subject=esc.id, detail=esc.reason),
            why=f"{esc.id}: {esc.reason}",
            deadline_s=esc.review_deadline_s or policy.review_deadline_s,
        )
    if confidence < policy.routing.min_confidence:
        detail = (
            f"routing confidence {confidence} < {policy.routing.min_confidence}: estimated complexity "
            f"{complexity} is too close to the {policy.routing.mid_complexity} small/mid boundary"
        )
        return Escalation(
            reason=Reason(stage="escalation", kind="rule_fired", subject="low-confidence", detail=detail),
            why=f"low-confidence: {detail}",
            deadline_s=policy.review_deadline_s,
        )
    return None


# --- the key, and a cache keyed by it -------------------------------------------------------------

# (tenant_id, feature, task_type, risk_class, data_classification, required capabilities (distinct,
# sorted), how many were listed, repr of complexity, input tokens, max_output_tokens, prompt bytes
# when over the gateway's limit else 0)
RouteKey = tuple[str, str, str, str, str, tuple[str, ...], int, str, int, int, int]


def route_key(request: InferenceRequested) -> RouteKey:
    """Exactly what ``route`` reads of a request (through admission and the complexity estimate).

    - tenant, feature, task type, risk class, data classification: admission, residency, rules;
    - the required capabilities as a set (rules, eligibility) and their count (the complexity
      estimate counts them as listed, duplicates included);
    - the caller's complexity by its ``repr``: ``0.0`` and ``-0.0`` (or ``1`` and ``1.0``) compare
      equal but are written differently in the decision;
    - the prompt only through its length in estimated tokens (``len(prompt) // 4``, at least 1) and,
      when it is over ``MAX_PROMPT_BYTES``, its size in bytes (named in the rejection);
    - ``max_output_tokens`` (context check, costs).

    Not read: ids, times, producer, trace, ``latency_slo_ms`` (the decode stage reads it),
    ``data_subject``, the prompt's text.
    """
    caps = request.required_capabilities
    return (
        request.tenant_id,
        request.feature,
        request.task_type,
        request.risk_class,
        request.data_classification,
        tuple(sorted(set(caps))),
        len(caps),
        repr(request.complexity),
        estimate_input_tokens(request.prompt),
        request.max_output_tokens,
        oversize_bytes(request.prompt),
    )


class RouteCache:
    """``route`` memoised per (policy digest, ``route_key``), least recently used first out.

    Routes are shared between the requests of one key: treat them (and their lists) as read-only.
    """

    def __init__(self, maxsize: int = 65_536) -> None:
        if maxsize < 1:
            raise ValueError("a route cache holds at least one route")
        self.maxsize = maxsize
        self.hits = 0
        self.misses = 0
        self._routes: OrderedDict[tuple[str, RouteKey], Route | Rejection] = OrderedDict()

    def __len__(self) -> int:
        return len(self._routes)

    def route(self, request: InferenceRequested, policy: RoutingPolicy) -> Route | Rejection:
        key = (policy.digest, route_key(request))
        found = self._routes.get(key)
        if found is not None:
            self.hits += 1
            self._routes.move_to_end(key)
            return found
        self.misses += 1
        routed = self._routes[key] = route(request, policy)
        if len(self._routes) > self.maxsize:
            self._routes.popitem(last=False)
        return routed
