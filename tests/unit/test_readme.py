"""The README is the front door: it must document every evidence table and column that exists, and
its auditor scripts must work on real proofs."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from nexuscore.kernel import signing
from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import SCHEMAS, check_consistency, prove_consistency
from nexuscore.projections._manifest import HEAD, head_message
from tests.factories import POLICY, project, run_history, signing_key

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_evidence_table_and_column_is_documented() -> None:
    missing = []
    for table, schema in SCHEMAS.items():
        if f"| `{table}` |" not in README:
            missing.append(table)
        for name in schema.names:
            if not re.search(rf"`{re.escape(name)}`", README):
                missing.append(f"{table}.{name}")
    assert not missing, f"README does not document: {missing}"


def test_the_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README


def test_a_consistency_proof_checks_out_with_the_readmes_independent_auditor(tmp_path: Path) -> None:
    auditor = re.search(r"<!-- consistency auditor -->\s*```python\n(.*?)```", README, re.S)
    assert auditor, "the README's consistency auditor script is missing"
    script, proof_file, key_file = tmp_path / "audit.py", tmp_path / "proof.json", tmp_path / "signer.pub"
    script.write_text(auditor.group(1))
    public = signing_key().public_key()
    key_file.write_bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    # A ledger signed once half way through its history, then grown to the whole of it.
    events = run_history(POLICY, 40, seed=9)
    root = tmp_path / "evidence"
    project(root, events[: len(events) // 2], flush_every=20)
    old_head = json.loads((root / HEAD).read_bytes())
    project(root, events, flush_every=20)
    proof = prove_consistency(root, old_head)
    assert 0 < proof["old_head"]["size"] < proof["new_head"]["size"] and proof["consistency_path"]
    assert check_consistency(proof, raw) == []

    def audit(p: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        proof_file.write_text(json.dumps(p))
        return subprocess.run(
            [sys.executable, str(script), str(proof_file), str(key_file)], capture_output=True, text=True
        )

    ok = audit(proof)
    assert ok.returncode == 0, ok.stderr
    assert f"only grew: {old_head['size']} -> {proof['new_head']['size']} entries" in ok.stdout
    assert audit(prove_consistency(root, json.loads((root / HEAD).read_bytes()))).returncode == 0

    def forged(change: Any) -> dict[str, Any]:
        copy: dict[str, Any] = json.loads(json.dumps(proof))
        change(copy)
        return copy

    def flip_path(p: dict[str, Any]) -> None:
        first = bytearray.fromhex(p["consistency_path"][0])
        first[0] ^= 0xFF
        p["consistency_path"][0] = first.hex()

    def old_root_altered(p: dict[str, Any]) -> None:
        p["old_head"]["root"] = "ab" * 32  # the signature no longer holds

    def old_head_of_another_log(p: dict[str, Any]) -> None:
        # Signed with the very same key, so only the Merkle check can tell.
        head = {k: v for k, v in p["old_head"].items() if k != "signature"}
        head["root"] = hashlib.sha256(b"another log").hexdigest()
        p["old_head"] = {**head, "signature": signing.sign(signing_key(), head_message(head))}

    def swapped(p: dict[str, Any]) -> None:
        p["old_head"], p["new_head"] = p["new_head"], p["old_head"]

    def truncated(p: dict[str, Any]) -> None:
        p["consistency_path"].pop()

    for change in (flip_path, old_root_altered, old_head_of_another_log, swapped, truncated):
        bad = forged(change)
        assert audit(bad).returncode != 0, change
        assert check_consistency(bad, raw) != [], change

    # A ledger rewritten under the old head: no proof exists, and the log says why.
    rewritten = {**old_head, "root": "cd" * 32}
    with pytest.raises(EvidenceError, match="rewritten since"):
        prove_consistency(root, rewritten)
    with pytest.raises(EvidenceError, match="cannot have grown"):
        prove_consistency(root, {**old_head, "size": proof["new_head"]["size"] + 1})
