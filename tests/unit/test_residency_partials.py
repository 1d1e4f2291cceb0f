"""The residency partials ``evidence compact`` seals: the summary from them plus the files flushed
since is row for row the summary counted over every call (with and without a tenant, after a second
compaction, with a decision flushed after its call across a compaction, with a second decision of a
covered request in the tail); an altered or missing partials file is a ``verify`` finding and
changes no answer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nexuscore.projections import (
    EvidenceStore,
    _manifest,
    _residency,
    committed_files,
    compact,
    residency_breaches,
    verify,
)
from nexuscore.schemas import Event
from tests.factories import POLICY, T0, project, replace, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}
# Events of the ``decisions`` topic (a decision among them): held back, they are flushed later.
DECISION_TOPIC = {"RequestDecided", "RequestRejected", "BudgetSettled", "EscalationResolved"}


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return run_history(POLICY, 60, seed=21)


@pytest.fixture(scope="module")
def sealed(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    """Two thirds of the history compacted (partials sealed), the rest flushed since: a tail."""
    root = tmp_path_factory.mktemp("sealed") / "evidence"
    project(root, history[: len(history) * 2 // 3], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, history, flush_every=40)
    return root


def copy(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(src, root)
    return root


def partials_of(root: Path) -> dict[str, object]:
    partials = _residency.current_partials(_manifest.signed_entries(root))
    assert partials is not None
    return partials


def tenants(root: Path) -> list[str]:
    with EvidenceStore(root) as store:
        return [r["tenant_id"] for r in store.query("SELECT DISTINCT tenant_id FROM decisions").to_pylist()]


def assert_same_summaries(root: Path, monkeypatch: pytest.MonkeyPatch, *, from_partials: bool) -> None:
    """Every summary (all tenants, each tenant, an unknown one) equals the full count, and came
    from the partials (``from_partials``) or from the full count."""
    full_calls: list[str | None] = []
    full = EvidenceStore.full_residency_summary

    def counted(self: EvidenceStore, tenant: str | None = None) -> object:
        full_calls.append(tenant)
        return full(self, tenant)

    for tenant in [None, *tenants(root), "no-such-tenant"]:
        with EvidenceStore(root) as store:
            expected = full(store, tenant).to_pylist()
            monkeypatch.setattr(EvidenceStore, "full_residency_summary", counted)
            summary = store.residency_summary(tenant)
            monkeypatch.undo()
        assert summary.to_pylist() == expected
        assert summary.schema == full(EvidenceStore(root), tenant).schema
    assert (full_calls == []) is from_partials


def test_the_sealed_partials_cover_the_compacted_files_not_the_tail(sealed: Path) -> None:
    read = _residency.read_partials(sealed, partials_of(sealed))
    assert read is not None
    counts, covered = read.counts, read.covered
    live = _residency.covered_paths(committed_files(sealed))
    assert covered and set(covered) < set(live)  # not the flushes since
    assert counts.num_rows > 0 and sum(counts.column("calls").to_pylist()) > 0


def test_the_summary_from_partials_and_tail_is_the_full_summary(
    sealed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with EvidenceStore(sealed) as store:
        summary = store.residency_summary()
        assert summary.num_rows > 0
        # The exit status (calls outside the allowed regions) from the same counts.
        assert residency_breaches(summary) == residency_breaches(store.residency())
    assert_same_summaries(sealed, monkeypatch, from_partials=True)
    assert verify(sealed, PUBLIC, KNOWN, workers=1).findings == []


def test_after_a_second_compaction_the_partials_cover_every_file(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(sealed, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    read = _residency.read_partials(root, partials_of(root))
    assert read is not None and read.covered == _residency.covered_paths(committed_files(root))
    assert_same_summaries(root, monkeypatch, from_partials=True)
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


@pytest.mark.parametrize(
    "max_orphans", [_residency.MAX_ORPHANS, 0], ids=["orphans listed", "too many to list"]
)
def test_a_decision_flushed_after_its_call_across_a_compaction_counts_every_call(
    history: list[Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, max_orphans: int
) -> None:
    monkeypatch.setattr(_residency, "MAX_ORPHANS", max_orphans)
    root = tmp_path / "evidence"
    cut = len(history) * 2 // 3
    held = [e for e in history[cut - 40 : cut] if type(e).__name__ in DECISION_TOPIC]
    assert any(type(e).__name__ == "RequestDecided" for e in held)
    project(root, [e for e in history[:cut] if not any(e is h for h in held)], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, history, flush_every=40)  # the held-back decisions, and the rest
    read = _residency.read_partials(root, partials_of(root))
    assert read is not None and (read.orphans is None) == (max_orphans == 0)
    monkeypatch.undo()
    assert_same_summaries(root, monkeypatch, from_partials=False)


def test_altered_partials_are_a_verify_finding_and_change_no_answer(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(sealed, tmp_path)
    path = root / str(partials_of(root)["path"])
    counts = pq.read_table(path)
    pq.write_table(counts.slice(1), path)  # a finding left out, the footer's list of files kept
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok and "residency_altered" in {f.kind for f in report.findings if f.fatal}
    assert_same_summaries(root, monkeypatch, from_partials=False)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)  # writes them again
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_missing_partials_are_a_warning_and_the_summary_counts_every_call(
    sealed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(sealed, tmp_path)
    (root / str(partials_of(root)["path"])).unlink()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.ok and [f.kind for f in report.findings] == ["residency_missing"]
    assert_same_summaries(root, monkeypatch, from_partials=False)


def test_a_malformed_partials_entry_is_a_verify_finding(tmp_path: Path, history: list[Event]) -> None:
    root = tmp_path / "evidence"
    project(root, history[:120], flush_every=40)
    manifest = _manifest.Manifest(root, signing_key())
    manifest.commit_compaction([], T0, None, {"path": "../outside.parquet", "sha256": "0" * 64, "rows": 1})
    assert _residency.current_partials(_manifest.signed_entries(root)) is None
    with EvidenceStore(root) as store:
        assert store.residency_summary().to_pylist() == store.full_residency_summary().to_pylist()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert "residency_invalid" in {f.kind for f in report.findings if f.fatal}


def test_calls_without_a_decision_exit_1_from_the_partials_as_from_the_full_count(
    history: list[Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from nexuscore.cli import app

    # Three requests' decisions never reach the store (one covered by the compaction, two after).
    decided = [e for e in history if type(e).__name__ == "RequestDecided"]
    lost = {id(decided[3]), id(decided[-2]), id(decided[-5])}
    events = [e for e in history if id(e) not in lost]
    root = tmp_path / "evidence"
    project(root, events[: len(events) * 2 // 3], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, events, flush_every=40)
    read = _residency.read_partials(root, partials_of(root))
    assert read is not None and read.orphans is not None and read.orphans.num_rows >= 1
    with EvidenceStore(root) as store:
        breaches = residency_breaches(store.residency_summary())
        assert breaches > 0 and breaches == residency_breaches(store.residency())
    assert_same_summaries(root, monkeypatch, from_partials=True)
    result = CliRunner().invoke(app, ["evidence", "residency", "-e", str(root), "--format", "json"])
    assert result.exit_code == 1 and f"{breaches} call(s) outside" in " ".join(result.output.split())


def test_a_second_decision_in_the_tail_for_a_covered_request_counts_every_call(
    history: list[Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request decided in the covered files and decided again after the compaction (a client's
    resubmission after the dedupe window): its covered calls now meet two decisions, one of which
    allows none of their regions, so their findings changed since the partials were counted. The
    summary is then the full count, and says so by counting the calls the second decision refuses."""
    root = tmp_path / "evidence"
    cut = len(history) * 2 // 3
    covered = history[:cut]
    called = {(e.tenant_id, e.request_id) for e in covered if type(e).__name__ == "DispatchRequested"}
    first = next(
        e for e in covered if type(e).__name__ == "RequestDecided" and (e.tenant_id, e.request_id) in called
    )
    again = replace(
        first,
        event_id=f"{first.event_id}-again",
        residency=replace(first.residency, allowed_regions=["nowhere"], home_region="nowhere"),
    )
    project(root, covered, flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, [*history, again], flush_every=40)
    assert_same_summaries(root, monkeypatch, from_partials=False)
    with EvidenceStore(root) as store:
        summary = store.residency_summary(first.tenant_id).to_pylist()
    refused = [
        r for r in summary if r["finding"] == "outside_allowed_regions" and r["home_region"] == "nowhere"
    ]
    assert sum(r["calls"] for r in refused) >= 1
