"""Holes found by attacking NexusCore as an outsider would (2026-12-01). Each test states the
attack and the behaviour we want: those fixed since pass; those still open are marked
``xfail(strict=True)`` with what is missing, so that a fix shows (strict: its test then passes and
the mark must come off).

The store: a small history in which two requests were renamed ``loan-1`` (rejected at admission)
and ``loan-17`` (answered), ids a client may choose."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization

from nexuscore.client import NexusClient
from nexuscore.gateway import KeyDefaults, KeyRing, add_key, make_app
from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import (
    EvidenceStore,
    LocalKeyStore,
    check_proof,
    committed_files,
    compact,
    erase,
    lineage_at,
    prove,
    prove_consistency,
    verify,
)
from tests.factories import POLICY, T0, offline_projector, project, replace, run_history, signing_key

PUBLIC = signing_key().public_key()
RAW_PUBLIC = PUBLIC.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
KNOWN = {POLICY.digest}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    events = run_history(POLICY, 40, seed=11)
    kinds: dict[str, list[str]] = defaultdict(list)
    for e in events:
        kinds[e.request_id].append(type(e).__name__)
    rejected = next(r for r, k in kinds.items() if "RequestRejected" in k)
    answered = next(r for r, k in kinds.items() if "OutcomeRecorded" in k)
    renamed = {rejected: "loan-1", answered: "loan-17"}
    events = [replace(e, request_id=renamed[e.request_id]) if e.request_id in renamed else e for e in events]
    root = tmp_path_factory.mktemp("attack") / "evidence"
    project(root, events, flush_every=120)
    assert verify(root, PUBLIC, KNOWN, workers=1).ok
    return root


def a_copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    return root


def tables(proof: dict[str, Any]) -> list[str]:
    return sorted(ev["table"] for ev in proof["events"])


# --- 0. a restarting projector truncates the signed ledger to fit the file on disk ---------------


def test_a_restarting_projector_refuses_a_ledger_shorter_than_its_signed_head(
    pristine: Path, tmp_path: Path
) -> None:
    """The folder writer cuts ``manifest.jsonl`` back to an earlier checkpoint (or garbles one
    committed line: ``_recover`` stops at the first line that is not JSON). The projector, which
    holds the key, then deletes every sealed file the lost entries named and signs a head over the
    shorter ledger; verify afterwards has no trace of it (the old head is gone)."""
    root = a_copy(pristine, tmp_path)
    lines = (root / "manifest.jsonl").read_bytes().splitlines(keepends=True)
    files = len(committed_files(root))
    first_checkpoint = next(i for i, line in enumerate(lines) if b'"kind":"checkpoint"' in line)
    (root / "manifest.jsonl").write_bytes(b"".join(lines[: first_checkpoint + 1]))
    projector = offline_projector(root)
    try:
        projector.recover()
    except EvidenceError:
        return  # refused, naming the ledger: the fix
    assert len(committed_files(root)) == files, "sealed files deleted and the shorter ledger signed"


# --- 1. check_proof (and the README's audit.py) accept another request's rows --------------------


def test_a_proof_of_loan_17_does_not_pass_for_loan_1(pristine: Path) -> None:
    """Anyone handing an auditor a proof (no key, no folder access needed) relabels the proof of
    ``loan-17`` (answered) as one of ``loan-1`` (rejected): the check passes, since "loan-1" is a
    substring of every leaf of "loan-17"."""
    genuine = prove(pristine, "loan-1")
    assert tables(genuine) == ["rejections", "requests"]
    relabelled = {**prove(pristine, "loan-17"), "request_id": "loan-1"}
    assert tables(relabelled) == ["decisions", "dispatches", "outcomes", "requests", "settlements"]
    assert check_proof(relabelled, RAW_PUBLIC) != []


def test_a_proof_with_no_events_is_not_a_proof(pristine: Path) -> None:
    empty = {**prove(pristine, "loan-1"), "events": []}
    assert check_proof(empty, RAW_PUBLIC) != []


# --- 2. prove and lineage's search open table files unchecked: a pipe hangs them; a gap, a traceback


READERS = {
    "prove": "from nexuscore.projections import prove as read",
    # A store never compacted (no request index): lineage searches every file with DuckDB.
    "lineage": "from nexuscore.projections import lineage_at as read",
}


def run_reader(reader: str, root: Path) -> subprocess.CompletedProcess[str]:
    """``prove`` or ``lineage_at`` of loan-1 in a child process, killed if it does not end (a reader
    blocked in C on a pipe; pytest-timeout's thread method would end the whole session instead)."""
    code = (
        f"import sys; from pathlib import Path; {READERS[reader]}\n"
        "from nexuscore.kernel.errors import EvidenceError\n"
        "try:\n    read(Path(sys.argv[1]), 'loan-1')\n"
        "except EvidenceError as exc:\n    print('EvidenceError:', exc); sys.exit(3)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    try:
        return subprocess.run(
            [sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=20, env=env
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{reader} hung on a pipe in place of a sealed file")


def the_requests_file(root: Path) -> Path:
    entry = next(e for e in committed_files(root) if e["table"] == "requests")
    return root / entry["path"]


@pytest.mark.parametrize("reader", sorted(READERS))
def test_a_pipe_in_place_of_a_table_file_is_named_not_waited_on(
    pristine: Path, tmp_path: Path, reader: str
) -> None:
    """Today's fix (``test_pipes_in_the_folder.py``) covers the store, verify, the projector and the
    files the request index points lineage to; these two readers were left out."""
    root = a_copy(pristine, tmp_path)
    victim = the_requests_file(root)
    victim.unlink()
    os.mkfifo(victim)
    done = run_reader(reader, root)
    assert done.returncode == 3 and "not a regular file" in done.stdout, done.stderr[-300:]


def test_prove_names_a_missing_table_file_in_one_line(pristine: Path, tmp_path: Path) -> None:
    root = a_copy(pristine, tmp_path)
    the_requests_file(root).unlink()
    with pytest.raises(EvidenceError):
        prove(root, "loan-1")


# --- 3. prove trusts the bytes on disk: a folder writer hides a request's events from its proof ---


def drop_loan_1s_rejection(root: Path) -> str:
    """Take ``loan-1``'s rejection out of the file that holds it (no key needed); that file's path."""
    for e in committed_files(root):
        path = root / e["path"]
        if e["table"] == "rejections" and "loan-1" in pq.read_table(path).column("request_id").to_pylist():
            rows = pq.read_table(path)
            pq.write_table(rows.filter(pc.not_equal(rows["request_id"], "loan-1")), path)
            return str(e["path"])
    raise AssertionError("no rejection of loan-1")


def test_a_folder_writer_cannot_drop_the_rejection_from_a_proof(pristine: Path, tmp_path: Path) -> None:
    """The rejection of ``loan-1`` taken out of its file: ``prove`` built a proof of the request
    alone, and that proof checked, so the auditor saw a request that was never refused. It now
    hashes the files the request's rows may be in and refuses, naming the altered one."""
    root = a_copy(pristine, tmp_path)
    altered = drop_loan_1s_rejection(root)
    with pytest.raises(EvidenceError, match="is not the file the ledger sealed") as refused:
        prove(root, "loan-1")
    assert altered in str(refused.value)


def test_after_a_compaction_the_files_the_index_names_are_checked(pristine: Path, tmp_path: Path) -> None:
    """With a request index (written by compaction), ``prove`` hashes the files the index places
    the request's rows in and those it does not cover, not the whole store: the rejection taken
    out of its compacted file is refused all the same."""
    root = a_copy(pristine, tmp_path)
    compact(root, signing_key(), T0, file_rows=1_000)
    assert tables(prove(root, "loan-1")) == ["rejections", "requests"]
    unindexed = shutil.copytree(root, tmp_path / "unindexed")
    for index in (unindexed / "_index").glob("requests-*.parquet"):
        index.unlink()  # without its index, prove checks (and reads) every file
    assert tables(prove(unindexed, "loan-1")) == ["rejections", "requests"]
    altered = drop_loan_1s_rejection(root)
    with pytest.raises(EvidenceError, match="is not the file the ledger sealed") as refused:
        prove(root, "loan-1")
    assert altered in str(refused.value)


# --- 4. an erasure undone by a folder writer: the content readable again, verify green -----------


def prompt_of(root: Path, request_id: str) -> str:
    t = lineage_at(root, request_id)
    return next(
        d for d, ev in zip(t.column("detail").to_pylist(), t.column("event").to_pylist(), strict=True)
        if ev == "requests"
    )  # fmt: skip


def erase_loan_17s_tenant(root: Path) -> list[str]:
    with EvidenceStore(root) as store:
        found = store.query("SELECT tenant_id FROM requests WHERE request_id = 'loan-17'")
    tenant = found.column(0)[0].as_py()
    at = datetime(2026, 11, 30, tzinfo=UTC)
    return erase(root, LocalKeyStore(root / "_keys"), signing_key(), tenant, None, at, "art. 17")


def test_an_erasure_stays_done_when_the_old_keystore_is_put_back(pristine: Path, tmp_path: Path) -> None:
    """The writer kept ``_keys/keystore.json`` from before the erasure and puts it back: lineage
    shows the erased prompt again, and verify passes (``erasure_incomplete`` is only a warning)."""
    root = a_copy(pristine, tmp_path)
    kept = (root / "_keys" / "keystore.json").read_bytes()
    assert erase_loan_17s_tenant(root)
    assert "[erased" in prompt_of(root, "loan-17")
    (root / "_keys" / "keystore.json").write_bytes(kept)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert "[erased" in prompt_of(root, "loan-17") or not report.ok


def test_deleting_the_erasure_record_too_leaves_a_trace(pristine: Path, tmp_path: Path) -> None:
    """Same, and ``erasures.jsonl`` deleted as well: verify finds nothing at all, not even a warning."""
    root = a_copy(pristine, tmp_path)
    kept = (root / "_keys" / "keystore.json").read_bytes()
    erase_loan_17s_tenant(root)
    (root / "_keys" / "keystore.json").write_bytes(kept)
    (root / "erasures.jsonl").unlink()
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.findings != []


# --- 5. the gateway: a deeply nested body was a 500 and a logged traceback per request ------------


def test_a_deeply_nested_body_is_a_400_not_an_internal_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    _, secret = add_key(path, "acme-bank", KeyDefaults(feature="support-chat"), T0)

    async def go() -> tuple[int, str]:
        app = make_app(NexusClient("127.0.0.1:1"), KeyRing(path), timeout_s=1.0)
        async with TestClient(TestServer(app)) as http:
            nested = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
            response = await http.post(
                "/v1/chat/completions", data=nested, headers={"Authorization": f"Bearer {secret}"}
            )
            return response.status, (await response.json())["error"]["code"]

    assert asyncio.run(go()) == (400, "invalid_request")


# --- 6. a rollback to an older signed head: verify alone cannot tell, a kept head can -------------


def rolled_back(tmp_path: Path) -> tuple[Path, dict[str, Any], int]:
    """A folder writer who once copied ``manifest.head.json`` puts it back, cuts ``manifest.jsonl``
    to its size and deletes the files flushed since: a genuine earlier state of the store, with
    half the evidence gone. (The store, the later head an auditor kept, the rows before.)"""
    history = run_history(POLICY, 40, seed=11)
    root = tmp_path / "evidence"
    project(root, history[: len(history) // 2], flush_every=60)
    old_head = (root / "manifest.head.json").read_bytes()
    old_size = len((root / "manifest.jsonl").read_bytes().splitlines())
    project(root, history, flush_every=60)
    later_head = json.loads((root / "manifest.head.json").read_bytes())
    whole = verify(root, PUBLIC, KNOWN, workers=1)
    assert whole.ok
    files = {e["path"] for e in committed_files(root)}
    lines = (root / "manifest.jsonl").read_bytes().splitlines(keepends=True)[:old_size]
    (root / "manifest.jsonl").write_bytes(b"".join(lines))
    (root / "manifest.head.json").write_bytes(old_head)
    for path in files - {e["path"] for e in committed_files(root)}:
        (root / path).unlink()
    return root, later_head, whole.rows


def test_a_rollback_to_an_older_signed_head_is_refused_against_a_later_head_kept(tmp_path: Path) -> None:
    root, later_head, _ = rolled_back(tmp_path)
    with pytest.raises(EvidenceError, match="cannot have grown"):
        prove_consistency(root, later_head)


def test_verify_with_a_later_head_kept_names_the_rollback(tmp_path: Path) -> None:
    root, later_head, _ = rolled_back(tmp_path)
    report = verify(root, PUBLIC, KNOWN, workers=1, kept_heads=[later_head])
    assert not report.ok and [f.kind for f in report.findings] == ["rolled_back"]
    forged = {**later_head, "size": 1}  # (a head its signature does not cover proves nothing)
    kinds = [f.kind for f in verify(root, PUBLIC, KNOWN, workers=1, kept_heads=[forged]).findings]
    assert kinds == ["kept_head_invalid"]


def test_verify_with_an_earlier_head_kept_passes_a_store_that_only_grew(pristine: Path) -> None:
    head = json.loads((pristine / "manifest.head.json").read_bytes())
    assert verify(pristine, PUBLIC, KNOWN, workers=1, kept_heads=[head]).ok


@pytest.mark.xfail(strict=True, reason="with no head kept outside the folder, nothing anchors the ledger")
def test_verify_alone_notices_a_rollback_to_an_older_signed_head(tmp_path: Path) -> None:
    root, _, rows = rolled_back(tmp_path)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok or report.rows == rows
