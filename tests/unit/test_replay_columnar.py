"""The columnar replay: the same report as the reference replay, the same on every run, and exactly
zero deltas under the recorded policy, failovers and calls never answered included."""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import timedelta
from pathlib import Path

import msgspec
import pyarrow as pa
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore._synthetic import synthetic_requests
from nexuscore.core import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    derive_id,
    on_outcome,
    on_request,
    on_review,
)
from nexuscore.policy import DEFAULT_POLICY_PATH, RoutingPolicy, cost_micros, parse_policy
from nexuscore.projections import EvidenceStore
from nexuscore.replay import ReplayReport, replay, replay_reference
from nexuscore.schemas import (
    DispatchRequested,
    Event,
    InferenceRequested,
    LatencyObservation,
    OutcomeRecorded,
    RequestDecided,
    ReviewRecorded,
)
from tests.factories import POLICY, T0, project, run_history, with_budgets


def _candidate_with_credit_on_mid() -> RoutingPolicy:
    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    data["version"] = "candidate"
    data["routing"]["rules"].append(
        {"id": "all-credit-mid", "when": {"task_types": ["credit_decision"]}, "min_tier": "mid"}
    )
    return parse_policy(yaml.safe_dump(data))


CANDIDATES = {
    "tighter": with_budgets(POLICY, "0.5", "0.2"),
    "credit-on-mid": _candidate_with_credit_on_mid(),
}


def _outcome(d: DispatchRequested, rng: random.Random, fail_over: bool) -> OutcomeRecorded:
    """What a worker records: on the dispatch's deployment, or (a failover) on its first fallback,
    billed with the worker's own pricing function."""
    target = d.fallbacks[0] if fail_over and d.fallbacks else None
    in_price = target.input_price_micros_per_1k if target else d.input_price_micros_per_1k
    out_price = target.output_price_micros_per_1k if target else d.output_price_micros_per_1k
    tokens_in, tokens_out = rng.randint(1, 3000), rng.randint(1, d.max_output_tokens)
    return OutcomeRecorded(
        event_id=derive_id(d.event_id, "outcome"), request_id=d.request_id, tenant_id=d.tenant_id,
        occurred_at=d.occurred_at, producer="w", status="answered", feature=d.feature,
        deployment_id=target.deployment_id if target else d.deployment_id, model=d.model, model_version="v",
        region=target.region if target else d.region, attempts=2 if target else 1, input_tokens=tokens_in,
        output_tokens=tokens_out, cost_micros=cost_micros(tokens_in, tokens_out, in_price, out_price),
        latency_ms=3.0, response="r", finish_reason="stop",
    )  # fmt: skip


def served_history(
    policy: RoutingPolicy, requests: list[InferenceRequested], seed: int, unanswered: float = 0.1
) -> list[Event]:
    """The decider's and the workers' record: a share of the calls fail over to their first
    fallback, and a share is never answered (no outcome, the reservation still held)."""
    rng = random.Random(seed)
    states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
    held: dict[tuple[str, str], Reservation] = {}
    events: list[Event] = []
    for req in requests:
        states[req.tenant_id], reservation, out = on_request(
            states[req.tenant_id], req, policy, "decider", req.occurred_at
        )
        events += [req, *out]
        key = (req.tenant_id, req.request_id)
        if reservation is not None:
            held[key] = reservation
        for d in (e for e in out if isinstance(e, DispatchRequested)):
            if rng.random() < unanswered:
                continue
            outcome = _outcome(d, rng, fail_over=rng.random() < 0.3)
            states[d.tenant_id], settled = on_outcome(
                states[d.tenant_id], held.pop(key), outcome, "decider", d.occurred_at
            )
            events += [outcome, *settled]
    return events


def colliding_requests(n: int, seed: int) -> list[InferenceRequested]:
    """Synthetic requests renumbered per tenant: every tenant has r0, r1, ..., so request ids
    collide across tenants (never within one)."""
    counts: dict[str, int] = defaultdict(int)
    out = []
    for r in synthetic_requests(POLICY, n, seed=seed, start=T0, run="collide"):
        out.append(msgspec.structs.replace(r, request_id=f"r{counts[r.tenant_id]}"))
        counts[r.tenant_id] += 1
    return out


def test_identity_replay_reports_every_delta_exactly_zero_with_failovers_and_unanswered_calls(
    tmp_path: Path,
) -> None:
    policy = with_budgets(POLICY, "1", "0.4")
    events = served_history(policy, synthetic_requests(policy, 800, seed=4, start=T0, run="id"), seed=4)
    failovers = [e for e in events if isinstance(e, OutcomeRecorded) and e.attempts == 2]
    dispatches = sum(isinstance(e, DispatchRequested) for e in events)
    outcomes = sum(isinstance(e, OutcomeRecorded) for e in events)
    assert failovers and outcomes < dispatches  # both cases are in the history
    project(tmp_path, events)
    with EvidenceStore(tmp_path) as store:
        for run in (replay, replay_reference):
            report = run(store, None, recorded_policies={policy.digest: policy})
            assert (report.changed, report.context_differences) == (0, 0), report.changes[:2]
            assert report.recorded_actual_micros == sum(
                e.cost_micros for e in events if isinstance(e, OutcomeRecorded)
            )
            assert report.estimated_delta_micros == 0 and report.actual_delta_micros == 0
            assert report.recorded_actual_micros > 0


def test_replay_gives_the_same_report_on_every_run_of_a_store_with_colliding_request_ids(
    tmp_path: Path,
) -> None:
    requests = colliding_requests(500, seed=11)
    assert len({r.request_id for r in requests}) < len(requests)  # ids shared across tenants
    events = served_history(POLICY, requests, seed=11)
    project(tmp_path, events, flush_every=150, partitions=3)  # many files, in many folders
    candidate = CANDIDATES["tighter"]
    with EvidenceStore(tmp_path) as store:
        identity = [replay(store, None, recorded_policies={POLICY.digest: POLICY}) for _ in range(3)]
        counterfactual = [replay(store, candidate, keep_changes=10**6) for _ in range(3)]
    for reports in (identity, counterfactual):
        assert (
            msgspec.to_builtins(reports[0])
            == msgspec.to_builtins(reports[1])
            == msgspec.to_builtins(reports[2])
        )
    assert identity[0].requests == len(requests)
    assert (identity[0].changed, identity[0].context_differences, identity[0].actual_delta_micros) == (
        0,
        0,
        0,
    )
    assert counterfactual[0].changed > 0


def _same_summary(fast: ReplayReport, reference: ReplayReport) -> None:
    assert fast.summary() == reference.summary()
    key = [(c.tenant_id, c.request_id) for c in fast.changes]
    assert key == [(c.tenant_id, c.request_id) for c in reference.changes]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 10_000),
    st.integers(1, 250),
    st.sampled_from(["0.05", "2", "40"]),
    st.sampled_from([None, *CANDIDATES]),
)
def test_the_columnar_replay_reports_what_the_reference_replay_reports(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, budget: str, candidate: str | None
) -> None:
    """On generated histories (escalations and their reviews, outcomes out of order, budget
    denials), under the recorded policy or a candidate: the same totals, the same changes."""
    policy = with_budgets(POLICY, budget, budget)
    root = tmp_path_factory.mktemp("history") / "evidence"
    project(root, run_history(policy, n, seed=seed))
    with EvidenceStore(root) as store:
        if candidate is None:
            recorded = {policy.digest: policy}
            _same_summary(
                replay(store, None, recorded_policies=recorded),
                replay_reference(store, None, recorded_policies=recorded),
            )
        else:
            _same_summary(
                replay(store, CANDIDATES[candidate]), replay_reference(store, CANDIDATES[candidate])
            )


def _latency(rng: random.Random, policy: RoutingPolicy) -> dict[tuple[str, str], LatencyObservation]:
    """A latency window as the decider may hold it: some deployments' strategies observed, slow or
    fast, with few or many samples (the decode stage trusts a window only past a count)."""
    seen = {}
    for d in policy.deployments:
        for strategy in d.decode:
            if rng.random() < 0.5:
                p95 = rng.choice([50, 400, 2_000, 9_000, 30_000])
                seen[(d.id, strategy.name)] = LatencyObservation(
                    deployment_id=d.id, strategy=strategy.name, p50_ms=p95 // 2, p95_ms=p95,
                    samples=rng.choice([1, 5, 50, 500]),
                )  # fmt: skip
    return seen


def varied_history(policy: RoutingPolicy, n: int, seed: int, days: int) -> list[Event]:
    """A history over several days (budgets bind within a day, then a new day starts from
    nothing), every tenant, escalations reviewed (approved, denied, or past their deadline), calls
    answered out of order or never, and a latency window that changes as the history goes."""
    rng = random.Random(seed)
    states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
    held: dict[tuple[str, str], Reservation] = {}
    events: list[Event] = []
    in_flight: list[DispatchRequested] = []
    window = _latency(rng, policy)
    requests = synthetic_requests(policy, n, seed=seed, start=T0, run="varied")
    for k, req in enumerate(requests):
        at = T0 + timedelta(days=k * days // n, seconds=k)
        req = msgspec.structs.replace(req, occurred_at=at)
        if rng.random() < 0.05:
            window = _latency(rng, policy)
        latency = window.get
        states[req.tenant_id], reservation, out = on_request(
            states[req.tenant_id], req, policy, "decider", at, latency=lambda d, s, f=latency: f((d, s))
        )
        events += [req, *out]
        key = (req.tenant_id, req.request_id)
        if reservation is not None:
            held[key] = reservation
        decided = out[0]
        if isinstance(decided, RequestDecided) and decided.verdict == "escalated":
            assert decided.review_deadline is not None
            action = rng.choice(["approved", "denied", "timed_out"])
            when = decided.review_deadline + timedelta(seconds=1) if action == "timed_out" else at
            review = ReviewRecorded(
                event_id=derive_id(req.request_id, "review"), request_id=req.request_id, tenant_id=req.tenant_id,
                occurred_at=when, producer="reviewer", action=action,  # type: ignore[arg-type]  # one of the three
                reviewer="carol@bank", reason=action, deadline=decided.review_deadline,
            )  # fmt: skip
            states[req.tenant_id], reservation, out = on_review(
                states[req.tenant_id], req, decided, review, policy, "decider", when,
                latency=lambda d, s, f=latency: f((d, s)),
            )  # fmt: skip
            events += [review, *out]
            if reservation is not None:
                held[key] = reservation
        in_flight += [e for e in out if isinstance(e, DispatchRequested)]
        while in_flight and rng.random() < 0.5:
            d = in_flight.pop(rng.randrange(len(in_flight)))
            if rng.random() < 0.1:
                continue  # never answered: the reservation stays held
            outcome = _outcome(d, rng, fail_over=rng.random() < 0.2)
            states[d.tenant_id], settled = on_outcome(
                states[d.tenant_id], held.pop((d.tenant_id, d.request_id)), outcome, "decider", d.occurred_at
            )
            events += [outcome, *settled]
    return events


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.integers(0, 10_000),
    st.integers(1, 300),
    st.integers(1, 3),
    st.sampled_from(["0.02", "0.08", "3"]),
    st.sampled_from([None, *CANDIDATES]),
)
def test_the_columnar_replay_equals_the_reference_over_days_latency_windows_and_binding_budgets(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, days: int, budget: str, candidate: str | None
) -> None:
    """Budgets that bind part way through a day (and a next day that starts from nothing), every
    tenant, escalations and their reviews, denials, decode choices under changing latency windows:
    the columnar replay reports what the reference does; under the recorded policy, nothing changes."""
    policy = with_budgets(POLICY, budget, budget)
    root = tmp_path_factory.mktemp("varied") / "evidence"
    project(root, varied_history(policy, n, seed, days), partitions=2)
    with EvidenceStore(root) as store:
        chosen = CANDIDATES[candidate] if candidate else None
        recorded = None if chosen else {policy.digest: policy}
        fast = replay(store, chosen, recorded_policies=recorded, keep_changes=10**6)
        _same_summary(fast, replay_reference(store, chosen, recorded_policies=recorded, keep_changes=10**6))
    if candidate is None:
        assert (fast.changed, fast.context_differences) == (0, 0), fast.changes[:2]
        assert fast.estimated_delta_micros == 0 and fast.actual_delta_micros == 0


def test_the_varied_history_has_what_the_property_test_is_about(tmp_path: Path) -> None:
    """The generator's history does bind budgets mid-day, escalate, deny, cross days and decide
    under latency observations (else the property test above would prove less than it says)."""
    policy = with_budgets(POLICY, "0.08", "0.08")
    project(tmp_path, varied_history(policy, 400, seed=1, days=2))
    with EvidenceStore(tmp_path) as store:
        row = store.query(
            "SELECT count(*) FILTER (WHERE budget_action = 'denied') AS denied, "
            "count(*) FILTER (WHERE budget_action = 'reserved') AS reserved, "
            "count(*) FILTER (WHERE verdict = 'escalated') AS escalated, "
            "count(DISTINCT budget_window) AS days, count(DISTINCT tenant_id) AS tenants, "
            "count(*) FILTER (WHERE len(latency_observations) > 0) AS observed FROM decisions"
        ).to_pylist()[0]
        binding = (
            store.query(
                "SELECT count(*) AS n FROM (SELECT tenant_id, budget_window FROM decisions GROUP BY ALL "
                "HAVING bool_or(budget_action = 'reserved') AND bool_or(budget_action = 'denied'))"
            )
            .column("n")[0]
            .as_py()
        )
        report = replay(store, None, recorded_policies={policy.digest: policy})
    assert row["denied"] and row["reserved"] and row["escalated"] and row["observed"], row
    assert binding > 0  # a tenant's budget served some requests of a day, then denied others
    assert row["days"] == 2 and row["tenants"] >= 3, row
    assert (report.changed, report.context_differences) == (0, 0)


def test_a_decision_recorded_twice_replays_under_the_latest_ones_latency_observations(tmp_path: Path) -> None:
    """A (tenant, request) with two decisions (a hostile producer's second, later in the log, with
    other latency observations): both replays read the later one, observations included."""
    policy = with_budgets(POLICY, "3", "3")
    events = varied_history(policy, 200, seed=5, days=1)
    observed = [e for e in events if isinstance(e, RequestDecided) and e.decode and e.decode.observations]
    assert len(observed) > 1, "the history decides under latency observations"

    def again(decided: RequestDecided, slow: bool) -> RequestDecided:
        assert decided.decode is not None
        seen = [msgspec.structs.replace(o, p95_ms=60_000, samples=500) for o in decided.decode.observations]
        decode = msgspec.structs.replace(decided.decode, observations=seen if slow else [])
        return msgspec.structs.replace(decided, event_id=f"again-{decided.event_id}", decode=decode)

    project(tmp_path, [*events, again(observed[0], slow=True), again(observed[1], slow=False)])
    with EvidenceStore(tmp_path) as store:
        for chosen, recorded in ((CANDIDATES["tighter"], None), (None, {policy.digest: policy})):
            fast = replay(store, chosen, recorded_policies=recorded, keep_changes=10**6)
            _same_summary(
                fast, replay_reference(store, chosen, recorded_policies=recorded, keep_changes=10**6)
            )


def test_replay_leaves_the_cycle_collector_as_it_found_it(tmp_path: Path) -> None:
    import gc

    project(tmp_path, run_history(POLICY, 30, seed=2))
    with EvidenceStore(tmp_path) as store:
        assert gc.isenabled()
        replay(store, CANDIDATES["tighter"])
        assert gc.isenabled()
        gc.disable()
        try:
            replay(store, CANDIDATES["tighter"])
            assert not gc.isenabled()
        finally:
            gc.enable()


def _tamper(root: Path, table: str, column: str, value: int) -> str:
    """Overwrite ``column`` of the first row of ``table``'s first file in place (as a hostile
    producer or a disk could): the request id of the row changed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = sorted(p for p in root.rglob("*.parquet") if f"/{table}/" in str(p) or p.name.startswith(table))[0]
    rows = pq.read_table(path)
    values = rows.column(column).to_pylist()
    values[0] = value
    at = rows.schema.get_field_index(column)
    pq.write_table(rows.set_column(at, rows.schema.field(at), pa.array(values, pa.int64())), path)
    return str(rows.column("request_id")[0].as_py())


@pytest.mark.parametrize(
    ("table", "column", "value"),
    [
        ("requests", "max_output_tokens", 2**62),
        ("requests", "prompt_chars", -7),
        ("outcomes", "output_tokens", -(2**62)),
        ("outcomes", "input_tokens", 2**62),
    ],
)
def test_a_store_with_impossible_token_counts_stops_replay_with_one_clear_error(
    tmp_path: Path, table: str, column: str, value: int
) -> None:
    from nexuscore.kernel import EvidenceError

    policy = with_budgets(POLICY, "1", "0.4")
    project(
        tmp_path, served_history(policy, synthetic_requests(policy, 60, seed=5, start=T0, run="t"), seed=5)
    )
    request_id = _tamper(tmp_path, table, column, value)
    read_as = {"output_tokens": "out_output", "input_tokens": "out_input"}.get(column, column)
    expected = f"{request_id}.*{read_as} is {value}, outside"
    with EvidenceStore(tmp_path) as store, pytest.raises(EvidenceError, match=expected):
        replay(store, policy)


def test_the_history_order_is_the_same_whether_log_positions_pack_into_one_sort_key_or_not(
    tmp_path: Path,
) -> None:
    """Log positions that fit are sorted as one integer; offsets past 2**40 (kept in the same
    order) are sorted as (partition, offset): the history's order is the same either way."""
    import pyarrow.compute as pc

    from nexuscore.replay import load_history
    from nexuscore.replay._load import _history_order

    policy = with_budgets(POLICY, "0.08", "0.08")
    project(tmp_path, varied_history(policy, 300, seed=3, days=2), flush_every=80, partitions=3)
    with EvidenceStore(tmp_path) as store:
        history = load_history(store, None, None, None)
    tables = [history.requests.table, history.settlements.table, history.resolutions.table]
    assert all(t.num_rows for t in tables)

    def shifted(table: pa.Table) -> pa.Table:
        at = table.column_names.index("src_offset")
        return table.set_column(at, "src_offset", pc.add(table.column("src_offset"), 2**45))

    packed, unpacked = _history_order(*tables), _history_order(*(shifted(t) for t in tables))
    assert packed.equals(unpacked)
    assert packed.column("kind").to_pylist() == [k for k, _ in history.order]
