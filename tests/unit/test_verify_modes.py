"""What each depth of ``verify`` proves: the default checks the bytes against their seal; ``deep``
also checks that the sealed Merkle roots are those of the rows (what inclusion proofs rely on)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from nexuscore.projections import Manifest, verify
from nexuscore.projections._manifest import canonical
from tests.factories import POLICY, project, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("modes") / "evidence"
    project(root, run_history(POLICY, 40, seed=11), flush_every=120)
    return root


def _seal_a_wrong_root(root: Path) -> str:
    """The key holder's sealer (a bug, or a lie) records a Merkle root that is not the rows': the
    entry is chained and the head signed as any other, and the file's sha256 is right."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    entries = [json.loads(line) for line in lines]
    target = next(i for i, e in enumerate(entries) if e["kind"] == "file" and e["rows"] > 1)
    entries[target]["merkle_root"] = hashlib.sha256(b"not the rows").hexdigest()
    prev = "0" * 64
    out = []
    for e in entries:
        line = canonical({**e, "prev": prev})
        out.append(line)
        prev = hashlib.sha256(line).hexdigest()
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in out))
    Manifest(root, signing_key())  # recovers (the chain holds) and signs the head
    return str(entries[target]["path"])


def test_both_modes_pass_a_pristine_store_and_count_the_same_rows(pristine: Path) -> None:
    default = verify(pristine, PUBLIC, KNOWN, workers=1)
    deep = verify(pristine, PUBLIC, KNOWN, workers=1, deep=True)
    assert default.findings == [] and deep.findings == []
    assert default.rows == deep.rows > 0 and default.files == deep.files


def test_only_deep_finds_a_sealed_root_that_is_not_the_rows(pristine: Path, tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    path = _seal_a_wrong_root(root)
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []
    deep = verify(root, PUBLIC, KNOWN, workers=2, deep=True)
    # The file is then left out of the views, so what its rows accounted for shows as missing too.
    assert ("merkle_mismatch", path) in [(f.kind, f.where) for f in deep.findings]
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
