"""The pure parts of resilience: circuit breaker, latency window, kill switches, reviews, failover."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from nexuscore.core import EMPTY_STATE, BreakerConfig, Decision, decide, on_request, on_review
from nexuscore.core._breaker import CLOSED, admit, adopt, record
from nexuscore.core._latency import EMPTY_WINDOW, MAX_SAMPLES, WINDOW_S, observe, quantile
from nexuscore.policy import Controls
from nexuscore.schemas import (
    DispatchRequested,
    EscalationResolved,
    KillSwitchChanged,
    RequestDecided,
    ReviewRecorded,
)
from tests.factories import POLICY, T0, request

CONFIG = BreakerConfig(failure_threshold=3, cool_down_s=10)


def test_a_breaker_opens_after_consecutive_failures_probes_once_after_the_cool_down_and_closes() -> None:
    b = CLOSED
    for _ in range(2):
        b, change = record(b, False, T0, CONFIG, "HTTP 503")
        assert change is None and b.state == "closed"
    b, change = record(b, False, T0, CONFIG, "HTTP 503")
    assert change is not None and (change.from_state, change.to_state) == ("closed", "open")
    assert b.open_until == T0 + timedelta(seconds=10) and "3 consecutive failures: HTTP 503" in change.reason
    assert admit(b, T0 + timedelta(seconds=9))[0] is False
    allowed, b, change = admit(b, T0 + timedelta(seconds=10))
    assert allowed and b.state == "half_open" and change is not None
    assert admit(b, T0 + timedelta(seconds=10))[0] is False  # one probe at a time
    b, change = record(b, True, T0, CONFIG)
    assert b == CLOSED and change is not None and change.to_state == "closed"


def test_a_failed_probe_opens_the_breaker_again_and_a_success_resets_the_count() -> None:
    b, _ = record(CLOSED, False, T0, CONFIG)
    b, _ = record(b, True, T0, CONFIG)
    assert b == CLOSED
    half_open = msgspec.structs.replace(CLOSED, state="half_open")
    b, change = record(half_open, False, T0, CONFIG, "timeout")
    assert b.state == "open" and change is not None and change.reason.startswith("probe call failed")


def test_another_workers_opening_is_adopted_and_the_later_deadline_wins() -> None:
    later, earlier = T0 + timedelta(seconds=20), T0 + timedelta(seconds=5)
    b = adopt(CLOSED, "open", later)
    assert b.state == "open" and b.open_until == later
    assert adopt(b, "open", earlier).open_until == later
    assert adopt(b, "closed", None) == CLOSED


@given(st.lists(st.floats(min_value=0, max_value=60_000), min_size=1, max_size=400))
def test_the_latency_window_keeps_the_newest_samples_and_its_quantiles_are_nearest_rank(
    values: list[float],
) -> None:
    w = EMPTY_WINDOW
    for v in values:
        w = observe(w, v, T0)
    kept = values[-MAX_SAMPLES:]
    assert list(w.latency_ms) == kept
    assert w.p50_ms == quantile(sorted(kept), 0.5) and w.p95_ms == quantile(sorted(kept), 0.95)
    assert min(kept) <= w.p50_ms <= w.p95_ms <= max(kept) + 1


@given(
    st.lists(st.tuples(st.integers(0, 3 * WINDOW_S), st.floats(min_value=-5, max_value=60_000)), max_size=300)
)
# Generated lists stay short: these two reach MAX_SAMPLES, one within the span, one past it.
@example([(n, float(n)) for n in range(MAX_SAMPLES + 50)])
@example([(3 * n, float(n)) for n in range(MAX_SAMPLES + 60)])
def test_the_latency_window_is_its_definition_whatever_order_the_calls_come_in(
    calls: list[tuple[int, float]],
) -> None:
    # The definition: every call of the last WINDOW_S seconds (by the newest call's time), in the
    # order they came, the newest MAX_SAMPLES of them; quantiles nearest-rank.
    w, kept = EMPTY_WINDOW, []
    for offset_s, latency in calls:
        now = T0 + timedelta(seconds=offset_s)
        now_us = int(now.timestamp() * 1_000_000)
        w = observe(w, latency, now)
        kept = [(t, v) for t, v in kept if t >= now_us - WINDOW_S * 1_000_000]
        kept = [*kept, (now_us, max(0.0, latency))][-MAX_SAMPLES:]
        assert w.at_us == tuple(t for t, _ in kept) and w.latency_ms == tuple(v for _, v in kept)
        values = sorted(v for _, v in kept)
        assert (w.p50_ms, w.p95_ms) == (quantile(values, 0.5), quantile(values, 0.95))


def test_the_latency_window_forgets_calls_older_than_its_span() -> None:
    w = observe(EMPTY_WINDOW, 5000.0, T0)
    w = observe(w, 100.0, T0 + timedelta(seconds=WINDOW_S + 1))
    assert list(w.latency_ms) == [100.0] and w.p95_ms == 100


def _switch(scope: str, target: str, mode: str) -> KillSwitchChanged:
    return KillSwitchChanged(
        event_id=f"k-{scope}-{target}-{mode}", request_id="", tenant_id="", occurred_at=T0, producer="t",
        scope=scope, target=target, mode=mode, actor="dana", reason="outage",
    )  # fmt: skip


def test_the_most_restrictive_switch_covering_a_request_applies_and_on_lifts_it() -> None:
    c = Controls().apply(_switch("global", "", "offline")).apply(_switch("tenant", "acme-bank", "off"))
    switch = c.for_request("acme-bank", "support-chat")
    assert switch is not None and switch.mode == "off"
    other = c.for_request("globex-insurance", "support-chat")
    assert other is not None and other.mode == "offline"
    c = c.apply(_switch("tenant", "acme-bank", "on"))
    lifted = c.for_request("acme-bank", "support-chat")
    assert lifted is not None and lifted.mode == "offline"
    feature_only = Controls().apply(_switch("feature", "acme-bank/kyc-screening", "off"))
    assert feature_only.for_request("acme-bank", "kyc-screening") is not None
    assert feature_only.for_request("acme-bank", "support-chat") is None


def test_an_estimated_complexity_on_the_boundary_is_escalated_for_low_confidence() -> None:
    policy = POLICY.model_copy(update={"routing": POLICY.routing.model_copy(update={"min_confidence": 0.6})})
    # low risk 0.1 + 2000 tokens 0.4 + one capability 0.1: exactly on the 0.6 boundary
    boundary = request(complexity=None, risk_class="low", prompt="x" * 8000, required_capabilities=["json"])
    near = decide(boundary, policy, EMPTY_STATE, T0)
    assert isinstance(near, Decision) and near.verdict == "escalated"
    assert near.verdict_reason.startswith("low-confidence") and near.routing.confidence < 0.6
    assert near.review_deadline_s == policy.review_deadline_s
    given_by_caller = decide(request(complexity=0.6), policy, EMPTY_STATE, T0)
    assert isinstance(given_by_caller, Decision) and given_by_caller.routing.confidence == 1.0
    assert given_by_caller.verdict == "dispatch"


@pytest.mark.parametrize("classification", ["public", "internal", "confidential", "restricted"])
def test_the_failover_chain_stays_in_the_allowed_regions_and_tier_and_the_reservation_covers_it(
    classification: str,
) -> None:
    d = decide(request(data_classification=classification, complexity=0.1), POLICY, EMPTY_STATE, T0)
    assert isinstance(d, Decision) and d.verdict == "dispatch" and d.deployment is not None
    costs = [x.cost_micros(d.input_tokens, request().max_output_tokens) for x in d.chain]
    assert d.budget.estimated_cost_micros == max(costs)
    for x in d.chain:
        assert x.region in d.residency.allowed_regions and x.tier == d.deployment.tier
    assert d.routing.fallbacks == [x.id for x, _ in d.fallbacks]


def _escalated() -> tuple[RequestDecided, object]:
    req = request(request_id="crit", risk_class="critical")
    decided = on_request(EMPTY_STATE, req, POLICY, "d", T0)[2][0]
    assert isinstance(decided, RequestDecided) and decided.verdict == "escalated"
    return decided, req


def _review(action: str, at: object = T0) -> ReviewRecorded:
    return ReviewRecorded(
        event_id=f"r-{action}", request_id="crit", tenant_id="acme-bank", occurred_at=at, producer="cli",  # type: ignore[arg-type]  # a datetime
        action=action, reviewer="carol", reason="looked at it",  # type: ignore[arg-type]  # one of the three
    )  # fmt: skip


def test_an_approval_reserves_and_dispatches_and_a_denial_or_timeout_only_ends_the_request() -> None:
    decided, req = _escalated()
    assert decided.review_deadline is not None
    state, held, events = on_review(EMPTY_STATE, req, decided, _review("approved"), POLICY, "d", T0)  # type: ignore[arg-type]  # an InferenceRequested
    resolved, dispatch = events
    assert isinstance(resolved, EscalationResolved) and resolved.resolution == "dispatched"
    assert isinstance(dispatch, DispatchRequested) and held is not None
    assert (
        state.window(T0.date().isoformat()).tenant_reserved == held.amount == dispatch.estimated_cost_micros
    )
    assert any(r.subject == "review" and "carol" in r.detail for r in resolved.reasons)
    for action, at, expected in [
        ("denied", T0, "denied"),
        ("timed_out", decided.review_deadline, "timed_out"),
        ("approved", decided.review_deadline + timedelta(seconds=1), "timed_out"),
    ]:
        state, held, events = on_review(EMPTY_STATE, req, decided, _review(action, at), POLICY, "d", at)  # type: ignore[arg-type]  # as above
        [only] = events
        assert isinstance(only, EscalationResolved) and only.resolution == expected and held is None
        assert state.window(T0.date().isoformat()).tenant_reserved == 0


def test_a_damaged_window_is_refused_not_paired_out_of_step() -> None:
    damaged = msgspec.structs.replace(observe(EMPTY_WINDOW, 5.0, T0), latency_ms=(5.0, 6.0))
    with pytest.raises(ValueError, match="1 times and 2 latencies"):
        observe(damaged, 7.0, T0)
