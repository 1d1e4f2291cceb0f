"""Replay's split of ``decide``: one ``Shape`` per coarse key, then what each row adds.

``route`` (``core/_route.py``) reads a request's numbers (prompt tokens, ``max_output_tokens``,
complexity) only through comparisons with thresholds the policy names: admission's limits, each
routing and escalation rule's ``min_complexity``, the small/mid boundary, the confidence floor and
each deployment's context size. ``Planner.key`` is the request's decision-relevant attributes plus
the outcome of every one of those comparisons, so two requests of one key get the same residency,
floor, preferred tier, eligible deployments, tier and escalation verdict: worked out once per key,
by ``route`` itself, on the first request of the key (``Planner.learn``).

What the numbers feed directly (the complexity recorded, each deployment's estimated cost and so
the deployment chosen, the budget, the decode) ``Planner.decide`` works out per row with the same
pricing (``policy.cost_micros``) and the same ``decode_stage``, memoised per (chain, SLO, output
tokens, observations). The result is the decision's outcome without its prose (``Outcome``); a
property test checks it against ``decide`` on generated requests and budget states.

The planner reads the prompt by its length only, as an ASCII stand-in (what the evidence keeps).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Hashable

import msgspec

from nexuscore.core._admit import MAX_PROMPT_BYTES, Rejection
from nexuscore.core._decode_stage import LatencyView, decode_stage
from nexuscore.core._route import confidence_of, estimated_complexity, route
from nexuscore.policy import Deployment, RoutingPolicy, cost_micros
from nexuscore.schemas import TIERS, InferenceRequested, LatencyObservation

_RANK: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
# Admission's codes whose reason names the request's sizes (tokens, bytes): not one per key.
SIZED = frozenset({"input_too_large", "context_too_large", "request_too_large"})
# One latency observation as a hashable key: (deployment, strategy, p50, p95, samples).
Observed = tuple[tuple[str, str, int, int, int], ...]
PlanKey = tuple[Hashable, ...]
# Input tokens beyond this leave ``estimated_complexity`` where it is: min(0.4, tokens / 5000).
ESTIMATE_TOKENS_CAP = 2_000


class CutPoints(msgspec.Struct, frozen=True, kw_only=True):
    """The thresholds ``Planner.key`` compares a request's numbers with, for a columnar caller
    that makes the same comparisons over whole columns (replay): rows whose comparisons all agree
    (and whose attributes agree) have one key."""

    max_input_tokens: int  # tokens > this
    max_context_tokens: int  # tokens + max_output_tokens > this
    max_prompt_bytes: int  # max(1, chars) > this
    below: tuple[float, ...]  # bisect_right(below, complexity)
    mid: float  # complexity >= this
    contexts: tuple[int, ...]  # bisect_left(contexts, tokens + max_output_tokens)


class Shape(msgspec.Struct, frozen=True, kw_only=True):
    """What ``route`` decides of every request of one key (``Planner.key``)."""

    rejection: str = ""  # admission's code; the rest is empty when set
    # Admission's reason, when it names nothing of the request's sizes (else worked out per row).
    rejection_reason: str = ""
    allowed_regions: tuple[str, ...] = ()
    floor: str = "small"
    preferred: str = "small"
    tier: str | None = None
    eligible: tuple[str, ...] = ()
    # The eligible deployments of the chosen tier, and those below it (budget fallbacks).
    candidates: tuple[Deployment, ...] = ()
    lower: tuple[Deployment, ...] = ()
    # The candidates' prices per 1k tokens (input, output), id and deployment, read once.
    prices: tuple[tuple[int, int, str, Deployment], ...] = ()
    # Seconds a reviewer has, when the route escalates; None when it does not.
    escalation_deadline_s: int | None = None
    tenant_budget: int = 0
    feature_budget: int = 0
    feature_slo_ms: int = 0


class Outcome(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A decision's outcome as the evidence records it, without its reasons."""

    verdict: str  # dispatch, escalated, denied; "rejected" for an admission rejection
    reason_code: str = ""
    tier: str | None = None
    deployment_id: str | None = None
    budget_action: str = "not_applicable"
    estimated_cost_micros: int = 0
    decode_strategy: str | None = None
    predicted_latency_ms: int | None = None
    # The deployment to call, then where to fail over to (dispatch only).
    chain: tuple[str, ...] = ()
    complexity: float = 0.0


def _observed_view(observed: Observed | None) -> LatencyView | None:
    if not observed:
        return None
    seen = {
        (d, s): LatencyObservation(deployment_id=d, strategy=s, p50_ms=p50, p95_ms=p95, samples=n)
        for d, s, p50, p95, n in observed
    }
    return lambda deployment, strategy: seen.get((deployment, strategy))


class Planner:
    """``decide`` for replay under one policy: shapes per key and decodes per chain, memoised."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        r = policy.routing
        wheres = [x.when for x in r.rules] + [e.when for e in policy.escalation]
        self._below = tuple(sorted({w.min_complexity for w in wheres if w.min_complexity is not None}))
        self._contexts = tuple(sorted({d.context_tokens for d in policy.deployments}))
        self._mid, self._min_confidence = r.mid_complexity, r.min_confidence
        # Task types and risk classes no rule names are alike to ``route`` (beyond admission's list
        # and the complexity estimate, which is computed per row).
        self._tasks = {t for w in wheres for t in w.task_types}
        self._risks = {k for w in wheres for k in w.risk_classes}
        self._families: dict[tuple[Hashable, ...], tuple[Hashable, ...]] = {}
        self._shapes: dict[PlanKey, Shape] = {}
        self._decoded: dict[Hashable, tuple[Deployment, str, int, tuple[str, ...]]] = {}
        self.misses = 0

    @staticmethod
    def tokens(chars: int) -> int:
        """``estimate_input_tokens`` of the stand-in prompt (``chars`` characters, at least one)."""
        return max(1, max(1, chars) // 4)

    def key(
        self, attributes: tuple[Hashable, ...], complexity: float | None, chars: int, max_output_tokens: int
    ) -> tuple[PlanKey, int, float]:
        """The coarse key, the input tokens and the complexity of one request.

        ``attributes`` is (tenant, feature, task type, risk class, classification, capabilities as
        listed); every number enters the key only through the comparisons ``route`` makes with it.
        """
        tokens = self.tokens(chars)
        given = complexity is not None
        c = complexity if complexity is not None else estimated_complexity(
            attributes[3],  # type: ignore[arg-type]  # the risk class, a str
            tokens,
            len(attributes[5]),  # type: ignore[arg-type]  # the capabilities, a tuple
        )  # fmt: skip
        needed = tokens + max_output_tokens
        policy = self.policy
        family = self._families.get(attributes)
        if family is None:
            family = self._families[attributes] = self._family(attributes)
        key = (
            family,
            given,
            tokens > policy.max_input_tokens,
            needed > policy.max_context_tokens,
            max(1, chars) > MAX_PROMPT_BYTES,
            bisect_right(self._below, c),  # how many min_complexity thresholds c reaches
            c >= self._mid,
            not given and confidence_of(c, policy) < self._min_confidence,
            bisect_left(self._contexts, needed),  # how many context sizes are too small
        )
        return key, tokens, c

    def cut_points(self) -> CutPoints:
        policy = self.policy
        return CutPoints(
            max_input_tokens=policy.max_input_tokens, max_context_tokens=policy.max_context_tokens,
            max_prompt_bytes=MAX_PROMPT_BYTES, below=self._below, mid=self._mid, contexts=self._contexts,
        )  # fmt: skip

    def estimate(self, risk_class: str, tokens: int, capabilities_listed: int) -> tuple[float, bool]:
        """The complexity ``key`` estimates for a request that gave none, and whether its confidence
        falls below the policy's floor (``key``'s last comparison but one)."""
        c = estimated_complexity(risk_class, tokens, capabilities_listed)
        return c, confidence_of(c, self.policy) < self._min_confidence

    def _family(self, attributes: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
        """The attributes as ``route`` tells them apart: capabilities as a set, task types and risk
        classes no rule names as one."""
        tenant, feature, task, risk, classification, capabilities = attributes
        known_task = task in self.policy.task_types
        return (
            tenant,
            feature,
            task if task in self._tasks or not known_task else "",
            risk if risk in self._risks else "",
            classification,
            tuple(sorted(set(capabilities))),  # type: ignore[call-overload]  # a tuple of str
        )

    def shape(self, key: PlanKey) -> Shape | None:
        return self._shapes.get(key)

    def learn(self, key: PlanKey, request: InferenceRequested) -> Shape:
        """The shape of ``key``, from ``route`` on one of its requests (its prompt a stand-in)."""
        self.misses += 1
        routed = route(request, self.policy)
        if isinstance(routed, Rejection):
            shape = Shape(
                rejection=routed.code, rejection_reason="" if routed.code in SIZED else routed.reason
            )
        else:
            tier = routed.routing.tier
            shape = Shape(
                allowed_regions=tuple(routed.residency.allowed_regions),
                floor=routed.routing.floor_tier,
                preferred=routed.routing.preferred_tier,
                tier=tier,
                eligible=tuple(d.id for d in routed.eligible),
                candidates=tuple(d for d in routed.eligible if d.tier == tier),
                prices=tuple(
                    (d.input_micros_per_1k, d.output_micros_per_1k, d.id, d)
                    for d in routed.eligible
                    if d.tier == tier
                ),
                lower=tuple(d for d in routed.eligible if tier and _RANK[d.tier] < _RANK[tier]),
                escalation_deadline_s=routed.escalation.deadline_s if routed.escalation else None,
                tenant_budget=routed.tenant_budget_micros,
                feature_budget=routed.feature_budget_micros,
                feature_slo_ms=routed.feature_slo_ms,
            )
        self._shapes[key] = shape
        return shape

    def rejection_reason(self, shape: Shape, request: InferenceRequested) -> str:
        """Admission's reason for a request of a rejected ``shape``."""
        if shape.rejection_reason:
            return shape.rejection_reason
        routed = route(request, self.policy)
        return routed.reason if isinstance(routed, Rejection) else ""

    def decide(
        self,
        shape: Shape,
        tokens: int,
        complexity: float,
        max_output_tokens: int,
        slo_ms: int | None,
        committed: tuple[int, int],
        observed: Observed | None = None,
        *,
        approved: bool = False,
    ) -> Outcome:
        """``decide``'s outcome for one request of ``shape`` against the (tenant, feature) amounts
        already ``committed`` in the window; ``approved``: a reviewer approved it (no escalation)."""
        if shape.rejection:
            return Outcome(verdict="rejected", reason_code=shape.rejection)
        if shape.tier is None:
            return Outcome(verdict="denied", complexity=complexity)
        priced = [(cost_micros(tokens, max_output_tokens, i, o), d_id, d) for i, o, d_id, d in shape.prices]
        if len(priced) > 1:
            priced.sort()
        cost, chosen_id, chosen = priced[0]
        if shape.escalation_deadline_s is not None and not approved:
            return Outcome(
                verdict="escalated", tier=shape.tier, deployment_id=chosen_id,
                estimated_cost_micros=cost, complexity=complexity,
            )  # fmt: skip
        tenant_committed, feature_committed = committed
        tenant_budget, feature_budget = shape.tenant_budget, shape.feature_budget
        if tenant_committed + cost <= tenant_budget and feature_committed + cost <= feature_budget:
            # The usual case: the chosen deployment fits, with the same tier's others that fit.
            deployments, reserved = [chosen], cost
            for other_cost, _, other in priced[1:]:
                if (
                    tenant_committed + other_cost <= tenant_budget
                    and feature_committed + other_cost <= feature_budget
                ):
                    deployments.append(other)
                    reserved = max(reserved, other_cost)
            chain: tuple[str, int, tuple[Deployment, ...]] | None = ("reserved", reserved, tuple(deployments))
        else:
            chain = self._budget_chain(shape, priced, tokens, max_output_tokens, committed)
        if chain is None:
            return Outcome(
                verdict="denied", tier=shape.tier, deployment_id=chosen_id, budget_action="denied",
                estimated_cost_micros=cost, complexity=complexity,
            )  # fmt: skip
        action, reserved, deployments_chain = chain
        picked, strategy, predicted, ids = self._decode(
            deployments_chain, slo_ms or shape.feature_slo_ms, max_output_tokens, observed
        )
        return Outcome(
            verdict="dispatch", tier=picked.tier, deployment_id=picked.id, budget_action=action,
            estimated_cost_micros=reserved, decode_strategy=strategy, predicted_latency_ms=predicted,
            chain=ids, complexity=complexity,
        )  # fmt: skip

    def _budget_chain(
        self,
        shape: Shape,
        priced: list[tuple[int, str, Deployment]],
        tokens: int,
        max_output_tokens: int,
        committed: tuple[int, int],
    ) -> tuple[str, int, tuple[Deployment, ...]] | None:
        """``budget_stage``: the first option that fits both budgets, and the same tier's others
        that fit, cheapest first; with the action and the amount held (the dearest of them)."""
        tenant_committed, feature_committed = committed
        tenant_budget, feature_budget = shape.tenant_budget, shape.feature_budget

        def fits(cost: int) -> bool:
            return tenant_committed + cost <= tenant_budget and feature_committed + cost <= feature_budget

        if fits(priced[0][0]):  # the usual case: the chosen deployment fits
            same = [priced[0], *(p for p in priced[1:] if fits(p[0]))]
            return "reserved", max(p[0] for p in same), tuple(p[2] for p in same)
        lower = sorted(
            (-_RANK[d.tier], cost_micros(tokens, max_output_tokens, d.input_micros_per_1k, d.output_micros_per_1k), d.id, d)
            for d in shape.lower
        )  # fmt: skip
        # The options in ``route``'s order: the chosen tier cheapest first, then the lower tiers.
        options = [(_RANK[d.tier], cost, d) for cost, _, d in priced[1:]] + [
            (-r, c, d) for r, c, _, d in lower
        ]
        fitting = next((o for o in options if fits(o[1])), None)
        if fitting is None:
            return None
        tier = [fitting, *(o for o in options if o[0] == fitting[0] and o is not fitting and fits(o[1]))]
        return "downgraded", max(o[1] for o in tier), tuple(o[2] for o in tier)

    def _decode(
        self, chain: tuple[Deployment, ...], slo_ms: int, max_output_tokens: int, observed: Observed | None
    ) -> tuple[Deployment, str, int, tuple[str, ...]]:
        """``decode_stage`` on ``chain``: the deployment picked, its strategy, the predicted latency
        and the chain the worker may call, in order; memoised (one per distinct input)."""
        key = (tuple(d.id for d in chain), slo_ms, max_output_tokens, observed)
        found = self._decoded.get(key)
        if found is None:
            decoded = decode_stage(chain, slo_ms, max_output_tokens, _observed_view(observed))
            ids = (decoded.picked.id, *(d.id for d, _ in decoded.fallbacks))
            found = self._decoded[key] = (
                decoded.picked, decoded.decode.strategy, decoded.decode.predicted_latency_ms, ids,
            )  # fmt: skip
        return found
