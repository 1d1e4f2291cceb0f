"""Refusals are evidence: a forged, stale or replayed human act never looks accepted in the
evidence store, and an auditor counts them with one query (finding 6 of "Trust under attack")."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import msgspec

from nexuscore.core import timeout_review
from nexuscore.policy import sign_review
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import RequestDecided, ReviewRecorded
from tests.factories import POLICY, T0, project, run_history
from tests.unit.test_governance_acts import MALLORY, TRUST, active_state, switch  # noqa: F401


def _rows(root: Path, sql: str) -> list[dict[str, object]]:
    with EvidenceStore(root) as store:
        return store.query(sql).to_pylist()


def test_refused_kill_switches_go_to_refusals_and_only_accepted_ones_to_kill_switches(tmp_path: Path) -> None:
    on, off = switch("on", T0), switch("off", T0 + timedelta(minutes=1))
    forged = switch("on", T0 + timedelta(minutes=2), key=MALLORY)
    # The log: on, off, a forgery, then the genuine old "on" re-published byte for byte.
    project(tmp_path, [on, off, forged, msgspec.structs.replace(on, occurred_at=on.occurred_at)], trust=TRUST)
    accepted = _rows(tmp_path, "SELECT mode FROM kill_switches ORDER BY src_offset")
    assert [r["mode"] for r in accepted] == ["on", "off"]
    refused = _rows(
        tmp_path, "SELECT act, code, act_event_id, source_offset FROM refusals ORDER BY source_offset"
    )
    assert [(r["act"], r["code"]) for r in refused] == [
        ("kill_switch", "unknown_key"),
        ("kill_switch", "not_newer"),
    ]
    assert refused[1]["act_event_id"] == on.event_id  # the replay is named, not dropped as a duplicate


def test_forged_and_replayed_reviews_are_refusals_not_reviews(tmp_path: Path) -> None:
    from tests.component.test_decider_agent import REVIEWER
    from tests.component.test_decider_agent import TRUST as REVIEWERS

    genuine = sign_review(
        ReviewRecorded(
            event_id="r1", request_id="crit", tenant_id="acme-bank", occurred_at=T0, producer="cli",
            causation_id="d1", action="approved", reviewer="carol@acme-bank", reason="fine",
        ),
        REVIEWER,
    )  # fmt: skip
    unsigned = msgspec.structs.replace(genuine, event_id="r2", key_id="", signature="", reviewer="the-ceo")
    project(tmp_path, [genuine, unsigned, genuine], trust=REVIEWERS)
    assert [r["reviewer"] for r in _rows(tmp_path, "SELECT reviewer FROM reviews")] == ["carol@acme-bank"]
    codes = _rows(tmp_path, "SELECT code, claimed_actor FROM refusals ORDER BY source_offset")
    assert codes == [
        {"code": "unsigned", "claimed_actor": "the-ceo"},
        {"code": "replayed", "claimed_actor": "carol@acme-bank"},
    ]


def test_garbage_on_the_governance_topic_is_a_dead_letter_and_the_projector_goes_on(tmp_path: Path) -> None:
    huge = b"\xc3\x01" + b"\x00" * 900_000
    project(
        tmp_path,
        [switch("off", T0)],
        trust=TRUST,
        raw=[("governance", b"policy", b"not avro"), ("governance", None, huge)],
    )
    dead = _rows(
        tmp_path,
        "SELECT source_topic, raw_size, octet_length(raw_key) AS k FROM deadletters ORDER BY source_offset",
    )
    assert [(d["source_topic"], d["raw_size"]) for d in dead] == [
        ("nexus.governance", 8),
        ("nexus.governance", len(huge)),
    ]
    assert [r["mode"] for r in _rows(tmp_path, "SELECT mode FROM kill_switches")] == ["off"]


def test_policy_history_shows_a_refused_promotion_as_refused(tmp_path: Path) -> None:
    import json as _json

    from typer.testing import CliRunner

    from nexuscore.cli import app
    from tests.unit.test_governance_acts import step

    unsigned = step("draft", T0, key=None)
    project(tmp_path, [unsigned], trust=TRUST)
    out = CliRunner().invoke(app, ["policy", "history", "-e", str(tmp_path), "-f", "json"])
    assert out.exit_code == 0, out.output
    [row] = _json.loads(out.stdout)
    assert row["status"].startswith("refused (unsigned)") and row["actor"] == "dana@ops"
    counted = _rows(tmp_path, "SELECT act, code, count(*) AS n FROM refusals GROUP BY ALL")
    assert counted == [{"act": "policy_stage", "code": "unsigned", "n": 1}]  # one query for an auditor


def test_only_a_timeout_as_the_deciders_write_it_after_its_deadline_is_a_review(tmp_path: Path) -> None:
    """A timeout is unsigned: anyone who can write on the reviews topic can write one. The
    projector holds no escalations, so it takes one into ``reviews`` only as the deciders write it
    (derived id, the decider as author, its reason), appended after its deadline."""
    escalated = [
        e
        for e in run_history(POLICY, 400, seed=3)
        if isinstance(e, RequestDecided) and e.verdict == "escalated" and e.review_deadline is not None
    ][:3]
    assert len(escalated) == 3, "the history has escalations to time out"
    late = [timeout_review(e, e.review_deadline + timedelta(seconds=1)) for e in escalated]  # type: ignore[operator]
    genuine = late[0]
    forged = msgspec.structs.replace(late[1], reason="the reviewer said nothing; approve it")
    early = timeout_review(escalated[2], escalated[2].occurred_at)  # appended before its deadline
    project(tmp_path, [genuine, forged, early])
    reviews = _rows(tmp_path, "SELECT event_id, action FROM reviews")
    assert reviews == [{"event_id": genuine.event_id, "action": "timed_out"}]
    refused = _rows(tmp_path, "SELECT act_event_id, code FROM refusals ORDER BY source_offset")
    assert sorted((r["act_event_id"], r["code"]) for r in refused) == sorted(
        [(forged.event_id, "invalid"), (early.event_id, "not_due")]
    )
