"""A pipe in place of a file of the evidence folder, written by someone who cannot sign the ledger:
opening a pipe to read blocks until a writer comes, so every reader that opened it would hang. Each
reader either names the file in one line or goes on without it, and none of them blocks (the
module's timeout fails a test that hangs instead of letting it wait for ever)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from nexuscore.kernel.errors import EvidenceError, KeyStoreError
from nexuscore.projections import (
    EvidenceStore,
    LocalKeyStore,
    Projector,
    _index,
    _lineage,
    _manifest,
    committed_files,
    compact,
    lineage_at,
)
from nexuscore.schemas import Event
from tests.factories import POLICY, T0, offline_projector, project, run_history, signing_key

# (The thread method: a reader blocked in C on a pipe never sees the signal method's alarm.)
pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.fixture(scope="module")
def history() -> list[Event]:
    return run_history(POLICY, 40, seed=33)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    """A compacted (so indexed) store with a tail flushed since, and its keys beside it."""
    root = tmp_path_factory.mktemp("pipes") / "evidence"
    project(root, history[: len(history) // 2], flush_every=30)
    compact(root, signing_key(), T0, file_rows=1_000, workers=1)
    project(root, history, flush_every=30)
    return root


def restarted(root: Path) -> Projector:
    return offline_projector(root, LocalKeyStore(root / "_keys"))


def a_copy_with_a_pipe(pristine: Path, tmp_path: Path, relative: str) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    victim = root / relative
    victim.unlink(missing_ok=True)
    os.mkfifo(victim)
    return root


@pytest.mark.parametrize("relative", [_manifest.MANIFEST, _manifest.HEAD])
def test_a_pipe_in_place_of_the_ledger_is_named_by_the_store(
    pristine: Path, tmp_path: Path, relative: str
) -> None:
    root = a_copy_with_a_pipe(pristine, tmp_path, relative)
    with pytest.raises(EvidenceError, match=f"{relative}.*not a regular file"):
        EvidenceStore(root)


def test_a_restarting_projector_names_a_pipe_in_place_of_the_ledger(pristine: Path, tmp_path: Path) -> None:
    # (It writes the head, atomically, and never reads it.)
    root = a_copy_with_a_pipe(pristine, tmp_path, _manifest.MANIFEST)
    with pytest.raises(EvidenceError, match=f"{_manifest.MANIFEST}: not a regular file"):
        restarted(root).recover()


def test_a_pipe_in_place_of_the_erasure_ledger_is_named(pristine: Path, tmp_path: Path) -> None:
    root = a_copy_with_a_pipe(pristine, tmp_path, _manifest.ERASURES)
    with pytest.raises(EvidenceError, match=f"{_manifest.ERASURES}: not a regular file"):
        _manifest.read_erasures(root)


@pytest.mark.parametrize("name", ["keystore.json", "master.key"])
def test_a_pipe_in_place_of_a_key_file_is_named(pristine: Path, tmp_path: Path, name: str) -> None:
    root = a_copy_with_a_pipe(pristine, tmp_path, f"_keys/{name}")
    with pytest.raises(KeyStoreError, match=f"{name}.*not a regular file"):
        LocalKeyStore(root / "_keys").data_key(POLICY.tenants[0].id, None, T0)


def test_a_restarting_projector_names_a_pipe_in_place_of_a_sealed_file(
    pristine: Path, tmp_path: Path
) -> None:
    # The dedup windows are rebuilt from the last files: it must not resume blind, nor wait for ever.
    last = committed_files(pristine)[-1]["path"]
    root = a_copy_with_a_pipe(pristine, tmp_path, last)
    with pytest.raises(EvidenceError, match=f"cannot read .*{last}.* to resume: .*not a regular file"):
        restarted(root).recover()


def test_lineage_goes_on_without_a_pipe_in_place_of_its_index(pristine: Path, tmp_path: Path) -> None:
    index = _index.current_index(_manifest.signed_entries(pristine))
    assert index is not None
    root = a_copy_with_a_pipe(pristine, tmp_path, str(index["path"]))
    keys = LocalKeyStore(root / "_keys")
    for request_id, tenant in requests(pristine)[::5]:
        scanned = _lineage.lineage(root, committed_files(root), keys, request_id, tenant).to_pylist()
        assert scanned and lineage_at(root, request_id, tenant).to_pylist() == scanned


def test_lineage_names_a_pipe_in_place_of_a_table_file_the_index_points_to(
    pristine: Path, tmp_path: Path
) -> None:
    index = _index.current_index(_manifest.signed_entries(pristine))
    assert index is not None
    live = {e["path"]: e for e in committed_files(pristine)}
    request_id, tenant, path = next(
        (request_id, tenant, found[1][0][1])
        for request_id, tenant in requests(pristine)
        if (found := _index.locate(pristine, index, live, request_id, tenant)) and found[1]
    )
    root = a_copy_with_a_pipe(pristine, tmp_path, str(Path(path).relative_to(pristine.absolute())))
    with pytest.raises(EvidenceError, match="not a regular file"):
        lineage_at(root, request_id, tenant)


def requests(root: Path) -> list[tuple[str, str]]:
    """(request id, tenant) of every request in the store."""
    found: list[tuple[str, str]] = []
    for e in committed_files(root):
        if e["table"] == "requests":
            t = pq.read_table(root / e["path"], columns=["request_id", "tenant_id"])
            found += zip(t.column("request_id").to_pylist(), t.column("tenant_id").to_pylist(), strict=True)
    return sorted(set(found))
