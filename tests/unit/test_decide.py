"""The decision core: residency, routing, escalation, budget and decode, with no mocks."""

from __future__ import annotations

from nexuscore.core import EMPTY_STATE, Decision, Rejection, Reservation, decide, reserve
from nexuscore.policy import tier_rank
from tests.factories import POLICY, T0, request, with_budgets


def decided(**overrides: object) -> Decision:
    result = decide(request(**overrides), POLICY, EMPTY_STATE, T0)
    assert isinstance(result, Decision), result
    return result


def test_a_simple_low_risk_request_gets_the_cheapest_small_deployment_it_may_use() -> None:
    d = decided(data_classification="public")
    assert d.verdict == "dispatch"
    assert d.routing.tier == "small"
    # Public data may go anywhere: the cheapest small deployment whose context fits wins.
    assert d.deployment is not None and d.deployment.id == "onprem-small-1"
    assert d.budget.action == "reserved"


def test_confidential_data_stays_in_the_tenants_home_region() -> None:
    d = decided(data_classification="confidential")
    assert d.residency.allowed_regions == ["eu"]
    assert d.deployment is not None and d.deployment.region == "eu"
    rejected = {
        r.subject: r.detail for r in d.reasons if r.stage == "residency" and r.kind == "rejected_alternative"
    }
    assert set(rejected) == {"us-small-1", "onprem-small-1", "us-mid-1", "onprem-mid-1", "us-frontier-1"}
    assert "outside" in rejected["us-small-1"]


def test_restricted_data_goes_on_premises_only() -> None:
    d = decided(tenant_id="globex-insurance", feature="claims-triage", data_classification="restricted")
    assert d.residency.allowed_regions == ["on-prem"]
    assert d.deployment is not None and d.deployment.region == "on-prem"


def test_a_rule_sets_the_floor_tier_and_records_why() -> None:
    d = decided(feature="credit-memo", task_type="credit_decision", risk_class="high", complexity=0.2)
    assert d.routing.floor_tier == "mid"
    assert d.routing.tier == "mid"
    fired = [r.subject for r in d.reasons if r.kind == "rule_fired" and r.stage == "routing"]
    assert fired == ["credit-decisions-need-mid"]


def test_frontier_only_where_a_rule_demands_it() -> None:
    high_complexity = decided(complexity=0.99, feature="kyc-screening")
    assert high_complexity.routing.tier == "mid"  # complexity alone never reaches frontier
    sanctions = decided(task_type="sanctions_screening", risk_class="high", feature="kyc-screening")
    assert sanctions.routing.floor_tier == "frontier"
    assert sanctions.routing.tier == "frontier"


def test_every_deployment_is_either_chosen_or_rejected_with_a_reason() -> None:
    d = decided(
        feature="credit-memo",
        task_type="credit_decision",
        risk_class="medium",
        data_classification="internal",
    )
    assert d.deployment is not None
    rejected = {
        r.subject
        for r in d.reasons
        if r.kind == "rejected_alternative" and r.stage in ("residency", "routing")
    }
    assert rejected | {d.deployment.id} == {dep.id for dep in POLICY.deployments}
    assert d.deployment.id not in rejected


def test_a_missing_capability_rejects_the_deployment() -> None:
    d = decided(required_capabilities=["vision"], data_classification="public")
    # Only frontier deployments have vision, and no rule demands frontier: nothing may serve it.
    assert d.verdict == "denied"
    assert d.verdict_reason.startswith("no_eligible_deployment")
    assert any("lacks capabilities vision" in r.detail for r in d.reasons)


def test_critical_risk_is_escalated_to_a_person() -> None:
    d = decided(risk_class="critical")
    assert d.verdict == "escalated"
    assert d.budget.action == "not_applicable"
    assert any(r.stage == "escalation" and r.subject == "critical-risk-needs-human" for r in d.reasons)


def test_admission_rejects_unknown_tenants_and_features_and_oversized_context() -> None:
    assert decide(request(tenant_id="nobody"), POLICY, EMPTY_STATE, T0) == Rejection(
        code="unknown_tenant", reason=f"tenant 'nobody' is not in policy {POLICY.version}"
    )
    r = decide(request(feature="claims-triage"), POLICY, EMPTY_STATE, T0)
    assert isinstance(r, Rejection) and r.code == "unknown_feature"
    r = decide(request(prompt="x" * 4 * 250_000), POLICY, EMPTY_STATE, T0)
    assert isinstance(r, Rejection) and r.code == "input_too_large"
    roomy = POLICY.model_copy(update={"max_input_tokens": 1_000_000})
    r = decide(request(prompt="x" * 4 * 190_000, max_output_tokens=32_000), roomy, EMPTY_STATE, T0)
    assert isinstance(r, Rejection) and r.code == "context_too_large"


def test_budget_denies_when_the_feature_budget_is_spent() -> None:
    policy = with_budgets(POLICY, "100", "0.0001")  # 100 micro-USD a day per feature
    first = decide(request(), policy, EMPTY_STATE, T0)
    assert isinstance(first, Decision) and first.verdict == "dispatch"
    state = reserve(EMPTY_STATE, Reservation(day=first.day, feature="support-chat", amount=90))
    second = decide(request(request_id="req-2"), policy, state, T0)
    assert isinstance(second, Decision)
    assert second.verdict == "denied"
    assert second.budget.action == "denied"
    assert second.verdict_reason.startswith("budget_exhausted")
    assert second.budget.feature_committed_micros == 90


def test_budget_downgrades_to_a_cheaper_tier_when_no_rule_forbids_it() -> None:
    # Complexity suggests mid; no rule sets a floor, so small is an acceptable budget fallback.
    req = {"complexity": 0.9, "data_classification": "public", "prompt": "p" * 8000, "max_output_tokens": 512}
    unconstrained = decided(**req)
    assert unconstrained.routing.preferred_tier == "mid" and unconstrained.deployment is not None
    # The cheapest mid deployment's own cost (the reservation also covers its failover chain).
    mid_cost = unconstrained.deployment.cost_micros(unconstrained.input_tokens, 512)
    policy = with_budgets(POLICY, "100", str(round((mid_cost - 1) / 1e6, 6)))
    d = decide(request(**req), policy, EMPTY_STATE, T0)
    assert isinstance(d, Decision)
    assert d.verdict == "dispatch"
    assert d.budget.action == "downgraded"
    assert d.deployment is not None and d.deployment.tier == "small"


def test_budget_never_downgrades_below_a_rules_floor() -> None:
    req = {"feature": "credit-memo", "task_type": "credit_decision", "risk_class": "high", "complexity": 0.1}
    first = decided(**req)
    tokens = request(**req).max_output_tokens
    cost = min(d.cost_micros(first.input_tokens, tokens) for d in first.chain)
    policy = with_budgets(POLICY, "100", str(round((cost - 1) / 1e6, 6)))
    d = decide(request(**req), policy, EMPTY_STATE, T0)
    assert isinstance(d, Decision) and d.verdict == "denied" and d.budget.action == "denied"
    tried = [r.subject for r in d.reasons if r.stage == "budget" and r.kind == "rejected_alternative"]
    assert tried, "the budget stage must say what it tried"
    # Only deployments at or above the rule's floor were ever considered.
    assert all(tier_rank(POLICY.deployments_by_id[t].tier) >= tier_rank("mid") for t in tried)


def test_decode_strategy_follows_the_latency_slo() -> None:
    req = {
        "feature": "credit-memo",
        "task_type": "credit_decision",
        "risk_class": "high",
        "data_classification": "confidential",  # eu only: eu-mid-1 offers speculative decoding
        "max_output_tokens": 400,
    }
    relaxed = decided(**req, latency_slo_ms=20_000)
    assert relaxed.decode is not None and relaxed.decode.strategy == "standard" and relaxed.decode.fits_slo
    tight = decided(**req, latency_slo_ms=5_000)
    assert tight.decode is not None and tight.decode.strategy == "speculative" and tight.decode.fits_slo
    impossible = decided(**req, latency_slo_ms=100)
    assert impossible.decode is not None and not impossible.decode.fits_slo
    assert impossible.decode.strategy == "speculative"  # the fastest, with the miss recorded
    assert any(r.stage == "decode" and "no strategy fits" in r.detail for r in impossible.reasons)


def test_deciding_is_deterministic() -> None:
    r = request(feature="credit-memo", task_type="credit_decision", risk_class="medium", occurred_at=T0)
    assert decide(r, POLICY, EMPTY_STATE, T0) == decide(r, POLICY, EMPTY_STATE, T0)


def test_the_budget_window_is_the_deciders_day_not_the_callers_timestamp() -> None:
    policy = with_budgets(POLICY, "100", "0.0001")
    spent_today = reserve(
        EMPTY_STATE, Reservation(day=T0.date().isoformat(), feature="support-chat", amount=90)
    )
    future = request(occurred_at=T0.replace(year=2030))
    d = decide(future, policy, spent_today, T0)
    assert isinstance(d, Decision)
    # Dating a request in the future does not open a fresh budget.
    assert d.day == T0.date().isoformat() and d.verdict == "denied"
