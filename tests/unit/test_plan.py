"""Replay's planner (core/_plan.py) against ``decide``: the same outcome for every request and state.

One planner serves every example of a test, so most examples reuse a shape another request of the
same coarse key taught it: the key is what is under test, not only the per-row arithmetic.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from nexuscore.core import BudgetState, Decision, Outcome, Planner, Window, decide
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import InferenceRequested, LatencyObservation
from tests.factories import POLICY, T0, numbered, with_budgets

TIGHT = with_budgets(POLICY, "0.3", "0.02")
PLANNERS = {p.digest: Planner(p) for p in (POLICY, TIGHT)}
TENANT_FEATURES = [(t.id, f.id) for t in POLICY.tenants for f in t.features] + [("nobody", "x")]
DEPLOYMENTS = [(d.id, s.name) for d in POLICY.deployments for s in d.decode]

requests = st.builds(
    lambda i, tf, task, risk, cls, caps, chars, out, cx, slo: numbered(
        i,
        tenant_id=tf[0],
        feature=tf[1],
        task_type=task,
        risk_class=risk,
        data_classification=cls,
        required_capabilities=caps,
        prompt="x" * chars,
        max_output_tokens=out,
        complexity=cx,
        latency_slo_ms=slo,
    ),  # fmt: skip
    st.integers(0, 10**9),
    st.sampled_from(TENANT_FEATURES),
    st.sampled_from(["chat", "credit_decision", "sanctions_screening", "claims_triage", "poetry"]),
    st.sampled_from(["low", "medium", "high", "critical"]),
    st.sampled_from(["public", "internal", "confidential", "restricted"]),
    st.sampled_from([[], ["tools"], ["json"], ["vision"], ["tools", "vision"], ["tools", "tools"]]),
    # Around every threshold the policy names: complexity 0.6 at 2,500 tokens, contexts 8k-200k.
    st.integers(1, 40_000) | st.sampled_from([9_999, 10_000, 10_001, 2_499 * 4, 2_500 * 4, 31_000 * 4]),
    st.integers(1, 32768) | st.sampled_from([64, 128, 256, 512]),
    st.none() | st.floats(0, 1) | st.sampled_from([0.6, 0.95, 0.57, 0.63, 0.0]),
    st.none() | st.integers(1, 20_000),
)
observations = st.none() | st.lists(
    st.builds(
        lambda ds, p95, n: LatencyObservation(
            deployment_id=ds[0], strategy=ds[1], p50_ms=p95 // 2, p95_ms=p95, samples=n
        ),
        st.sampled_from(DEPLOYMENTS),
        st.integers(1, 20_000),
        st.integers(0, 200),
    ),
    max_size=6,
    unique_by=lambda o: (o.deployment_id, o.strategy),
)


def expected(result: object) -> Outcome:
    """The outcome as the evidence records it (the decisions table's rule for tier/deployment)."""
    if not isinstance(result, Decision):
        return Outcome(verdict="rejected", reason_code=result.code)  # type: ignore[attr-defined]
    dispatch = result.verdict == "dispatch"
    return Outcome(
        verdict=result.verdict,
        tier=result.budget.tier if dispatch else result.routing.tier,
        deployment_id=result.budget.deployment_id if dispatch else result.routing.deployment_id,
        budget_action=result.budget.action,
        estimated_cost_micros=result.budget.estimated_cost_micros,
        decode_strategy=result.decode.strategy if result.decode else None,
        predicted_latency_ms=result.decode.predicted_latency_ms if result.decode else None,
        chain=tuple(d.id for d in result.chain) if dispatch else (),
        complexity=result.routing.complexity,
    )


def planned(
    policy: RoutingPolicy,
    req: InferenceRequested,
    committed: tuple[int, int],
    seen: list[LatencyObservation] | None,
    approved: bool,
) -> tuple[Outcome, object]:
    planner = PLANNERS.get(policy.digest) or PLANNERS.setdefault(policy.digest, Planner(policy))
    attributes = (
        req.tenant_id, req.feature, req.task_type, req.risk_class, req.data_classification,
        tuple(req.required_capabilities),
    )  # fmt: skip
    key, tokens, c = planner.key(attributes, req.complexity, len(req.prompt), req.max_output_tokens)
    shape = planner.shape(key) or planner.learn(key, req)
    observed = (
        tuple((o.deployment_id, o.strategy, o.p50_ms, o.p95_ms, o.samples) for o in seen) if seen else None
    )
    outcome = planner.decide(
        shape, tokens, c, req.max_output_tokens, req.latency_slo_ms, committed, observed, approved=approved
    )
    return outcome, shape


@settings(max_examples=1500, deadline=None)
@given(
    requests,
    st.sampled_from([POLICY, TIGHT]),
    st.integers(0, 400_000),
    st.integers(0, 40_000),
    observations,
    st.booleans(),
)
def test_the_planner_gives_decides_outcome_for_every_request_and_state(
    req: InferenceRequested,
    policy: RoutingPolicy,
    tenant_reserved: int,
    feature_reserved: int,
    seen: list[LatencyObservation] | None,
    approved: bool,
) -> None:
    now = T0 + timedelta(hours=1)
    day = now.date().isoformat()
    window = Window(
        day=day, tenant_reserved=tenant_reserved, feature_reserved={req.feature: feature_reserved}
    )
    state = BudgetState(version=3, windows={day: window})
    lookup = {(o.deployment_id, o.strategy): o for o in seen or []}
    result = decide(
        req,
        policy,
        state,
        now,
        latency=lambda d, s: lookup.get((d, s)),
        approved_by="carol" if approved else "",
    )
    outcome, shape = planned(policy, req, (tenant_reserved, feature_reserved), seen, approved)
    assert outcome == expected(result)
    if isinstance(result, Decision):
        assert msgspec.structs.asdict(shape)["allowed_regions"] == tuple(result.residency.allowed_regions)
        assert (shape.floor, shape.preferred) == (result.routing.floor_tier, result.routing.preferred_tier)  # type: ignore[attr-defined]
        assert shape.eligible == tuple(result.routing.eligible)  # type: ignore[attr-defined]


def test_the_coarse_key_hits_on_recorded_traffic() -> None:
    """Synthetic traffic (prompt lengths, output limits and complexities all varied) needs few
    shapes once the first requests have taught them: the key is coarse, and still exact."""
    from nexuscore._synthetic import synthetic_requests

    planner = Planner(POLICY)
    reqs = synthetic_requests(POLICY, 20_000, seed=7, start=T0, run="plan")
    for n, r in enumerate(reqs):
        if n == 10_000:
            taught = planner.misses
        outcome = planned_with(planner, r)
        if n % 7 == 0:
            assert outcome == expected(decide(r, POLICY, BudgetState(), T0))
    assert planner.misses - taught < 10_000 / 10


def planned_with(planner: Planner, req: InferenceRequested) -> Outcome:
    attributes = (
        req.tenant_id, req.feature, req.task_type, req.risk_class, req.data_classification,
        tuple(req.required_capabilities),
    )  # fmt: skip
    stand_in = msgspec.structs.replace(req, prompt="x" * len(req.prompt))
    key, tokens, c = planner.key(attributes, req.complexity, len(req.prompt), req.max_output_tokens)
    shape = planner.shape(key) or planner.learn(key, stand_in)
    return planner.decide(shape, tokens, c, req.max_output_tokens, req.latency_slo_ms, (0, 0))
