"""Replay over evidence written from an in-process run of the same core (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore.policy import DEFAULT_POLICY_PATH, parse_policy
from nexuscore.projections import EvidenceStore
from nexuscore.replay import replay
from nexuscore.schemas import Event, RequestDecided
from tests.factories import POLICY, project, run_history, with_budgets

T0 = datetime(2026, 11, 25, 8, tzinfo=UTC)


def write_evidence(events: list[Event], root: Path) -> None:
    project(root, events)


def test_replay_with_the_recorded_policy_reproduces_every_decision(tmp_path: Path) -> None:
    policy = with_budgets(POLICY, "0.05", "0.02")  # tight enough that budget denials happen
    events = run_history(policy, 600, seed=3)
    write_evidence(events, tmp_path)
    with EvidenceStore(tmp_path) as store:
        denied = store.query(
            "SELECT count(*) AS n FROM decisions WHERE budget_action = 'denied'"
        ).to_pylist()[0]["n"]
        assert denied > 0
        report = replay(store, policy)
    assert report.requests == 600
    assert report.changed == 0, report.changes[:3]
    assert report.context_differences == 0
    assert report.estimated_delta_micros == 0 and report.actual_delta_micros == 0


def test_replay_with_a_candidate_policy_shows_what_would_change(tmp_path: Path) -> None:
    write_evidence(run_history(POLICY, 400, seed=5), tmp_path)
    data = yaml.safe_load(DEFAULT_POLICY_PATH.read_text())
    data["version"] = "candidate"
    data["routing"]["rules"].append(
        {"id": "all-credit-mid", "when": {"task_types": ["credit_decision"]}, "min_tier": "mid"}
    )
    candidate = parse_policy(yaml.safe_dump(data))
    with EvidenceStore(tmp_path) as store:
        report = replay(store, candidate)
        low_risk_credit = store.query(
            "SELECT count(*) AS n FROM decisions d JOIN requests r USING (request_id) "
            "WHERE r.task_type = 'credit_decision' AND r.risk_class = 'low' AND d.tier = 'small' AND d.verdict = 'dispatch'"
        ).to_pylist()[0]["n"]
    assert low_risk_credit > 0
    # Every low-risk credit decision served on small moves up to mid, and costs more.
    assert report.tier_changes >= low_risk_credit
    assert report.estimated_delta_micros > 0
    assert all("tier" in c.fields for c in report.changes if c.recorded.get("tier") == "small")


def test_replay_of_one_tenant_only_reads_that_tenant(tmp_path: Path) -> None:
    write_evidence(run_history(POLICY, 200, seed=9), tmp_path)
    with EvidenceStore(tmp_path) as store:
        expected = store.query(
            "SELECT count(*) AS n FROM requests WHERE tenant_id = 'acme-bank'"
        ).to_pylist()[0]["n"]
        report = replay(store, POLICY, tenant="acme-bank")
    assert report.requests == expected > 0 and report.changed == 0


def test_history_across_midnight_replays_exactly(tmp_path: Path) -> None:
    late = T0.replace(hour=23, minute=59, second=59, microsecond=980_000)
    policy = with_budgets(POLICY, "0.01", "0.004")
    events = run_history(policy, 60, seed=1, start=late)
    days = {e.budget.window for e in events if isinstance(e, RequestDecided)}
    assert days == {"2026-11-25", "2026-11-26"}  # the decisions fall on both days
    write_evidence(events, tmp_path)
    with EvidenceStore(tmp_path) as store:
        report = replay(store, policy)
    assert report.requests == 60 and report.changed == 0 and report.context_differences == 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 10_000), st.integers(1, 150), st.sampled_from(["0.05", "40"]))
def test_replay_with_the_recorded_policies_is_the_identity_on_decisions(
    tmp_path_factory: pytest.TempPathFactory, seed: int, n: int, budget: str
) -> None:
    policy = with_budgets(POLICY, budget, budget)
    root = tmp_path_factory.mktemp("history") / "evidence"
    project(root, run_history(policy, n, seed=seed))
    with EvidenceStore(root) as store:
        report = replay(store, None, recorded_policies={policy.digest: policy})
    assert report.requests == n
    assert (report.changed, report.context_differences, report.unknown_policies) == (0, 0, 0), report.changes[
        :2
    ]
    assert report.estimated_delta_micros == 0 and report.actual_delta_micros == 0


def test_verify_mode_lists_decisions_whose_policy_is_unknown(tmp_path: Path) -> None:
    project(tmp_path, run_history(POLICY, 20, seed=1))
    with EvidenceStore(tmp_path) as store:
        report = replay(store, None, recorded_policies={})
    decided = report.requests - 0
    assert report.unknown_policies == report.changed == decided > 0
    assert report.changes[0].fields == ("policy_digest",)


def write_switched_off_history(root: Path) -> None:
    """Five requests decided while an operator's global kill switch was off, as evidence."""
    from nexuscore.core import EMPTY_STATE, on_request
    from nexuscore.policy import Controls
    from nexuscore.schemas import KillSwitchChanged
    from tests.factories import request

    off = KillSwitchChanged(
        event_id="k", request_id="", tenant_id="", occurred_at=T0, producer="t", scope="global", target="",
        mode="off", actor="dana", reason="incident",
    )  # fmt: skip
    state, events = EMPTY_STATE, []
    for n in range(5):
        state, _, out = on_request(
            state, request(request_id=f"r{n}"), POLICY, "tests", T0, controls=Controls().apply(off)
        )
        events += [request(request_id=f"r{n}"), *out]
    write_evidence(events, root)


def test_decisions_made_under_a_kill_switch_replay_from_the_recorded_control_mode(tmp_path: Path) -> None:
    # Replay reads the switch from the decision's own `control_mode` field, not from its prose.
    write_switched_off_history(tmp_path)
    with EvidenceStore(tmp_path) as store:
        modes = store.query("SELECT DISTINCT control_mode, verdict FROM decisions").to_pylist()
        report = replay(store, None, recorded_policies={POLICY.digest: POLICY})
    assert modes == [{"control_mode": "off", "verdict": "denied"}]
    assert report.operator_overrides == 5 and report.changed == 0


def test_decisions_recorded_before_control_mode_existed_replay_from_their_reasons(tmp_path: Path) -> None:
    # A store written before decisions carried `control_mode` (null): the switch is read from the
    # admission reason, by both replays, and the decisions are an operator's, never compared.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nexuscore.replay import replay_reference

    write_switched_off_history(tmp_path)
    files = [p for p in tmp_path.rglob("*.parquet") if p.parent.name == "decisions"]
    assert files
    for path in files:
        rows = pq.read_table(path)
        at = rows.schema.get_field_index("control_mode")
        pq.write_table(rows.set_column(at, rows.schema.field(at), pa.nulls(rows.num_rows, pa.string())), path)
    with EvidenceStore(tmp_path) as store:
        assert store.query("SELECT count(*) AS n FROM decisions WHERE control_mode IS NULL").to_pylist() == [
            {"n": 5}
        ]
        reports = [
            run(store, None, recorded_policies={POLICY.digest: POLICY}) for run in (replay, replay_reference)
        ]
    assert [(r.operator_overrides, r.changed) for r in reports] == [(5, 0), (5, 0)]
