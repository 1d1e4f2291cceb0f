"""The services behind the evidence, replay and review commands, called directly (no CLI, no
mocks): evidence stores built through the projector's own path (tests.factories.project)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import services
from nexuscore.core import EMPTY_STATE, on_request, on_review
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH, replay_report_digest
from nexuscore.projections import EvidenceStore
from nexuscore.replay import ReplayReport
from nexuscore.schemas import Event, RequestDecided, ReviewRecorded
from tests.factories import POLICY, T0, project, request, run_history, signing_key


def pem(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return run_history(POLICY, 40, seed=3)


@pytest.fixture(scope="module")
def evidence(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    """A sealed store the tests only read (erasure makes its own)."""
    root = tmp_path_factory.mktemp("services") / "evidence"
    project(root, history, flush_every=50)
    return root


def escalated(request_id: str, tenant: str = "acme-bank") -> tuple[list[Event], list[Event]]:
    """An escalated request's events, and those of a reviewer denying it."""
    req = request(request_id=request_id, tenant_id=tenant, risk_class="critical")
    state, _, decided = on_request(EMPTY_STATE, req, POLICY, "decider", T0)
    decision = decided[0]
    assert isinstance(decision, RequestDecided) and decision.verdict == "escalated"
    review = ReviewRecorded(
        event_id=f"review-{tenant}-{request_id}", request_id=request_id, tenant_id=tenant, occurred_at=T0,
        producer="reviewer", action="denied", reviewer="carol", reason="call the customer",
        causation_id=decision.event_id, deadline=decision.review_deadline,
    )  # fmt: skip
    _, _, resolved = on_review(state, req, decision, review, POLICY, "decider", T0)
    return [req, *decided], [review, *resolved]


# --- evidence -------------------------------------------------------------------------------------


def test_the_routing_summary_accounts_for_every_terminal_state(evidence: Path) -> None:
    rows = services.routing_summary(evidence).to_pylist()
    with EvidenceStore(evidence) as store:
        terminal = store.terminal_summary()["terminal"]
    assert sum(r["requests"] for r in rows) == terminal > 0
    assert set(rows[0]) == {"tenant_id", "tier", "state", "requests", "cost_usd"}


def test_a_lineage_of_an_unknown_request_is_an_error_naming_the_store(evidence: Path) -> None:
    with services.open_store(evidence) as store:
        with pytest.raises(NexusError, match="no events of request 'nope'"):
            services.request_lineage(store, "nope")
        first = store.query("SELECT request_id, tenant_id FROM requests LIMIT 1").to_pylist()[0]
        lineage = services.request_lineage(store, first["request_id"], first["tenant_id"])
    assert lineage.num_rows >= 2  # the request and at least its decision


def test_only_an_allowed_cross_border_call_is_not_a_residency_breach(evidence: Path) -> None:
    with services.open_store(evidence) as store:
        assert services.residency_breaches(store.residency()) == 0
    findings = pa.table(
        {"finding": ["cross_border", "outside_allowed_regions", "no_decision", "cross_border"]}
    )
    assert services.residency_breaches(findings) == 2


def test_verify_knows_the_bundled_policies_and_the_ones_named(tmp_path: Path) -> None:
    assert POLICY.digest in services.known_policy_digests()
    other = tmp_path / "other.yaml"
    other.write_bytes(
        DEFAULT_POLICY_PATH.read_bytes().replace(b'version: "2026.11.1"', b'version: "2099.1.1"')
    )
    known = services.known_policy_digests([other])
    assert len(known - services.known_policy_digests()) == 1


def test_verify_needs_a_manifest_and_then_checks_the_store(evidence: Path, tmp_path: Path) -> None:
    key = pem(tmp_path / "evidence-signing.pem", signing_key())
    with pytest.raises(NexusError, match="no evidence manifest"):
        services.verify_evidence(tmp_path, key)
    report = services.verify_evidence(evidence, key)
    assert report.ok, report.findings
    assert services.verification_note(report).startswith(f"Verified: {report.rows:,} events")
    assert services.verification_note(None).startswith("Not verified")


def test_the_report_page_carries_the_verification_note(evidence: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    size = services.write_evidence_report(evidence, out, None, T0)
    assert size == out.stat().st_size and "Not verified" in out.read_text(encoding="utf-8")
    with pytest.raises(NexusError, match="cannot write"):
        services.write_evidence_report(evidence, tmp_path / "missing" / "report.html", None, T0)


def test_a_proof_is_checked_against_the_trusted_key_when_one_is_given(evidence: Path, tmp_path: Path) -> None:
    with services.open_store(evidence) as store:
        first = store.query("SELECT request_id, tenant_id FROM requests LIMIT 1").to_pylist()[0]
    trusted = pem(tmp_path / "trusted.pem", signing_key())
    proof = services.prove_request(evidence, first["request_id"], first["tenant_id"], trusted)
    assert proof["events"]
    stranger = pem(tmp_path / "stranger.pem", Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32))
    with pytest.raises(NexusError, match="the proof does not hold"):
        services.prove_request(evidence, first["request_id"], first["tenant_id"], stranger)
    assert services.prove_request(evidence, first["request_id"], first["tenant_id"]) == proof


def test_erasing_twice_finds_nothing_the_second_time(history: list[Event], tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    project(evidence, history)
    key = pem(tmp_path / "evidence-signing.pem", signing_key())
    erased = services.erase_content(evidence, key, "acme-bank", None, "tenant offboarded", T0)
    assert erased
    with pytest.raises(NexusError, match=r"no content keys of tenant acme-bank \(every data subject\)"):
        services.erase_content(evidence, key, "acme-bank", None, "again", T0)
    assert services.erasure_scope("acme-bank", "s-1") == "tenant acme-bank, data subject s-1"


# --- review ---------------------------------------------------------------------------------------


def test_a_pending_escalation_is_found_with_the_decision_a_review_answers(tmp_path: Path) -> None:
    events, _ = escalated("crit")
    project(tmp_path, events)
    with services.open_store(tmp_path) as store:
        tenant, escalation_id = services.pending_escalation(store, "crit")
        assert tenant == "acme-bank"
        assert escalation_id == next(e.event_id for e in events if isinstance(e, RequestDecided))
        assert [r["request_id"] for r in services.review_queue(store, None).to_pylist()] == ["crit"]
        with pytest.raises(NexusError, match="not escalated in this evidence"):
            services.find_escalation(store, "req-1")


def test_a_resolved_escalation_cannot_be_reviewed_again(tmp_path: Path) -> None:
    events, denial = escalated("crit")
    project(tmp_path, [*events, *denial])
    with services.open_store(tmp_path) as store:
        with pytest.raises(NexusError, match="no longer awaiting review: denied by carol"):
            services.pending_escalation(store, "crit")
        assert services.review_queue(store, None).num_rows == 0
        assert services.review_queue(store, None, "all").num_rows == 1
    row = services.wait_for_resolution(tmp_path, "crit", "acme-bank", 1.0)
    assert row is not None and row["review_state"] == "denied"


def test_an_id_escalated_for_two_tenants_needs_the_tenant(tmp_path: Path) -> None:
    first, _ = escalated("crit", "acme-bank")
    other_tenant = next(t.id for t in POLICY.tenants if t.id != "acme-bank")
    second, _ = escalated("crit", other_tenant)
    project(tmp_path, [*first, *second])
    with services.open_store(tmp_path) as store:
        with pytest.raises(NexusError, match="name one with --tenant"):
            services.find_escalation(store, "crit")
        assert services.pending_escalation(store, "crit", other_tenant)[0] == other_tenant


def test_waiting_for_a_pending_escalation_gives_up(tmp_path: Path) -> None:
    events, _ = escalated("crit")
    project(tmp_path, events)
    assert services.wait_for_resolution(tmp_path, "crit", "acme-bank", 0.0) is None


# --- replay ---------------------------------------------------------------------------------------


def test_replay_under_the_recorded_policy_changes_nothing_and_does_not_fail(
    evidence: Path, tmp_path: Path
) -> None:
    report = services.replay_history(evidence, POLICY)
    assert report.requests > 0 and report.changed == 0
    assert services.replay_failure(report, verify_mode=False) is None
    assert services.summary_lines(report)[0] == f"policy {POLICY.version} ({POLICY.digest})"
    assert services.changes_table(report).num_rows == 0
    out = tmp_path / "replay.json"
    scope = {"evidence": str(evidence), "tenant": None, "since": None, "until": None}
    digest = services.write_replay_report(out, report, scope)
    assert digest == replay_report_digest(out.read_bytes())
    document = json.loads(out.read_bytes())
    assert document["policy_digest"] == POLICY.digest and document["evidence"] == str(evidence)
    assert "changes" not in document


def test_verify_mode_fails_on_decisions_under_policies_it_cannot_trust(
    evidence: Path, tmp_path: Path
) -> None:
    report = services.replay_history(evidence, None, {}, keep_all_changes=True)
    failure = services.replay_failure(report, verify_mode=True)
    assert failure is not None and "not reproduced" in failure
    assert services.changes_table(report, 3).num_rows == min(3, len(report.changes))
    services.write_replay_html(tmp_path / "replay.html", report)
    assert "<html" in (tmp_path / "replay.html").read_text(encoding="utf-8").lower()
    with pytest.raises(NexusError, match="--recorded"):
        services.replay_history(evidence, POLICY, {POLICY.digest: POLICY})


def test_a_residency_breach_fails_any_replay() -> None:
    report = ReplayReport(policy_version="v", policy_digest="d", residency_breaches=2)
    assert services.replay_failure(report, verify_mode=False) == (
        "the candidate sends 2 request(s) outside their allowed regions"
    )
