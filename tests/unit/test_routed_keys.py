"""The routed keys ``evidence compact`` seals (``_keyed``): every covered decision and outcome is found
by its request, row for row what the tables hold, whatever the block size; who-routed-what over a
tail then reads none of the covered tables and answers as the full query; an altered, missing or
malformed directory, or more keys than lookups are worth, fall back to the tables' scan with the
same answer, and ``verify`` names what is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexuscore.projections import EvidenceStore, _keyed, _manifest, compact, verify
from nexuscore.schemas import Event
from tests.factories import POLICY, T0, project, run_history, signing_key
from tests.unit.test_report_partials import KNOWN, PUBLIC, assert_same_reports, copy, is_outcome, spread

COLUMNS = {k.table: ["tenant_id", "request_id", "occurred_at", *k.groups, k.amount] for k in _keyed.KEYED}


def compacted_with_tail(root: Path, history: list[Event]) -> Path:
    """Two thirds of the history compacted, the rest flushed since with some events of covered
    requests held back until then: outcomes (their decisions covered) and decisions (their outcomes
    covered)."""
    cut = len(history) * 2 // 3
    held = {id(e) for e in history[cut - 60 : cut] if is_outcome(e)}
    held |= {id(e) for e in history[cut - 240 : cut - 180] if type(e).__name__ == "RequestDecided"}
    project(root, [e for e in history[:cut] if id(e) not in held], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(
        root, [*history[:cut], *(e for e in history[:cut] if id(e) in held), *history[cut:]], flush_every=40
    )
    return root


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    return compacted_with_tail(tmp_path_factory.mktemp("keyed") / "evidence", history)


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return spread(run_history(POLICY, 90, seed=23))


def field_of(root: Path) -> dict[str, Any]:
    field = _keyed.current(_manifest.signed_entries(root))
    assert field is not None
    return field


def covered_rows(root: Path, table: str) -> list[dict[str, Any]]:
    """The rows of ``table`` in the files the last compaction covered, sorted."""
    entries = _manifest.signed_entries(root)
    last = max(i for i, e in enumerate(entries) if e.get("kind") == "compaction")
    files = _manifest.committed(entries[: last + 1])
    with EvidenceStore(root, files=files) as store:
        rows = store.query(f"SELECT {', '.join(COLUMNS[table])} FROM {table}").to_pylist()  # noqa: S608
    return sorted(rows, key=repr)


@pytest.mark.parametrize("block", [3, _keyed.BLOCK])
def test_every_covered_row_is_found_by_its_request_and_nothing_else(
    tmp_path: Path, history: list[Event], monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # Some requests with four outcomes: their keys' rows cross a boundary between blocks of 3.
    monkeypatch.setattr(_keyed, "BLOCK", block)
    outcomes = [e for e in history if is_outcome(e)][:20]
    again = [msgspec.structs.replace(e, event_id=f"{e.event_id}-{n}") for e in outcomes for n in range(3)]
    root = tmp_path / "evidence"
    project(root, [*history, *again], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    field = field_of(root)
    for k in _keyed.KEYED:
        expected = covered_rows(root, k.table)
        probes = sorted({(r["tenant_id"], r["request_id"]) for r in expected})
        probes += [("no-such-tenant", probes[0][1]), (probes[0][0], "no-such-request")]
        directory = _keyed.Directory.open(root, field, k)
        assert directory is not None and directory.blocks == -(-len(expected) // block)
        found = directory.find(probes)
        assert found is not None
        rows = _keyed.found_table(probes, found, k).to_pylist()
        assert sorted(rows, key=repr) == expected


def test_a_report_over_a_tail_reads_no_covered_table(keyed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    views: list[tuple[str, str]] = []
    found: dict[str, int | None] = {}
    part_view, keyed_rows = EvidenceStore._part_view, EvidenceStore._keyed_rows

    def viewed(self: EvidenceStore, table: str, covered: set[str], part: str, prefix: str) -> None:
        views.append((table, part))
        part_view(self, table, covered, part, prefix)

    def looked_up(self: EvidenceStore, k: _keyed.Keyed, requests: Any) -> Any:
        rows = keyed_rows(self, k, requests)
        found[k.table] = None if rows is None else rows.num_rows
        return rows

    monkeypatch.setattr(EvidenceStore, "_part_view", viewed)
    monkeypatch.setattr(EvidenceStore, "_keyed_rows", looked_up)
    with EvidenceStore(keyed) as store:
        store.who_routed_what()
    # (The covered decisions of the tail's held-back outcomes; the covered outcomes of its decisions.)
    assert found["decisions"] and found["outcomes"]
    assert views and all(part == "tail" for _, part in views)
    monkeypatch.undo()
    assert_same_reports(keyed, monkeypatch, from_partials=True)


def test_more_keys_than_lookups_are_worth_are_scanned_for(
    keyed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_keyed, "MAX_KEYS", 1)
    with EvidenceStore(keyed) as store:
        rows = store.query("SELECT tenant_id, request_id FROM decisions LIMIT 2")
        assert store._keyed_rows(_keyed.DECISIONS, rows) is None
    assert_same_reports(keyed, monkeypatch, from_partials=True)


def test_an_altered_block_is_a_verify_finding_and_changes_no_answer(
    keyed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(keyed, tmp_path)
    data = root / field_of(root)["outcomes"]["data"]["path"]
    payload = bytearray(data.read_bytes())
    payload[_keyed.KEY_BYTES * 3] ^= 1  # the first block's fourth key
    data.write_bytes(bytes(payload))
    with EvidenceStore(root) as store:
        rows = store.query("SELECT tenant_id, request_id FROM outcomes")
        assert store._keyed_rows(_keyed.OUTCOMES, rows) is None
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert [(f.kind, f.where) for f in report.findings if f.fatal] == [
        ("routed_keys_altered", str(data.relative_to(root)))
    ]
    assert_same_reports(root, monkeypatch, from_partials=True)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)  # writes them again
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_missing_keys_are_a_warning_and_change_no_answer(
    keyed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(keyed, tmp_path)
    for sealed in _keyed.sealed_files(field_of(root)):
        (root / sealed["path"]).unlink()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.ok and {f.kind for f in report.findings} == {"routed_keys_missing"}
    assert_same_reports(root, monkeypatch, from_partials=True)


def test_a_malformed_keys_entry_is_a_verify_finding(keyed: Path, tmp_path: Path) -> None:
    root = copy(keyed, tmp_path)
    field = field_of(root)
    outside = {**field["decisions"], "data": {**field["decisions"]["data"], "path": "../outside.bin"}}
    for bad in (
        {**field, "decisions": outside},
        {"decisions": field["decisions"]},
        [],
        {**field, "outcomes": field["decisions"]},
    ):
        assert not _keyed.well_formed(bad)
    manifest = _manifest.Manifest(root, signing_key())
    manifest.commit_compaction([], T0, None, None, {_keyed.FIELD: {**field, "decisions": outside}})
    assert _keyed.current(_manifest.signed_entries(root)) is None
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert "routed_keys_invalid" in {f.kind for f in report.findings if f.fatal}
