"""`nexuscore evidence prove --consistency OLD_HEAD`: the ledger only grew, checked with the key."""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from typer.testing import CliRunner

from nexuscore.cli import app
from nexuscore.kernel.errors import NexusError
from tests.factories import POLICY, project, run_history, signing_key

HEAD = "manifest.head.json"


def test_prove_consistency_from_the_cli_holds_and_a_forged_old_head_is_refused(tmp_path: Path) -> None:
    key = tmp_path / "signer.pub"
    key.write_bytes(
        signing_key()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    events, root = run_history(POLICY, 30, seed=4), tmp_path / "evidence"
    project(root, events[: len(events) // 2], flush_every=20)
    old = tmp_path / "old-head.json"
    old.write_bytes((root / HEAD).read_bytes())
    project(root, events, flush_every=20)
    runner = CliRunner()
    ok = runner.invoke(
        app, ["evidence", "prove", "--consistency", str(old), "-e", str(root), "--public-key", str(key)]
    )
    assert ok.exit_code == 0, ok.output
    assert json.loads(ok.stdout)["new_head"]["size"] > json.loads(old.read_text())["size"]
    forged = json.loads(old.read_text())
    forged["root"] = "00" * 32
    old.write_text(json.dumps(forged))
    bad = runner.invoke(
        app, ["evidence", "prove", "--consistency", str(old), "-e", str(root), "--public-key", str(key)]
    )
    # main() prints a NexusError as one line and exits 2; the runner shows the error itself.
    assert isinstance(bad.exception, NexusError) and "rewritten since" in str(bad.exception)
    both = runner.invoke(app, ["evidence", "prove", "r1", "--consistency", str(old), "-e", str(root)])
    assert isinstance(both.exception, NexusError) and "one of the two" in str(both.exception)
