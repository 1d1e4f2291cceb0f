"""What each depth of ``verify`` proves: the default checks the bytes against their seal; ``deep``
also checks that the sealed Merkle roots are those of the rows (what inclusion proofs rely on)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import SCHEMAS, EvidenceStore, Manifest, verify
from nexuscore.projections._manifest import canonical
from nexuscore.projections._writer import write_table
from tests.factories import POLICY, project, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modes") / "evidence"
    project(root, run_history(POLICY, 40, seed=11), flush_every=120)
    return root


def _reseal(root: Path, change: Callable[[dict[str, Any]], None]) -> str:
    """The key holder's sealer (a bug, or a lie) changes the entry of a file of several rows: the
    entry is chained and the head signed as any other. Returns the file's path."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    target = next(i for i, e in enumerate(entries) if e["kind"] == "file" and e["rows"] > 2)
    change(entries[target])
    prev = "0" * 64
    out = []
    for e in entries:
        line = canonical({**e, "prev": prev})
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in out))
    (root / "manifest.head.json").unlink()  # (the old head no longer signs these entries: refused)
    Manifest(root, signing_key())  # recovers (the chain holds) and signs the head
    return str(entries[target]["path"])


def _seal_a_wrong_root(root: Path) -> str:
    """A sealed Merkle root that is not the rows'; the file's sha256 is right."""

    def wrong_root(entry: dict[str, Any]) -> None:
        entry["merkle_root"] = hashlib.sha256(b"not the rows").hexdigest()

    return _reseal(root, wrong_root)


def _change_one_cell(root: Path) -> str:
    """One cell of a middle row rewritten, the file's new sha256 sealed, its Merkle root left as
    the rows' before: only the rows can tell."""

    def rewrite(entry: dict[str, Any]) -> None:
        path = root / entry["path"]
        table = pq.read_table(path, schema=SCHEMAS[entry["table"]])
        row = table.num_rows // 2
        events = table.column("event_id").to_pylist()
        events[row] = events[row] + "-forged"
        at = table.schema.get_field_index("event_id")
        changed = table.set_column(at, "event_id", pa.array(events, pa.string()))
        entry["sha256"] = write_table(path, changed)

    return _reseal(root, rewrite)


def test_both_modes_pass_a_pristine_store_and_count_the_same_rows(pristine: Path) -> None:
    default = verify(pristine, PUBLIC, KNOWN, workers=1)
    deep = verify(pristine, PUBLIC, KNOWN, workers=1, deep=True)
    assert default.findings == [] and deep.findings == []
    assert default.rows == deep.rows > 0 and default.files == deep.files


def test_verify_runs_unbounded_when_duckdb_cannot_keep_to_its_memory(
    pristine: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexuscore.projections import _verify

    bounded = verify(pristine, PUBLIC, KNOWN, workers=1)
    asked: list[str | None] = []
    duckdb_limits = _verify.duckdb_limits

    def limits(threads: int, spill: str, memory: str | None = None) -> dict[str, object]:
        asked.append(memory)
        return duckdb_limits(threads, spill, memory)

    monkeypatch.setattr(_verify, "duckdb_limits", limits)
    monkeypatch.setattr(_verify, "DUCKDB_MEMORY", "1MB")  # too little for any query
    report = verify(pristine, PUBLIC, KNOWN, workers=1)
    assert asked == ["1MB", None]
    assert report.findings == [] and (report.rows, report.requests) == (bounded.rows, bounded.requests)


def test_only_deep_finds_a_sealed_root_that_is_not_the_rows(pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    path = _seal_a_wrong_root(root)
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []
    deep = verify(root, PUBLIC, KNOWN, workers=2, deep=True)
    # The file is then left out of the views, so what its rows accounted for shows as missing too.
    assert ("merkle_mismatch", path) in [(f.kind, f.where) for f in deep.findings]
    assert not deep.ok


@pytest.mark.parametrize("workers", [1, 2])
def test_only_deep_finds_one_changed_cell_resealed_under_the_old_root(
    pristine: Path, tmp_path: Path, workers: int
) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    path = _change_one_cell(root)
    assert "merkle_mismatch" not in {f.kind for f in verify(root, PUBLIC, KNOWN, workers=workers).findings}
    deep = verify(root, PUBLIC, KNOWN, workers=workers, deep=True)
    assert [f.where for f in deep.findings if f.kind == "merkle_mismatch"] == [path]
    assert not deep.ok


def test_a_changed_byte_fails_both_modes(pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    victim = sorted(root.glob("region=*/*/*.parquet"))[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    for deep in (False, True):
        kinds = {f.kind for f in verify(root, PUBLIC, KNOWN, workers=1, deep=deep).findings}
        assert "file_altered" in kinds


def test_deep_names_a_sealed_file_whose_rows_cannot_be_rendered(pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)

    def drop_a_column(entry: dict[str, Any]) -> None:
        path = root / entry["path"]
        table = pq.read_table(path, schema=SCHEMAS[entry["table"]])
        entry["sha256"] = write_table(path, table.drop_columns(["producer"]))

    path = _reseal(root, drop_a_column)
    deep = verify(root, PUBLIC, KNOWN, workers=2, deep=True)
    found = [f for f in deep.findings if f.kind == "merkle_mismatch"]
    assert [f.where for f in found] == [path]
    assert "cannot be read" in found[0].detail and "producer" in found[0].detail


def test_a_pipe_in_place_of_a_sealed_file_is_named_and_stalls_nothing(pristine: Path, tmp_path: Path) -> None:
    # (Opening a pipe to read blocks until a writer comes: verify and the queries would hang.)
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    victim = sorted(root.glob("region=*/*/*.parquet"))[0]
    victim.unlink()
    os.mkfifo(victim)
    for deep in (False, True):
        report = verify(root, PUBLIC, KNOWN, workers=1, deep=deep)
        assert ("file_altered", str(victim.relative_to(root))) in {(f.kind, f.where) for f in report.findings}
    with pytest.raises(EvidenceError, match="is not a regular file"):
        EvidenceStore(root)
