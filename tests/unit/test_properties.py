"""Properties of the core that must hold for every input (hypothesis)."""

from __future__ import annotations

from collections import defaultdict
from datetime import timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from nexuscore.core import EMPTY_STATE, BudgetState, Decision, Reservation, decide, on_outcome, on_request
from nexuscore.schemas import DispatchRequested, InferenceRequested, OutcomeRecorded, RequestDecided
from tests.factories import POLICY, T0, numbered, with_budgets
from tests.unit._reference_decide import reference_decide
from tests.unit.test_plan import expected, planned

TENANT_FEATURES = [(t.id, f.id) for t in POLICY.tenants for f in t.features]

requests = st.builds(
    lambda i, tf, task, risk, cls, caps, words, out, cx, minutes: numbered(
        i,
        tenant_id=tf[0],
        feature=tf[1],
        task_type=task,
        risk_class=risk,
        data_classification=cls,
        required_capabilities=caps,
        prompt="word " * words,
        max_output_tokens=out,
        complexity=cx,
        occurred_at=T0 + timedelta(minutes=minutes),
    ),
    st.integers(0, 10**9),
    st.sampled_from(TENANT_FEATURES),
    st.sampled_from(["chat", "credit_decision", "sanctions_screening", "claims_triage"]),
    st.sampled_from(["low", "medium", "high", "critical"]),
    st.sampled_from(["public", "internal", "confidential", "restricted"]),
    st.sampled_from([[], ["tools"], ["json"], ["vision"], ["tools", "vision"]]),
    st.integers(1, 20_000),
    st.integers(1, 4096),
    st.none() | st.floats(0, 1),
    st.integers(0, 60 * 30),
)


@settings(max_examples=400, deadline=None)
@given(requests)
def test_no_request_is_ever_assigned_a_deployment_outside_its_allowed_regions(
    req: InferenceRequested,
) -> None:
    result = decide(req, POLICY, EMPTY_STATE, T0)
    if not isinstance(result, Decision):
        return
    tenant = POLICY.tenants_by_id[req.tenant_id]
    rule = POLICY.residency_by_class[req.data_classification]
    allowed = {tenant.home_region if r == "home" else r for r in rule.allowed}
    assert set(result.residency.allowed_regions) == allowed
    for deployment_id in [
        result.routing.deployment_id,
        result.budget.deployment_id,
        *result.routing.eligible,
    ]:
        if deployment_id is not None:
            assert POLICY.deployments_by_id[deployment_id].region in allowed
    if result.verdict == "dispatch":
        assert result.deployment is not None and result.deployment.region in allowed


@settings(max_examples=400, deadline=None)
@given(requests)
def test_frontier_is_never_chosen_unless_a_rule_demands_it(req: InferenceRequested) -> None:
    result = decide(req, POLICY, EMPTY_STATE, T0)
    if isinstance(result, Decision) and result.routing.tier == "frontier":
        assert result.routing.floor_tier == "frontier"


TIGHT = with_budgets(POLICY, "0.02", "0.01")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(requests, min_size=1, max_size=60),
    st.lists(st.integers(0, 100), min_size=60, max_size=60),
    st.randoms(use_true_random=False),
)
def test_settled_spend_never_exceeds_a_budget_by_more_than_one_estimate(
    reqs: list[InferenceRequested], bill_percent: list[int], rng: object
) -> None:
    """Requests and outcomes interleave in any order; actual bills are at most the estimate."""
    import random

    assert isinstance(rng, random.Random)
    states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
    held: dict[tuple[str, str], Reservation] = {}
    in_flight: list[DispatchRequested] = []
    max_estimate = 0
    pending = list(reqs)
    step = 0
    while pending or in_flight:
        step += 1
        if pending and (not in_flight or rng.random() < 0.6):
            req = pending.pop(0)
            key = (req.tenant_id, req.request_id)
            states[req.tenant_id], reservation, events = on_request(
                states[req.tenant_id], req, TIGHT, "t", T0, held.get(key)
            )
            if reservation is not None:
                held[key] = reservation
            for e in events:
                if isinstance(e, DispatchRequested):
                    in_flight.append(e)
                    max_estimate = max(max_estimate, e.estimated_cost_micros)
                if isinstance(e, RequestDecided):
                    assert e.budget.tenant_committed_micros <= e.budget.tenant_budget_micros
        else:
            d = in_flight.pop(rng.randrange(len(in_flight)))
            actual = d.estimated_cost_micros * bill_percent[step % 60] // 100
            outcome = OutcomeRecorded(
                event_id=d.event_id + "-o", request_id=d.request_id, tenant_id=d.tenant_id, occurred_at=T0,
                producer="t", status="answered", feature=d.feature, deployment_id=d.deployment_id, model=d.model,
                model_version="m", region=d.region, attempts=1, input_tokens=1, output_tokens=1,
                cost_micros=actual, latency_ms=1.0, response="", finish_reason="stop",
            )  # fmt: skip
            states[d.tenant_id], _ = on_outcome(
                states[d.tenant_id], held.pop((d.tenant_id, d.request_id), None), outcome, "t", T0
            )
            # A duplicate outcome finds no reservation and must not be billed twice.
            again, events = on_outcome(
                states[d.tenant_id], held.get((d.tenant_id, d.request_id)), outcome, "t", T0
            )
            assert again == states[d.tenant_id] and events == []
    for tenant_id, state in states.items():
        tenant = TIGHT.tenants_by_id[tenant_id]
        budget = int(tenant.daily_budget_usd * 1_000_000)
        feature_budget = int(tenant.features[0].daily_budget_usd * 1_000_000)
        assert not held
        for window in state.windows.values():
            assert window.tenant_reserved == 0
            assert window.tenant_settled <= budget + max_estimate
            # Bills never exceed estimates here, so the stronger invariant holds too.
            assert window.tenant_settled <= budget
            for spent in window.feature_settled.values():
                assert spent <= feature_budget


@settings(max_examples=150, deadline=None)
@given(st.lists(requests, min_size=1, max_size=60))
def test_replays_planner_gives_the_reference_decisions_along_a_generated_history(
    reqs: list[InferenceRequested],
) -> None:
    """The fast path replay runs (``Planner``: a shape per coarse key, the rest per row) against the
    frozen reference ``decide``, request after request, the budget folded as the decider folds it:
    the same outcome at every step, however the budget has moved."""
    states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
    for req in reqs:
        req = msgspec.structs.replace(req, prompt="x" * len(req.prompt))  # what the evidence keeps
        state = states[req.tenant_id]
        window = state.window(T0.date().isoformat())
        committed = (window.tenant_committed, window.feature_committed(req.feature))
        outcome, _ = planned(TIGHT, req, committed, None, approved=False)
        assert outcome == expected(reference_decide(req, TIGHT, state, T0))
        states[req.tenant_id], _, _ = on_request(state, req, TIGHT, "t", T0)
