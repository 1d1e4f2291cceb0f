"""The routed keys ``evidence compact`` seals (``_keyed``): every covered decision and outcome is found
by its request, row for row what the tables hold, whatever the block size; who-routed-what over a
tail then reads none of the covered tables and answers as the full query; an altered, missing or
malformed directory, or more keys than lookups are worth, fall back to the tables' scan with the
same answer, and ``verify`` names what is wrong."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexuscore.projections import SCHEMAS, EvidenceStore, _keyed, _manifest, compact, verify
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


@pytest.mark.parametrize("part", ["data", "fences"])
def test_an_altered_file_is_a_verify_finding_and_changes_no_answer(
    keyed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, part: str
) -> None:
    root = copy(keyed, tmp_path)
    altered = root / field_of(root)["outcomes"][part]["path"]
    payload = bytearray(altered.read_bytes())
    payload[_keyed.KEY_BYTES * 3 if part == "data" else len(payload) // 2] ^= 1  # (data: a key)
    altered.write_bytes(bytes(payload))
    with EvidenceStore(root) as store:
        rows = store.query("SELECT tenant_id, request_id FROM outcomes")
        assert store._keyed_rows(_keyed.OUTCOMES, rows) is None
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert [(f.kind, f.where) for f in report.findings if f.fatal] == [
        ("routed_keys_altered", str(altered.relative_to(root)))
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


def crafted(root: Path) -> list[dict[str, Any]]:
    """A decisions and an outcomes file with what events never carry but a table may hold: null
    times and amounts, an amount of -2**63 (the smallest int64), null report columns."""
    files = []
    for k in _keyed.KEYED:
        rows: dict[str, list[Any]] = {name: [None] * 4 for name in SCHEMAS[k.table].names}
        rows["tenant_id"], rows["request_id"] = ["t1", "t1", "t2", "t2"], ["r1", "r2", "r3", "r3"]
        rows["occurred_at"] = [T0, None, T0, T0]
        rows[k.amount] = [-(2**63), None, 2**63 - 1, 0]
        rows[k.groups[0]] = ["a", "b", None, "a"]
        path = root / "region=eu" / k.table / "crafted.parquet"
        path.parent.mkdir(parents=True)
        pq.write_table(pa.table(rows, schema=SCHEMAS[k.table]), path)
        files.append({"path": str(path.relative_to(root)), "table": k.table, "region": "eu"})
    return files


@pytest.mark.parametrize("block", [1, 3, _keyed.BLOCK])
def test_every_value_a_table_may_hold_is_found_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    # (Batches of 2 blocks: the compaction's read of the sorted rows crosses batches.)
    monkeypatch.setattr(_keyed, "BLOCK", block)
    monkeypatch.setattr(_keyed, "BATCH_BLOCKS", 2)
    field = _keyed.write_keys(tmp_path, crafted(tmp_path), 7)
    probes = [("t1", "r1"), ("t1", "r2"), ("t2", "r3"), ("t2", "r1"), ("t3", "r3")]
    for k in _keyed.KEYED:
        directory = _keyed.Directory.open(tmp_path, field, k)
        assert directory is not None
        found = directory.find(probes)
        assert found is not None
        rows = _keyed.found_table(probes, found, k).to_pylist()
        with EvidenceStore(tmp_path, files=crafted_entries(tmp_path)) as store:
            expected = store.query(f"SELECT {', '.join(COLUMNS[k.table])} FROM {k.table}").to_pylist()  # noqa: S608
        assert sorted(rows, key=repr) == sorted(expected, key=repr)


def crafted_entries(root: Path) -> list[dict[str, Any]]:
    return [
        {"path": str(p.relative_to(root)), "table": p.parent.name, "region": "eu"}
        for p in sorted(root.glob("region=eu/*/crafted.parquet"))
    ]


def test_an_empty_directory_finds_nothing_without_reading(tmp_path: Path) -> None:
    files = [e for e in crafted(tmp_path) if e["table"] == "decisions"]  # no outcome at all
    field = _keyed.write_keys(tmp_path, files, 7)
    assert field["outcomes"]["data"]["rows"] == 0
    directory = _keyed.Directory.open(tmp_path, field, _keyed.OUTCOMES)
    assert directory is not None and directory.blocks == 0
    found = directory.find([("t1", "r1")])
    assert found is not None and found.probe == []


@pytest.mark.parametrize("kind", ["fifo", "symlink", "longer"])
def test_a_data_file_that_is_not_the_sealed_one_fails_the_lookup_at_once(tmp_path: Path, kind: str) -> None:
    field = _keyed.write_keys(tmp_path, crafted(tmp_path), 7)
    data = tmp_path / field["decisions"]["data"]["path"]
    payload = data.read_bytes()
    data.unlink()
    if kind == "fifo":
        os.mkfifo(data)  # (opening one to read would block until a writer comes)
    elif kind == "symlink":
        (tmp_path / "elsewhere.bin").write_bytes(payload)
        data.symlink_to(tmp_path / "elsewhere.bin")
    else:
        data.write_bytes(payload + b"\0" * _keyed.WIDTH)
    directory = _keyed.Directory.open(tmp_path, field, _keyed.DECISIONS)
    assert directory is not None and directory.find([("t1", "r1")]) is None
    assert not _keyed.trusted_files(tmp_path, field)
