"""``decide`` split into stages (route -> budget -> decode) decides exactly as the single function did.

``_reference_decide.py`` is a frozen copy of ``decide`` from before the split. For generated
requests, policies, budget states, latency views and approvals, today's ``decide`` must give the
same result: equal by value and equal in ``repr`` (so ``-0.0`` for ``0.0``, or ``1`` for ``1.0``,
would show). The same holds for a route taken from a ``RouteCache`` and completed with
``decide_on_route``, and a route depends on nothing of the request but its ``route_key``.
"""

from __future__ import annotations

import ast
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore._synthetic import synthetic_requests
from nexuscore.core import (
    EMPTY_STATE,
    MAX_PROMPT_BYTES,
    BudgetState,
    Decision,
    LatencyView,
    Rejection,
    Reservation,
    Route,
    RouteCache,
    Window,
    decide,
    decide_on_route,
    reserve,
    route,
    route_key,
)
from nexuscore.core._latency import MIN_SAMPLES
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import InferenceRequested, LatencyObservation
from tests.factories import POLICY, T0, request, with_budgets
from tests.unit._reference_decide import reference_decide


def _variant(policy: RoutingPolicy) -> RoutingPolicy:
    """A policy that reaches what the default one does not: a missing residency rule, a small input
    limit (context_too_large), a routing rule without a reason, three decode strategies, a low
    small/mid boundary and a high confidence bar."""
    data: dict[str, Any] = policy.model_dump(mode="json")
    data["version"] = "variant"
    data["max_input_tokens"] = 60_000
    data["residency"] = [r for r in data["residency"] if r["classification"] != "restricted"]
    data["routing"]["mid_complexity"] = 0.35
    data["routing"]["min_confidence"] = 0.7
    data["routing"]["rules"].append(
        {"id": "extract-mid", "when": {"task_types": ["extract"]}, "min_tier": "mid"}
    )
    data["escalation"].append(
        {"id": "kyc-complex", "when": {"task_types": ["kyc_check"], "min_complexity": 0.8}, "reason": "kyc"}
    )
    for d in data["deployments"]:
        if d["tier"] == "frontier":
            d["context_tokens"] = 20_000
        if d["id"] == "eu-mid-1":
            d["decode"].append({"name": "turbo", "ttft_ms": 90, "ms_per_output_token": 4})
    return RoutingPolicy.model_validate(data)


POLICIES = (POLICY, with_budgets(POLICY, "2", "1"), with_budgets(POLICY, "0.01", "0.004"), _variant(POLICY))
TENANT_FEATURES = sorted(
    {(t.id, f.id) for t in POLICY.tenants for f in t.features}
    | {("unknown-tenant", "support-chat"), ("acme-bank", "no-such-feature")}
)
TASKS = (*POLICY.task_types, "poetry")
PAIRS = sorted({(d.id, s.name) for p in POLICIES for d in p.deployments for s in d.decode})
# Each character of the generated prompts for another of the same UTF-8 size.
SAME_SIZE = str.maketrans({"x": "y", "é": "ß", "€": "₤", "\U0001f600": "\U0001f601"})
# Shared by every example, so that later examples hit routes the earlier ones cached.
CACHE = RouteCache(maxsize=4096)

# Strategies built once, at import: building them per example costs more than deciding.
prompts = st.builds(
    lambda ch, n: ch * n,
    st.sampled_from(["x", "é", "€", "\U0001f600"]),
    st.one_of(st.integers(1, 2_000), st.integers(1, 90_000), st.integers(120_000, 410_000)),
)
complexities = st.one_of(
    st.none(),
    st.floats(0, 1),
    st.sampled_from([0.0, -0.0, 0.34, 0.35, 0.36, 0.57, 0.6, 0.63, 0.8, 0.95, 1.0]),
)
requests = st.builds(
    lambda tf, task, risk, cls, caps, prompt, out, cx, slo: request(
        tenant_id=tf[0],
        feature=tf[1],
        task_type=task,
        risk_class=risk,
        data_classification=cls,
        required_capabilities=caps,
        prompt=prompt,
        max_output_tokens=out,
        complexity=cx,
        latency_slo_ms=slo,
    ),
    st.sampled_from(TENANT_FEATURES),
    st.sampled_from(TASKS),
    st.sampled_from(["low", "medium", "high", "critical"]),
    st.sampled_from(["public", "internal", "confidential", "restricted"]),
    st.lists(st.sampled_from(["tools", "json", "vision", "audio"]), max_size=3),
    prompts,
    st.one_of(
        st.integers(1, 600), st.integers(1, 4_096), st.integers(1, 32_768), st.integers(20_000, 32_768)
    ),
    complexities,
    st.one_of(st.none(), st.integers(1, 30_000)),
)
amounts = st.one_of(st.just(0), st.integers(0, 40_000), st.integers(0, 3_000_000), st.integers(0, 60_000_000))
# Which day; what is near its limit and by how much (committed = budget - headroom); tenant and
# feature amounts; the share of them settled (percent); another feature's amount.
windows = st.none() | st.tuples(
    st.booleans(),
    st.sampled_from(["", "tenant", "feature", "both"]),
    st.integers(0, 3_000) | st.integers(0, 100_000),
    amounts,
    amounts,
    st.integers(0, 100),
    amounts,
)
# All (deployment, strategy) pairs seen with few samples, many or a mix: a base p95 and a spread.
observations = st.tuples(
    st.sampled_from(["few", "many", "mixed"]),
    st.integers(1, 30_000),
    st.integers(0, 20_000),
    st.integers(0, 7),
)
cases = st.tuples(
    requests,
    st.sampled_from(POLICIES),
    st.integers(0, 3 * 24 * 60),
    windows,
    st.none() | observations,
    st.sampled_from(["", "", "", "alice@bank"]),
)


def _state(
    spec: tuple[Any, ...] | None, policy: RoutingPolicy, req: InferenceRequested, day: str
) -> BudgetState:
    """Empty, or a window partly spent, nearly or wholly exhausted, of the day decided or of another."""
    if spec is None:
        return EMPTY_STATE
    this_day, near, headroom, tenant_amount, feature_amount, settled_pct, other = spec
    tenant = policy.tenants_by_id.get(req.tenant_id)
    feature = next((f for f in tenant.features if f.id == req.feature), None) if tenant else None
    if tenant is not None and near in ("tenant", "both"):
        tenant_amount = max(0, int(tenant.daily_budget_usd * 1_000_000) - headroom)
    if feature is not None and near in ("feature", "both"):
        feature_amount = max(0, int(feature.daily_budget_usd * 1_000_000) - headroom)
    tenant_settled = tenant_amount * settled_pct // 100
    feature_settled = feature_amount * settled_pct // 100
    window = Window(
        day=day if this_day else "2026-11-01",
        tenant_settled=tenant_settled,
        tenant_reserved=tenant_amount - tenant_settled,
        feature_settled={req.feature: feature_settled, "other": other},
        feature_reserved={} if settled_pct == 100 else {req.feature: feature_amount - feature_settled},
    )
    return BudgetState(version=settled_pct, windows={window.day: window})


def _view(spec: tuple[Any, ...] | None) -> LatencyView | None:
    """None, or what the Latency Controller saw of every pair: few samples (the prior predicts),
    many (the window's p95 predicts) or some of each; some pairs not seen at all."""
    if spec is None:
        return None
    mode, base, spread, skip = spec
    seen: dict[tuple[str, str], LatencyObservation] = {}
    for i, (deployment, strategy) in enumerate(PAIRS):
        if skip and i % (skip + 1) == 0:
            continue
        many = mode == "many" or (mode == "mixed" and i % 2 == 0)
        p95 = base + (i * 7919) % (spread + 1)
        seen[(deployment, strategy)] = LatencyObservation(
            deployment_id=deployment,
            strategy=strategy,
            p50_ms=p95 // 2,
            p95_ms=p95,
            samples=MIN_SAMPLES + i if many else i % MIN_SAMPLES,
        )
    return lambda deployment, strategy: seen.get((deployment, strategy))


def _same(actual: object, expected: object) -> None:
    assert actual == expected
    assert repr(actual) == repr(expected)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_decide_is_the_single_function_it_replaced(case: tuple[Any, ...]) -> None:
    req, policy, minutes, window, seen, approved_by = case
    now = T0 + timedelta(minutes=minutes)
    state, latency = _state(window, policy, req, now.date().isoformat()), _view(seen)
    expected = reference_decide(req, policy, state, now, latency=latency, approved_by=approved_by)
    _same(decide(req, policy, state, now, latency=latency, approved_by=approved_by), expected)
    # The same through the cache: a route shared with earlier requests of the same key.
    routed = CACHE.route(req, policy)
    _same(routed, route(req, policy))
    if isinstance(routed, Rejection):
        _same(routed, expected)
    else:
        completed = decide_on_route(routed, req, state, now, latency=latency, approved_by=approved_by)
        _same(completed, expected)


def _sweep_case(rnd: random.Random) -> tuple[Any, ...]:
    """One case drawn uniformly from the same domains as the property test's (which favours small
    values), so that every path is taken in a few thousand cases."""
    tenant, feature = rnd.choice(TENANT_FEATURES)
    length = rnd.choice((rnd.randint(1, 2_000), rnd.randint(1, 90_000), rnd.randint(120_000, 410_000)))
    req = request(
        tenant_id=tenant,
        feature=feature,
        task_type=rnd.choice(TASKS),
        risk_class=rnd.choice(["low", "medium", "high", "critical"]),
        data_classification=rnd.choice(["public", "internal", "confidential", "restricted"]),
        required_capabilities=rnd.choices(
            ["tools", "json", "vision", "audio"], k=rnd.choice((0, 0, 1, 2, 3))
        ),
        prompt=rnd.choice(["x", "x", "é", "€", "\U0001f600"]) * length,
        max_output_tokens=rnd.choice((rnd.randint(1, 600), rnd.randint(1, 4_096), rnd.randint(1, 32_768))),
        complexity=rnd.choice((None, None, rnd.random(), 0.0, -0.0, 0.6, 0.95, 1.0)),
        latency_slo_ms=rnd.choice((None, rnd.randint(1, 30_000))),
    )

    def amount() -> int:
        return rnd.choice((0, rnd.randint(0, 40_000), rnd.randint(0, 3_000_000), rnd.randint(0, 60_000_000)))

    window = rnd.choice((None, (rnd.random() < 0.8, rnd.choice(["", "tenant", "feature", "both"]),
                               rnd.choice((rnd.randint(0, 3_000), rnd.randint(0, 100_000))),
                               amount(), amount(), rnd.randint(0, 100), amount())))  # fmt: skip
    seen = rnd.choice((None, (rnd.choice(["few", "many", "mixed"]), rnd.randint(1, 30_000), rnd.randint(0, 20_000), rnd.randint(0, 7))))  # fmt: skip
    approved_by = rnd.choice(("", "", "", "alice@bank"))
    return req, rnd.choice(POLICIES), rnd.randint(0, 3 * 24 * 60), window, seen, approved_by


def _outcome(result: Decision | Rejection) -> set[str]:
    if isinstance(result, Rejection):
        return {result.code}
    out = {f"{result.verdict}/{result.budget.action}", f"fallbacks={min(len(result.fallbacks), 2)}"}
    if result.decode is not None:
        out.add(f"{result.decode.basis}/fits={result.decode.fits_slo}")
    out.update(f"{x.stage}:{x.subject}" for x in result.reasons if x.kind == "note")
    return out


def test_a_seeded_sweep_decides_as_before_and_takes_every_path() -> None:
    rnd = random.Random(2026)
    seen: set[str] = set()
    for _ in range(4000):
        req, policy, minutes, window, observed, approved_by = _sweep_case(rnd)
        now = T0 + timedelta(minutes=minutes)
        state, latency = _state(window, policy, req, now.date().isoformat()), _view(observed)
        expected = reference_decide(req, policy, state, now, latency=latency, approved_by=approved_by)
        _same(decide(req, policy, state, now, latency=latency, approved_by=approved_by), expected)
        seen |= _outcome(expected)
    every_path = {
        *("unknown_tenant", "unknown_feature", "unknown_task_type", "no_residency_rule"),
        *("input_too_large", "context_too_large", "request_too_large"),
        *("dispatch/reserved", "dispatch/downgraded", "denied/denied", "denied/not_applicable"),
        *("escalated/not_applicable", "fallbacks=0", "fallbacks=1", "fallbacks=2"),
        *("policy/fits=True", "policy/fits=False", "observed/fits=True", "observed/fits=False"),
        *("routing:complexity", "routing:step_up", "routing:failover", "escalation:review"),
    }
    assert every_path <= seen, every_path - seen


@settings(max_examples=300, deadline=None)
@given(requests, st.sampled_from(POLICIES), st.randoms(use_true_random=False))
def test_a_route_depends_on_nothing_but_its_key(
    req: InferenceRequested, policy: RoutingPolicy, rnd: Any
) -> None:
    caps = list(req.required_capabilities)
    rnd.shuffle(caps)
    # Another text of the same length (and bytes: an oversized prompt is named by its size), other
    # ids, times, SLO and subject, the capabilities in another order.
    prompt = req.prompt.translate(SAME_SIZE)
    assert prompt != req.prompt
    other = msgspec.structs.replace(
        req,
        event_id="other",
        request_id="other",
        occurred_at=T0 - timedelta(days=400),
        producer="elsewhere",
        causation_id="cause",
        trace_id="trace",
        policy_digest="sha256:other",
        prompt=prompt,
        latency_slo_ms=None if req.latency_slo_ms else 7,
        data_subject="someone",
        required_capabilities=caps,
    )
    assert route_key(other) == route_key(req)
    _same(route(other, policy), route(req, policy))


def test_requests_differing_only_in_prompt_text_of_the_same_length_share_a_key() -> None:
    a = request(prompt="What is the balance on my account?")
    b = request(prompt="Wire 1,000 EUR to acct 12345678 ok")
    c = request(prompt="What is the balance on my account?!")  # same tokens (len // 4), longer text
    assert len(a.prompt) == len(b.prompt) and a.prompt != b.prompt
    assert route_key(a) == route_key(b) == route_key(c)
    _same(route(a, POLICY), route(b, POLICY))
    # The cache answers the second from the first.
    cache = RouteCache()
    first, second = cache.route(a, POLICY), cache.route(b, POLICY)
    assert second is first and (cache.hits, cache.misses) == (1, 1)
    # A different token count is a different key.
    assert route_key(request(prompt="x" * 4 * 10)) != route_key(request(prompt="x" * 4 * 11))


def test_the_key_tells_apart_what_compares_equal_but_is_written_differently() -> None:
    zero, negative_zero = request(complexity=0.0), request(complexity=-0.0)
    assert route_key(zero) != route_key(negative_zero)
    cache = RouteCache()
    for r in (zero, negative_zero):
        _same(cache.route(r, POLICY), route(r, POLICY))
    assert cache.misses == 2
    # Duplicated capabilities count in the complexity estimate, so they are part of the key.
    assert route_key(request(required_capabilities=["json"])) != route_key(
        request(required_capabilities=["json", "json"])
    )


def test_an_oversized_prompt_is_keyed_by_its_size() -> None:
    chars = MAX_PROMPT_BYTES // 3 + 1000  # under the token limit, over the byte limit as 3-byte characters
    big, bigger = request(prompt="€" * chars), request(prompt="€" * (chars + 1))
    # Two sizes over the limit, each named in its rejection: two keys.
    assert route_key(big)[-1] == 3 * chars and route_key(bigger)[-1] == 3 * (chars + 1)
    for r in (big, bigger):
        routed = route(r, POLICY)
        assert isinstance(routed, Rejection) and routed.code == "request_too_large"
        _same(routed, reference_decide(r, POLICY, EMPTY_STATE, T0))
    assert route_key(request(prompt="x" * chars))[-1] == 0


def test_the_cache_is_bounded_and_keyed_by_the_policy() -> None:
    cache = RouteCache(maxsize=3)
    reqs = [request(max_output_tokens=n) for n in range(1, 6)]
    for r in reqs:
        cache.route(r, POLICY)
    assert len(cache) == 3 and cache.misses == 5
    cache.route(reqs[-1], POLICY)
    assert cache.hits == 1
    cache.route(reqs[0], POLICY)  # evicted long ago
    assert cache.misses == 6
    other = POLICIES[1]
    assert other.digest != POLICY.digest
    routed = cache.route(reqs[-1], other)
    assert cache.misses == 7 and isinstance(routed, Route)
    assert routed.tenant_budget_micros == 2_000_000


def test_synthetic_traffic_with_a_running_budget_decides_as_before() -> None:
    policy = POLICIES[1]
    reqs = synthetic_requests(policy, 3000, seed=11, start=T0, run="stages")
    cache = RouteCache()
    states: dict[str, BudgetState] = {}
    for i, r in enumerate(reqs):
        now = T0 + timedelta(seconds=30 * i)
        state = states.get(r.tenant_id, EMPTY_STATE)
        expected = reference_decide(r, policy, state, now)
        _same(decide(r, policy, state, now), expected)
        routed = cache.route(r, policy)
        if isinstance(routed, Route):
            _same(decide_on_route(routed, r, state, now), expected)
        if isinstance(expected, Decision) and expected.verdict == "dispatch":
            day = now.date().isoformat()
            held = Reservation(day=day, feature=r.feature, amount=expected.budget.estimated_cost_micros)
            states[r.tenant_id] = reserve(state, held)


def _lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.end_lineno is not None
    }


def test_no_stage_function_is_longer_than_the_house_rule() -> None:
    root = Path(__file__).resolve().parents[2]
    lengths: dict[str, int] = {}
    for name in ("_admit", "_route", "_budget_stage", "_decode_stage", "_decide"):
        lengths |= {f"{name}.{k}": v for k, v in _lengths(root / "core" / f"{name}.py").items()}
    lengths |= {f"replay.{k}": v for k, v in _lengths(root / "replay" / "_replay.py").items()}
    assert lengths["_decide.decide"] <= 40
    assert {k: v for k, v in lengths.items() if v > 80} == {}
