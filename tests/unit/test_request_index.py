"""The request index ``evidence compact`` seals: lineage through it finds every row of a request that a
search of every file finds, also with flushes since (files no index covers) and without an index; an
altered index is a ``verify`` finding and cannot put another request's rows in a lineage; a damaged
or hostile index is only a slower lineage, never a wrong one or a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexuscore.projections import (
    LocalKeyStore,
    _index,
    _lineage,
    _manifest,
    _rollups,
    committed_files,
    compact,
    lineage_at,
    verify,
)
from nexuscore.schemas import Event
from tests.factories import POLICY, T0, project, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return run_history(POLICY, 60, seed=21)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    """Two thirds of the history compacted (and indexed), the rest flushed since: a tail of small
    files that no index covers."""
    root = tmp_path_factory.mktemp("indexed") / "evidence"
    project(root, history[: len(history) * 2 // 3], flush_every=40)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, history, flush_every=40)
    return root


def copy(src: Path, tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(src, root)
    return root


def requests_of(root: Path) -> list[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for e in committed_files(root):
        if e["table"] in ("requests", "outcomes", "attempts"):
            t = pq.read_table(root / e["path"], columns=["tenant_id", "request_id"])
            keys.update(
                zip(t.column("tenant_id").to_pylist(), t.column("request_id").to_pylist(), strict=True)
            )
    return sorted(keys)


def scanned(root: Path, request_id: str, tenant: str | None = None) -> list[dict[str, object]]:
    """The lineage as a search of every committed file finds it (no index)."""
    keys = LocalKeyStore(root / "_keys")
    return _lineage.lineage(root, committed_files(root), keys, request_id, tenant).to_pylist()


def index_entry(root: Path) -> dict[str, object]:
    index = _index.current_index(_manifest.signed_entries(root))
    assert index is not None
    return index


def test_the_index_finds_every_row_of_every_request_with_a_tail_of_unindexed_files(indexed: Path) -> None:
    index = index_entry(indexed)
    live = {e["path"]: e for e in committed_files(indexed)}
    covered = set(_index.index_files(indexed, index) or [])
    assert covered and covered < set(_index.indexed_paths(list(live.values())))  # not the flushes since
    through_index = 0
    for tenant, request_id in requests_of(indexed):
        assert lineage_at(indexed, request_id, tenant).to_pylist() == scanned(indexed, request_id, tenant)
        assert lineage_at(indexed, request_id).to_pylist() == scanned(indexed, request_id)
        located = _index.locate(indexed, index, live, request_id, tenant)
        assert located is not None
        through_index += bool(located[1])
    assert through_index > 10
    assert verify(indexed, PUBLIC, KNOWN, workers=1).findings == []


def test_a_second_compaction_indexes_every_file_in_force(indexed: Path, tmp_path: Path) -> None:
    root = copy(indexed, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    index = index_entry(root)
    assert _index.index_files(root, index) == _index.indexed_paths(committed_files(root))
    # The index, the residency, who-routed-what and spend partials, the routed rows (a file per day)
    # and the routed keys (data and fences per table) the same compaction sealed: nothing superseded
    # is left.
    names = sorted(p.name for p in (root / _index.INDEX_DIR).iterdir())
    rows = _rollups.current_rows(_manifest.signed_entries(root))
    assert rows and len(names) == 4 + len(rows) + 4 and Path(str(index["path"])).name in names
    assert {Path(str(e["path"])).name for e in rows.values()} < set(names)
    for tenant, request_id in requests_of(root)[::5]:
        assert lineage_at(root, request_id, tenant).to_pylist() == scanned(root, request_id, tenant)
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_lineage_without_its_index_still_finds_every_row(indexed: Path, tmp_path: Path) -> None:
    root = copy(indexed, tmp_path)
    shutil.rmtree(root / _index.INDEX_DIR)
    for tenant, request_id in requests_of(root)[::7]:
        assert lineage_at(root, request_id, tenant).to_pylist() == scanned(root, request_id, tenant)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    # (The partials were in the same folder: the reports count every row instead.)
    assert report.ok and [f.kind for f in report.findings] == [
        "index_missing",
        "residency_missing",
        "routed_missing",
        "spend_missing",
        *["routed_rows_missing"] * len(_rollups.current_rows(_manifest.signed_entries(root)) or {}),
        *["routed_keys_missing"] * 4,  # (data and fences, of decisions and of outcomes)
    ]


def _rewrite_index(root: Path, change: pa.Table) -> None:
    """Replace the index's rows, keeping its schema and list of files (what an attacker could do)."""
    path = root / str(index_entry(root)["path"])
    old = pq.read_table(path)
    pq.write_table(change.cast(old.schema), path)


def test_an_index_that_hides_rows_is_found_by_verify_and_cannot_forge_rows(
    indexed: Path, tmp_path: Path
) -> None:
    root = copy(indexed, tmp_path)
    path = root / str(index_entry(root)["path"])
    rows = pq.read_table(path)
    victim, other = rows.column("request_id")[0].as_py(), rows.column("request_id")[-1].as_py()
    truth = scanned(root, victim)
    # The victim's rows left out, and its id pointed at another request's rows instead.
    theirs = rows.filter(pa.compute.equal(rows.column("request_id"), other))
    forged = pa.concat_tables(
        [
            theirs.set_column(0, "request_id", pa.array([victim] * theirs.num_rows)),
            rows.filter(pa.compute.not_equal(rows.column("request_id"), victim)),
        ]
    ).sort_by([("request_id", "ascending")])
    _rewrite_index(root, forged)
    shown = lineage_at(root, victim).to_pylist()
    assert {r["event_id"] for r in shown} <= {r["event_id"] for r in truth}  # nothing of the other request
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok and "index_altered" in {f.kind for f in report.findings if f.fatal}


@pytest.mark.parametrize(
    "damage",
    [
        b"not parquet at all",
        b"",
        b"PAR1" + b"\x00" * 64 + b"PAR1",
    ],
)
def test_a_damaged_index_only_makes_lineage_search_every_file(
    indexed: Path, tmp_path: Path, damage: bytes
) -> None:
    root = copy(indexed, tmp_path)
    (root / str(index_entry(root)["path"])).write_bytes(damage)
    for tenant, request_id in requests_of(root)[::9]:
        assert lineage_at(root, request_id, tenant).to_pylist() == scanned(root, request_id, tenant)
    assert "index_altered" in {f.kind for f in verify(root, PUBLIC, KNOWN, workers=1).findings}


@pytest.mark.parametrize(
    "column, value",
    [("file", 10_000), ("file", -1), ("row", 10_000_000), ("row", -5)],
)
def test_index_numbers_out_of_range_are_ignored_not_followed(
    indexed: Path, tmp_path: Path, column: str, value: int
) -> None:
    root = copy(indexed, tmp_path)
    rows = pq.read_table(root / str(index_entry(root)["path"]))
    victim = rows.column("request_id")[0].as_py()
    where = rows.schema.get_field_index(column)
    _rewrite_index(root, rows.set_column(where, column, pa.array([value] * rows.num_rows, pa.int32())))
    assert lineage_at(root, victim).to_pylist() == scanned(root, victim)


@pytest.mark.parametrize(
    "index",
    [
        {"path": "../outside.parquet", "sha256": "0" * 64},
        {"path": "_keys/keys.json", "sha256": "0" * 64},
        {"path": "_index/requests-000000000001.parquet"},
        {"path": 7, "sha256": "0" * 64},
        "not an object",
    ],
)
def test_an_index_entry_naming_another_file_is_not_read(indexed: Path, tmp_path: Path, index: object) -> None:
    root = copy(indexed, tmp_path)
    # A real index placed outside the store: an entry naming it must not make lineage read it.
    shutil.copy(root / str(index_entry(root)["path"]), tmp_path / "outside.parquet")
    request_id = requests_of(root)[0][1]
    keys = LocalKeyStore(root / "_keys")
    files = committed_files(root)
    got = _lineage.lineage(root, files, keys, request_id, index=index)  # type: ignore[arg-type]
    assert got.to_pylist() == scanned(root, request_id)
    entries = [{"kind": "compaction", "index": index}]
    assert _index.current_index(entries) is None


def test_the_index_is_sorted_and_its_footer_names_the_files_it_covers(indexed: Path) -> None:
    path = indexed / str(index_entry(indexed)["path"])
    table = pq.read_table(path)
    ids = table.column("request_id").to_pylist()
    assert ids == sorted(ids)
    files = json.loads(pq.read_metadata(path).metadata[_index.FILES_KEY])
    assert all(indexed.joinpath(p).is_file() for p in files)
    assert table.num_rows == sum(e["rows"] for e in committed_files(indexed) if e["path"] in set(files))


def test_a_signed_compaction_entry_naming_a_foreign_index_is_a_finding_and_is_not_followed(
    indexed: Path, tmp_path: Path
) -> None:
    root = copy(indexed, tmp_path)
    shutil.copy(root / str(index_entry(root)["path"]), tmp_path / "outside.parquet")
    # Signed with the evidence key: the chain holds, only the entry's ``index`` is hostile.
    manifest = _manifest.Manifest(root, signing_key())
    manifest.commit_compaction([], T0, {"path": "../outside.parquet", "sha256": "0" * 64, "rows": 1})
    assert _index.current_index(_manifest.signed_entries(root)) is None
    for tenant, request_id in requests_of(root)[::11]:
        assert lineage_at(root, request_id, tenant).to_pylist() == scanned(root, request_id, tenant)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert "index_invalid" in {f.kind for f in report.findings if f.fatal}
    # The next compaction indexes the store again, from the rows.
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    assert _index.current_index(_manifest.signed_entries(root)) is not None
    assert "index_invalid" in {f.kind for f in verify(root, PUBLIC, KNOWN, workers=1).findings}
