"""One file per table and region per flush: a flush of several partitions writes one file for each
(table, region), whose entry says which offsets of which partition its rows come from and how many
of them; ``verify`` accepts it, and rows of one partition removed from it or doubled in it are
caught, even when whoever did it sealed the file and signed the ledger again."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiokafka import TopicPartition

from nexuscore.projections import LocalKeyStore, committed_files, compact, verify, write_table
from nexuscore.projections._manifest import Manifest, canonical
from nexuscore.projections._seal import table_root
from tests.factories import POLICY, T0, signing_key
from tests.unit.test_projector_batches import projected, records

PUBLIC = signing_key().public_key()


@pytest.fixture(scope="module")
def flushed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two flushes of a log of three partitions a topic, added a poll at a time."""
    base = tmp_path_factory.mktemp("flush")
    log = records(partitions=3)
    half = len(log) // 2

    def feed(part: list[Any]) -> Any:
        def add(p: Any, batches: dict[Any, Any]) -> None:
            for r in part:
                p.add_many(batches, TopicPartition(r.topic, r.partition), [r])

        return add

    projected(base / "evidence", base / "keys", feed(log[:half]))
    projected(base / "evidence", base / "keys", feed(log[half:]))
    return base


def check(root: Path) -> Any:
    return verify(root, PUBLIC, {POLICY.digest}, keystore=LocalKeyStore(root.parent / "keys"), workers=1)


def test_a_flush_of_several_partitions_writes_one_file_per_table_and_region(flushed: Path) -> None:
    root = flushed / "evidence"
    entries = [json.loads(line) for line in (root / "manifest.jsonl").read_bytes().splitlines()]
    checkpoints = [i for i, e in enumerate(entries) if e["kind"] == "checkpoint"]
    assert len(checkpoints) == 2
    for start, end in zip([-1, *checkpoints], checkpoints, strict=False):
        files = [e for e in entries[start + 1 : end] if e["kind"] == "file"]
        per_file = Counter((e["table"], e["region"]) for e in files)
        assert per_file and set(per_file.values()) == {1}
        # Each file names the partitions its rows come from, within that flush's offsets.
        flush = {(p["topic"], p["partition"]): p for p in entries[end]["partitions"]}
        for e in files:
            assert sum(s["rows"] for s in e["sources"]) == e["rows"]
            for s in e["sources"]:
                p = flush[(s["topic"], s["partition"])]
                assert (s["first_offset"], s["last_offset"]) == (p["start"], p["end"] - 1)
    assert any(len(e["sources"]) > 1 for e in committed_files(root))
    report = check(root)
    assert report.ok and report.findings == [], report.findings


def _several(root: Path) -> tuple[int, dict[str, Any]]:
    """The manifest index and entry of a committed file holding rows of several partitions."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    for i, line in enumerate(lines):
        e = json.loads(line)
        if e["kind"] == "file" and len([s for s in e.get("sources", []) if s["rows"] > 1]) > 1:
            return i, e
    raise AssertionError("no file of several partitions")


def _reseal(root: Path, index: int, parts: list[pa.Table], sources: list[dict[str, Any]]) -> None:
    """Seal ``parts`` (rows of one partition each) as the file of entry ``index`` and sign the whole ledger again, as the projector
    would have (row groups per partition, sha256, Merkle root, chain, head): a sealer that lost or
    doubled rows, or a forger holding the signing key."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    entry = json.loads(lines[index])
    data = pa.concat_tables(parts)
    digest = write_table(root / entry["path"], data, groups=[p.num_rows for p in parts])
    root_hash = table_root(duckdb.connect(), data).hex()
    entry.update(sources=sources, rows=data.num_rows, sha256=digest, merkle_root=root_hash)
    lines[index] = canonical(entry)
    for i in range(index + 1, len(lines)):
        later = json.loads(lines[i])
        later["prev"] = hashlib.sha256(lines[i - 1]).hexdigest()
        lines[i] = canonical(later)
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (root / "manifest.head.json").unlink()  # (the old head no longer signs these entries: refused)
    Manifest(root, signing_key())  # recovers the ledger and signs its head


@pytest.mark.parametrize("change", ["remove", "duplicate"])
@pytest.mark.parametrize("entry", ["recounted", "as_sealed"])
def test_rows_of_one_partition_removed_or_doubled_inside_a_file_are_caught(
    flushed: Path, tmp_path: Path, change: str, entry: str
) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(flushed / "evidence", root)
    shutil.copytree(flushed / "keys", tmp_path / "keys")
    index, sealed = _several(root)
    data = pq.read_table(root / sealed["path"])
    victim = sealed["sources"][0]
    parts, sources = [], []
    for s in sealed["sources"]:
        mine = pc.and_(
            pc.equal(data["src_topic"], s["topic"]), pc.equal(data["src_partition"], s["partition"])
        )
        rows = data.filter(mine)
        if s is victim:
            rows = rows.slice(1) if change == "remove" else pa.concat_tables([rows, rows])
        parts.append(rows)
        sources.append({**s, "rows": rows.num_rows if entry == "recounted" else s["rows"]})
    _reseal(root, index, parts, sources if entry == "recounted" else sealed["sources"])
    if entry == "as_sealed":  # the entry still claims the original rows per partition: its total too
        lines = (root / "manifest.jsonl").read_bytes().splitlines()
        assert json.loads(lines[index])["sources"] == sealed["sources"]
    report = check(root)
    assert not report.ok
    kinds = {(f.kind, f.where) for f in report.findings}
    where = f"{victim['topic']}[{victim['partition']}]"
    if entry == "recounted":
        # The entry agrees with the file: the partition's checkpoints do not.
        assert ("rows_missing" if change == "remove" else "rows_duplicated", where) in kinds, report.findings
    else:
        details = [f.detail for f in report.findings if f.kind == "rows_mismatch"]
        assert any(where in d for d in details), report.findings


def test_compaction_merges_files_of_several_partitions_and_still_verifies(
    flushed: Path, tmp_path: Path
) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(flushed / "evidence", root)
    shutil.copytree(flushed / "keys", tmp_path / "keys")
    before = committed_files(root)
    done = compact(root, signing_key(), T0, workers=1)
    after = committed_files(root)
    assert done.replaced > 0 and len(after) < len(before)
    assert sum(e["rows"] for e in after) == sum(e["rows"] for e in before)
    merged = [e for e in after if e["path"].split("/")[-1].startswith("compact-")]
    assert merged and all(sum(s["rows"] for s in e["sources"]) == e["rows"] for e in merged)
    report = check(root)
    assert report.ok and report.findings == [], report.findings


def test_a_flush_in_progress_is_tolerated_and_an_old_flush_name_unlisted_is_not(
    flushed: Path, tmp_path: Path
) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(flushed / "evidence", root)
    shutil.copytree(flushed / "keys", tmp_path / "keys")
    size = len((root / "manifest.jsonl").read_bytes().splitlines())
    sample = root / committed_files(root)[0]["path"]
    writing = f"region=eu/requests/flush-{size:012d}.parquet"  # the next flush's name
    stale = "region=eu/requests/flush-000000000001.parquet"  # a committed flush's name
    for name in (writing, stale):
        shutil.copyfile(sample, root / name)
    report = check(root)
    assert [(f.kind, f.where) for f in report.findings if f.fatal] == [("unlisted_file", stale)]
    assert ("unflushed_file", writing) in {(f.kind, f.where) for f in report.findings}


def test_a_hostile_sources_list_is_a_finding_not_a_crash(flushed: Path, tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(flushed / "evidence", root)
    shutil.copytree(flushed / "keys", tmp_path / "keys")
    index, sealed = _several(root)
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    entry = json.loads(lines[index])
    entry["sources"] = [{"topic": ["not", "a", "name"], "partition": {"x": 1}, "rows": "many"}, "junk"]
    lines[index] = canonical(entry)
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    report = check(root)
    assert not report.ok and "chain_broken" in {f.kind for f in report.findings}
