"""``evidence compact``: many small sealed files become few large ones, re-sealed in the ledger, with
every row kept once, verify (both modes) green, proofs still good, and a crash anywhere harmless."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nexuscore.kernel.errors import EvidenceError, NexusError
from nexuscore.projections import (
    SCHEMAS,
    EvidenceStore,
    Manifest,
    _compact,
    _manifest,
    check_consistency,
    check_proof,
    committed_files,
    compact,
    prove,
    prove_consistency,
    verify,
)
from nexuscore.schemas import Event, InferenceRequested
from tests.factories import POLICY, T0, project, run_history, signing_key

PUBLIC = signing_key().public_key()
RAW_PUBLIC = PUBLIC.public_bytes_raw()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return run_history(POLICY, 60, seed=13)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    root = tmp_path_factory.mktemp("small") / "evidence"
    project(root, history, flush_every=40)  # many flushes: many small files
    return root


def copy(src: Path, tmp_path: Path, name: str = "evidence") -> Path:
    root = tmp_path / name
    shutil.copytree(src, root)
    return root


# Content and its data key's id: a tenant first seen after the copy gets a fresh random data key
# in each copy, so the two stores' ciphertexts of its rows differ (and nothing else).
CONTENT = frozenset({"prompt", "prompt_key", "response", "response_key", "raw_value", "raw_value_key"})


def rows_of(root: Path, *, without: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Every row of every table, as canonical JSON, sorted: equal stores hold the same rows, each
    as often."""
    with EvidenceStore(root) as store:
        return {
            t: sorted(
                json.dumps({k: v for k, v in r.items() if k not in without}, sort_keys=True, default=str)
                for r in store.query(f"SELECT * FROM {t}").to_pylist()  # noqa: S608
            )
            for t in SCHEMAS
        }


def test_compaction_keeps_every_row_once_in_fewer_files(small_files: Path, tmp_path: Path) -> None:
    root = copy(small_files, tmp_path)
    before, files_before = rows_of(root), len(committed_files(root))
    report = compact(root, signing_key(), T0, file_rows=1_000)
    assert report.replaced > report.written > 0 and report.files_after < files_before
    assert rows_of(root) == before
    assert sum(len(v) for v in before.values()) > 0
    # The replaced files are gone from the folder, and the ledger records the compaction.
    for path in (p for g in report.groups for p in g["replaced"]):
        assert not (root / path).exists()
    last = json.loads((root / "manifest.jsonl").read_bytes().splitlines()[-1])
    assert last["kind"] == "compaction" and sorted(last["replaces"]) == sorted(
        p for g in report.groups for p in g["replaced"]
    )


def test_both_verify_modes_stay_green_after_compaction(small_files: Path, tmp_path: Path) -> None:
    root = copy(small_files, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000)
    for deep in (False, True):
        report = verify(root, PUBLIC, KNOWN, workers=1, deep=deep)
        assert report.findings == [], report.findings
        assert report.rows == sum(e["rows"] for e in committed_files(root))


def test_compacted_files_are_sorted_by_tenant_and_request(small_files: Path, tmp_path: Path) -> None:
    root = copy(small_files, tmp_path)
    report = compact(root, signing_key(), T0, file_rows=1_000)
    import pyarrow.parquet as pq

    for path in (p for g in report.groups for p in g["written"]):
        keys = pq.read_table(root / path, columns=["tenant_id", "request_id"]).to_pylist()
        pairs = [(k["tenant_id"], k["request_id"]) for k in keys]
        assert pairs == sorted(pairs)


def test_proofs_hold_after_compaction_old_and_reissued(
    small_files: Path, tmp_path: Path, history: list[Event]
) -> None:
    root = copy(small_files, tmp_path)
    request = next(e for e in history if isinstance(e, InferenceRequested)).request_id
    old_proof = prove(root, request)
    old_head = json.loads((root / "manifest.head.json").read_bytes())
    compact(root, signing_key(), T0, file_rows=1_000)
    # The old proof still holds against the head it names, and that head is a prefix of the new one.
    assert check_proof(old_proof, RAW_PUBLIC) == []
    assert check_consistency(prove_consistency(root, old_head), RAW_PUBLIC) == []
    # Re-issued: the same events, now proven in the compacted files against the new head.
    new_proof = prove(root, request)
    assert check_proof(new_proof, RAW_PUBLIC) == []
    assert sorted(e["leaf"] for e in new_proof["events"]) == sorted(e["leaf"] for e in old_proof["events"])
    assert any("compact-" in json.loads(e["entry"])["path"] for e in new_proof["events"])


def test_a_crash_before_the_ledger_append_leaves_the_old_files_in_force(
    small_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(small_files, tmp_path)
    before = rows_of(root)

    def crash(self: Manifest, replaced: list[str], now: object, *sealed: object) -> None:
        raise OSError("killed")

    monkeypatch.setattr(Manifest, "commit_compaction", crash)
    with pytest.raises(OSError):
        compact(root, signing_key(), T0, file_rows=1_000)
    monkeypatch.undo()
    assert rows_of(root) == before
    report = verify(root, PUBLIC, KNOWN, workers=1)
    # The new files and the request index written for them are debris no entry commits.
    assert report.ok and {f.kind for f in report.findings} == {"compacted_file", "stale_index"}
    compact(root, signing_key(), T0, file_rows=1_000)  # runs again, deleting the debris first
    assert rows_of(root) == before
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_a_crash_before_the_old_files_are_deleted_duplicates_nothing(
    small_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy(small_files, tmp_path)
    before = rows_of(root)
    monkeypatch.setattr(_compact, "_delete", lambda root, paths: None)
    report = compact(root, signing_key(), T0, file_rows=1_000)
    assert all((root / p).exists() for g in report.groups for p in g["replaced"])
    assert rows_of(root) == before
    found = verify(root, PUBLIC, KNOWN, workers=1)
    assert found.ok and {f.kind for f in found.findings} == {"compacted_file"}


def test_the_projector_resumes_on_a_compacted_store(history: list[Event], tmp_path: Path) -> None:
    half = len(history) // 2
    plain = tmp_path / "plain"
    project(plain, history[:half], flush_every=40)
    compacted = copy(plain, tmp_path, "compacted")
    compact(compacted, signing_key(), T0, file_rows=1_000)
    for root in (plain, compacted):
        project(root, history, flush_every=40)  # resumes after what it projected
    assert rows_of(compacted, without=CONTENT) == rows_of(plain, without=CONTENT)
    assert verify(compacted, PUBLIC, KNOWN, workers=1).findings == []


def test_compaction_refuses_while_a_projector_holds_the_lock(small_files: Path, tmp_path: Path) -> None:
    root = copy(small_files, tmp_path)
    fd = os.open(root / ".projector.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with pytest.raises(EvidenceError, match="a projector is writing"):
            compact(root, signing_key(), T0, file_rows=1_000)
    finally:
        os.close(fd)


def test_compaction_refuses_a_key_that_did_not_sign_the_evidence(small_files: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    root = copy(small_files, tmp_path)
    head = (root / "manifest.head.json").read_bytes()
    with pytest.raises(EvidenceError, match="signed by key"):
        compact(root, Ed25519PrivateKey.generate(), T0, file_rows=1_000)
    assert (root / "manifest.head.json").read_bytes() == head


def test_a_compaction_entry_that_loses_rows_is_a_finding(small_files: Path, tmp_path: Path) -> None:
    root = copy(small_files, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000)
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    # A forger with the signing key drops one replaced file from the compaction's new files.
    at = len(entries) - 1
    victim = next(i for i in range(at - 1, -1, -1) if entries[i]["kind"] == "file")
    entries[at]["files"] = [p for p in entries[at]["files"] if p != entries[victim]["path"]]
    del entries[victim]
    _rechain(root, entries)
    kinds = {f.kind for f in verify(root, PUBLIC, KNOWN, workers=1).findings if f.fatal}
    assert "compaction_rows" in kinds


def _rechain(root: Path, entries: list[dict[str, object]]) -> None:
    import hashlib

    from nexuscore.projections._manifest import canonical

    prev, out = "0" * 64, []
    for seq, e in enumerate(entries):
        line = canonical({**e, "seq": seq, "prev": prev})
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in out))
    (root / "manifest.head.json").unlink()  # (a ledger shorter than its head is refused: re-signed anew)
    Manifest(root, signing_key())


def test_the_cli_compacts_then_has_nothing_to_do_and_verify_deep_agrees(
    small_files: Path, tmp_path: Path
) -> None:
    from cryptography.hazmat.primitives import serialization
    from typer.testing import CliRunner

    from nexuscore.cli import app

    root = copy(small_files, tmp_path)
    pem, pub = tmp_path / "signer.pem", tmp_path / "signer.pub"
    pem.write_bytes(
        signing_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    pub.write_bytes(
        PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    runner = CliRunner()
    args = ["evidence", "compact", "-e", str(root), "--signing-key", str(pem), "--file-rows", "1000"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "compacted" in first.stdout and "request index of" in " ".join(first.stdout.split())
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to compact" in again.stdout
    assert "request index" not in again.stdout  # the index covers every file already
    deep = runner.invoke(app, ["evidence", "verify", "-e", str(root), "--public-key", str(pub), "--deep"])
    assert deep.exit_code == 0, deep.output
    assert "Merkle root" in " ".join(deep.stdout.split())
    tiny = runner.invoke(app, [*args[:-1], "10"])
    assert isinstance(tiny.exception, NexusError) and "--file-rows" in str(tiny.exception)


@pytest.mark.parametrize("chunk", [2, 4, 8])
def test_proofs_from_recorded_subtree_roots_equal_proofs_from_every_row(
    small_files: Path, tmp_path: Path, history: list[Event], monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    root = copy(small_files, tmp_path)
    monkeypatch.setattr(_compact, "CHUNK_ROWS", chunk)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)  # in this process: patched
    chunked = [e for e in committed_files(root) if "chunk_roots" in e]
    assert chunked and any(e["rows"] % chunk for e in chunked)  # a partial last subtree too
    assert verify(root, PUBLIC, KNOWN, workers=1, deep=True).findings == []
    requests = [e.request_id for e in history if isinstance(e, InferenceRequested)]
    for request in requests[:: max(len(requests) // 6, 1)]:
        proof = prove(root, request)
        assert check_proof(proof, RAW_PUBLIC) == []
        # The same proof as one built from every row of the file.
        for event in proof["events"]:
            entry = json.loads(event["entry"])
            plain = {k: v for k, v in entry.items() if k not in ("chunk_rows", "chunk_roots")}
            from nexuscore.projections import _prove

            size, path = _prove._file_path(
                duckdb.connect(), event["table"], str(root / entry["path"]), event["leaf_index"], plain
            )
            assert (size, [h.hex() for h in path]) == (event["file_size"], event["file_path"])


def test_compacted_files_keep_no_statistics_of_content_but_keep_them_where_lookups_prune(
    small_files: Path, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    root = copy(small_files, tmp_path)
    report = compact(root, signing_key(), T0, file_rows=1_000)
    written = [p for g in report.groups for p in g["written"] if "/requests/" in p]
    assert written
    for path in written:
        group = pq.read_metadata(root / path).row_group(0)
        stats = {group.column(i).path_in_schema: group.column(i).statistics for i in range(group.num_columns)}
        assert stats["prompt"] is None or not stats["prompt"].has_min_max
        assert all(
            stats[c] is not None and stats[c].has_min_max for c in ("request_id", "tenant_id", "src_offset")
        )


@pytest.mark.parametrize("statistics", [True, False], ids=["from-footer", "from-rows"])
def test_a_row_outside_its_entrys_offsets_is_a_finding_with_or_without_statistics(
    tmp_path: Path, statistics: bool
) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nexuscore.projections import VerifyReport, _verify, _verify_files

    relative = "region=eu/decisions/t-p0-000000000000-000000000007.parquet"
    (tmp_path / relative).parent.mkdir(parents=True)
    rows = pa.table(
        {
            "src_topic": ["t"] * 3,
            "src_partition": pa.array([0] * 3, pa.int32()),
            "src_offset": pa.array([5, 6, 9], pa.int64()),  # 9: past the entry's last offset
            "data_region": ["eu"] * 3,
        }
    )
    pq.write_table(rows, tmp_path / relative, write_statistics=statistics)
    entry = {
        "path": relative,
        "table": "decisions",
        "region": "eu",
        "topic": "t",
        "partition": 0,
        "first_offset": 0,
        "last_offset": 7,
    }
    _, count, placement = _verify_files._read(tmp_path / relative)
    assert count == 3 and (placement is None) is not statistics
    report = VerifyReport()
    _verify._check_placement(tmp_path, [entry], {relative: placement}, report)
    assert [f.kind for f in report.findings] == ["row_misplaced"]
    assert "offsets 5..9" in report.findings[0].detail


@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_changed_on_disk_is_never_resealed_by_a_compaction(
    small_files: Path, tmp_path: Path, workers: int
) -> None:
    """The residency rule rewritten in a sealed file (same rows, same count, no invariant broken) is
    a ``file_altered`` finding; a compaction that merged it sealed the change anew, and both verify
    modes passed after it (the code before this test). It refuses instead, naming the file, and
    leaves the ledger and the files as they were."""
    root = copy(small_files, tmp_path)
    entry = next(e for e in committed_files(root) if e["table"] == "decisions" and e["rows"] > 1)
    path = root / entry["path"]
    table = pq.read_table(path)
    forged = pa.array(["approved-by-compliance"] * table.num_rows)
    at = table.schema.get_field_index("residency_rule")
    pq.write_table(table.set_column(at, "residency_rule", forged), path)
    ledger, files = (root / "manifest.jsonl").read_bytes(), sorted(p.name for p in root.glob("region=*/*/*"))
    assert ("file_altered", entry["path"]) in {
        (f.kind, f.where) for f in verify(root, PUBLIC, KNOWN).findings
    }

    with pytest.raises(EvidenceError, match=f"{entry['path']} is not the file the ledger sealed"):
        compact(root, signing_key(), T0, workers=workers)

    assert (root / "manifest.jsonl").read_bytes() == ledger
    assert sorted(p.name for p in root.glob("region=*/*/*")) == files  # (nothing another group wrote)
    assert ("file_altered", entry["path"]) in {
        (f.kind, f.where) for f in verify(root, PUBLIC, KNOWN).findings
    }


def test_the_merge_reads_copies_checked_against_their_seals(small_files: Path, tmp_path: Path) -> None:
    """Compaction and ``prove`` read private copies of the bytes they checked: a file changed after
    the check (and put back before anyone looks) cannot reach them."""
    root = copy(small_files, tmp_path)
    entries = [e for e in committed_files(root) if e["table"] == "decisions"][:3]
    into = tmp_path / "inputs"
    into.mkdir()
    copies = _manifest.sealed_copies(root, entries, into, purpose="compact it", refusal=str)
    originals = [(root / e["path"]).read_bytes() for e in entries]
    assert [Path(c).read_bytes() for c in copies] == originals
    (root / entries[0]["path"]).write_bytes(b"PAR1 swapped in after the check")
    assert Path(copies[0]).read_bytes() == originals[0]
    with pytest.raises(EvidenceError, match=f"^{entries[0]['path']}$"):  # (``refusal`` of its path)
        _manifest.sealed_copies(root, entries, tmp_path, purpose="compact it", refusal=str)
    (root / entries[0]["path"]).write_bytes(originals[0])
    (root / entries[1]["path"]).unlink()
    os.mkfifo(root / entries[1]["path"])  # (a pipe would block the reader: refused as not a file)
    with pytest.raises(EvidenceError, match="cannot copy .* to compact it: not a regular file"):
        _manifest.sealed_copies(root, entries, into, purpose="compact it", refusal=str)


def test_a_file_changed_on_disk_that_is_not_merged_seals_no_report_derived_from_it(
    small_files: Path, tmp_path: Path
) -> None:
    """A file left as it is still feeds the index and the partials the compaction seals: changed on
    disk, it makes the compaction refuse too, before anything is written."""
    root = copy(small_files, tmp_path)
    merged = {e["path"] for es in _compact.plan(committed_files(root)).values() for e in es}
    entry = next(e for e in committed_files(root) if e["path"] not in merged)
    path = root / entry["path"]
    table = pq.read_table(path)
    at = table.schema.get_field_index("producer")
    pq.write_table(table.set_column(at, "producer", pa.array(["forged"] * table.num_rows)), path)
    ledger, files = (root / "manifest.jsonl").read_bytes(), sorted(p.name for p in root.glob("region=*/*/*"))

    with pytest.raises(EvidenceError, match=f"{entry['path']} is not the file the ledger sealed"):
        compact(root, signing_key(), T0, workers=2)

    assert (root / "manifest.jsonl").read_bytes() == ledger
    assert sorted(p.name for p in root.glob("region=*/*/*")) == files
    assert not (root / "_index").exists()  # (no index, no partials)
