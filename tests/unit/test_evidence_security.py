"""The evidence store against someone who holds the CLI or write access to the folder: the SQL
sandbox every report runs in, the content keys under verify, the whole folder under verify, and
signing keys kept out of the evidence. Stores are built by the projector's own code path."""

from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import duckdb
import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nexuscore._demo import clear_evidence, demo_dirs
from nexuscore.cli import main
from nexuscore.kernel.errors import EvidenceError, KeyStoreError, NexusError
from nexuscore.projections import EvidenceStore, Finding, LocalKeyStore, committed_files, erase, verify
from nexuscore.projections._manifest import (
    ERASURES,
    LOCK,
    Manifest,
    canonical,
    erasure_message,
    signed_entries,
)
from nexuscore.schemas import Event, InferenceRequested
from tests.factories import POLICY, T0, project, run_history, signing_key

PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def history() -> list[Event]:
    events = run_history(POLICY, 40, seed=11)
    first = next(e for e in events if isinstance(e, InferenceRequested) and e.tenant_id == "acme-bank")
    return [msgspec.structs.replace(e, data_subject="subject-7") if e is first else e for e in events]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "evidence"
    project(root, history, flush_every=100)
    return root


@pytest.fixture
def root(pristine: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "evidence"
    shutil.copytree(pristine, copy)
    return copy


@pytest.fixture
def keys_on_disk(tmp_path: Path) -> tuple[Path, Path]:
    """The signing pair as PEM files, outside the evidence folder."""
    private, public = tmp_path / "signer.pem", tmp_path / "signer.pub"
    private.write_bytes(
        signing_key().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    public.write_bytes(
        PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def snapshot(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    """``nexuscore ARGS`` in this process: (exit code, stdout, stderr)."""
    for name in list(os.environ):
        if name.startswith("NEXUSCORE_"):
            monkeypatch.delenv(name)
    monkeypatch.setattr(sys, "argv", ["nexuscore", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def committed_end(root: Path, topic: str, partition: int) -> int:
    """Where the last checkpoint left a partition: the next flush's first offset."""
    entries = [json.loads(line) for line in (root / "manifest.jsonl").read_bytes().splitlines()]
    return max(
        int(p["end"])
        for e in entries
        if e["kind"] == "checkpoint"
        for p in e["partitions"]
        if (p["topic"], p["partition"]) == (topic, partition)
    )


def fatal(findings: list[Finding]) -> set[str]:
    return {f.kind for f in findings if f.fatal}


# --- 1. the SQL sandbox ---------------------------------------------------------------------------

ATTACKS = [
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('{root}/_keys/master.key')",
    "SELECT * FROM read_text('{root}/_keys/keystore.json')",
    "SELECT * FROM read_json('{root}/_keys/keystore.json')",
    "SELECT * FROM read_text('{private}')",
    "SELECT * FROM read_parquet('{unlisted}')",
    "SELECT * FROM glob('{root}/**')",
    "SELECT * FROM 'https://example.com/evidence.parquet'",
    "COPY (SELECT 1 AS x) TO '{sealed}' (FORMAT parquet, USE_TMP_FILE false)",
    "COPY (SELECT 1 AS x) TO '{sealed}' (FORMAT parquet)",
    "COPY (SELECT '{{}}' AS x) TO '{root}/_keys/keystore.json' (FORMAT csv, HEADER false, QUOTE '')",
    "COPY (SELECT 1 AS a, 2 AS b) TO '{root}/region=eu' (FORMAT parquet, PARTITION_BY (a), OVERWRITE)",
    "COPY (SELECT * FROM requests) TO '{outside}'",
    "EXPORT DATABASE '{outside}'",
    "SELECT 1; COPY (SELECT 1 AS x) TO '{outside}'",
    "SELECT 1; SELECT 2",
    "ATTACH '{sealed}' AS sealed",
    "ATTACH '{outside}' AS elsewhere",
    "SET enable_external_access = true",
    "RESET allowed_paths",
    "SET allowed_directories = ['/']",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CALL pragma_version()",
    "PRAGMA enable_profiling",
    "CREATE TABLE t AS SELECT 1",
    "",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_evidence_sql_reads_the_views_and_nothing_else(root: Path, tmp_path: Path, attack: str) -> None:
    (tmp_path / "private.pem").write_text("-----BEGIN PRIVATE KEY-----\nsecret\n")
    sealed = root / committed_files(root)[0]["path"]
    unlisted = sealed.with_name("unlisted.parquet")
    shutil.copyfile(sealed, unlisted)
    sql = attack.format(
        root=root,
        sealed=sealed,
        unlisted=unlisted,
        private=tmp_path / "private.pem",
        outside=tmp_path / "out",
    )
    before = snapshot(root)
    with EvidenceStore(root) as store, pytest.raises(EvidenceError):
        store.query(sql)
    assert snapshot(root) == before
    assert not (tmp_path / "out").exists()


def test_the_views_still_read_the_sealed_files(root: Path, history: list[Event]) -> None:
    with EvidenceStore(root) as store:
        n = store.query("SELECT count(*) AS n FROM requests").to_pylist()[0]["n"]
        assert n == sum(isinstance(e, InferenceRequested) for e in history)
        assert store.query("FROM terminal_states SELECT count(*) AS n;").to_pylist()[0]["n"] == n
        # A sealed file is the views' own data: reading it directly is no escape.
        sealed = root / committed_files(root)[0]["path"]
        assert store.query(f"SELECT count(*) AS n FROM read_parquet('{sealed}')").num_rows == 1


def test_every_report_runs_on_the_locked_connection(root: Path) -> None:
    # who-routed-what, spend, residency, lineage, report, summary, review, policy history: all run
    # on EvidenceStore.con. Even code that reaches for it directly cannot escape.
    with EvidenceStore(root) as store:
        for sql in (
            "SELECT * FROM read_text('/etc/passwd')",
            f"SELECT * FROM read_blob('{root}/_keys/master.key')",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            "LOAD httpfs",
        ):
            with pytest.raises(duckdb.Error):
                store.con.execute(sql)
        assert store.who_routed_what().num_rows > 0
        assert store.spend().num_rows > 0


def test_a_manifest_entry_cannot_point_the_views_at_the_keys(root: Path) -> None:
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    i = next(i for i, line in enumerate(lines) if json.loads(line)["kind"] == "file")
    entry = json.loads(lines[i])
    entry["path"] = f"region={entry['region']}/{entry['table']}/../../_keys/keystore.json"
    lines[i] = canonical(entry)
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    with pytest.raises(EvidenceError, match="not a file of its table"):
        EvidenceStore(root)


def test_the_cli_refuses_a_write_with_one_line_and_exit_2(
    root: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    keystore = root / "_keys" / "keystore.json"
    before = keystore.read_bytes()
    attack = f"COPY (SELECT '{{}}' AS x) TO '{keystore}' (FORMAT csv, HEADER false, QUOTE '')"
    code, _, err = cli(monkeypatch, capsys, "evidence", "sql", attack, "-e", str(root))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "read-only" in err
    assert keystore.read_bytes() == before
    code, _, err = cli(
        monkeypatch, capsys, "evidence", "sql", "SELECT * FROM read_text('/etc/passwd')", "-e", str(root)
    )
    assert code == 2 and len(err.strip().splitlines()) == 1 and "root:" not in err
    code, out, _ = cli(
        monkeypatch,
        capsys,
        "evidence",
        "sql",
        "SELECT count(*) AS n FROM requests",
        "-e",
        str(root),
        "-f",
        "json",
    )
    assert code == 0 and '"n"' in out


# --- 2. the content keys under verify -------------------------------------------------------------


def test_a_keystore_overwritten_with_nothing_fails_verify_and_lineage_says_key_missing(
    root: Path, history: list[Event]
) -> None:
    (root / "_keys" / "keystore.json").write_text("{}")
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok
    assert fatal(report.findings) == {"key_missing"}
    request = next(e for e in history if isinstance(e, InferenceRequested))
    with EvidenceStore(root) as store:
        detail = store.lineage(request.request_id, request.tenant_id).to_pylist()[0]["detail"]
    assert "prompt: [key missing" in detail


def _edit_keystore(root: Path, change: str) -> str:
    path = root / "_keys" / "keystore.json"
    doc = json.loads(path.read_text())
    key_id = sorted(doc["keys"])[0]
    entry = doc["keys"].pop(key_id)
    if change == "hide_as_erased":  # claim an erasure nobody signed
        doc["erased"][key_id] = {
            "tenant": entry["tenant"],
            "subject": entry["subject"],
            "erased_at": "x",
            "reason": "y",
        }
    path.write_text(json.dumps(doc))
    return str(key_id)


@pytest.mark.parametrize("change", ["remove", "hide_as_erased"])
def test_a_key_lost_other_than_by_erase_is_named(root: Path, change: str) -> None:
    key_id = _edit_keystore(root, change)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    missing = [f for f in report.findings if f.kind == "key_missing"]
    assert missing and key_id in missing[0].detail and not report.ok


def test_erasing_through_the_keystore_alone_is_not_an_erasure(root: Path) -> None:
    assert LocalKeyStore(root / "_keys").erase("acme-bank", None, T0, "quietly") != []
    assert "key_missing" in fatal(verify(root, PUBLIC, KNOWN, workers=1).findings)


def test_a_signed_erasure_verifies_and_a_forged_one_does_not(root: Path) -> None:
    keys = LocalKeyStore(root / "_keys")
    erased = erase(root, keys, signing_key(), "acme-bank", "subject-7", T0, "art. 17 request")
    assert erased
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []
    record = json.loads((root / ERASURES).read_bytes().splitlines()[0])
    assert (
        record["key_ids"] == sorted(erased)
        and record["key_id"] == verify(root, PUBLIC, KNOWN, workers=1).head["key_id"]
    )

    # Someone destroys globex's key and appends a record signed with a key of their own.
    victim = LocalKeyStore(root / "_keys").erase("globex-insurance", None, T0, "cover-up")
    forger = Ed25519PrivateKey.generate()
    forged = {
        "tenant": "globex-insurance",
        "subject": None,
        "key_ids": victim,
        "erased_at": T0.isoformat(),
        "reason": "x",
    }
    forged["key_id"] = "whatever"
    forged["signature"] = base64.b64encode(forger.sign(erasure_message(forged))).decode()
    with (root / ERASURES).open("ab") as f:
        f.write(canonical(forged) + b"\n")
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert fatal(report.findings) == {"erasure_forged", "key_missing"}
    assert victim[0] in next(f.detail for f in report.findings if f.kind == "key_missing")


def test_an_altered_erasure_record_is_not_accepted(root: Path) -> None:
    erase(root, LocalKeyStore(root / "_keys"), signing_key(), "acme-bank", "subject-7", T0, "art. 17")
    other = LocalKeyStore(root / "_keys").erase("initech-payments", None, T0, "cover-up")
    path = root / ERASURES
    record = json.loads(path.read_bytes())
    record["key_ids"] = sorted(record["key_ids"] + other)
    path.write_bytes(canonical(record) + b"\n")
    findings = fatal(verify(root, PUBLIC, KNOWN, workers=1).findings)
    # (and the sealed erasure ledger no longer begins with the record it sealed)
    assert findings == {"erasure_forged", "key_missing", "erasures_altered"}


def test_erase_refuses_a_key_that_does_not_sign_this_evidence(root: Path) -> None:
    keys = LocalKeyStore(root / "_keys")
    with pytest.raises(KeyStoreError, match="does not sign this evidence"):
        erase(root, keys, Ed25519PrivateKey.generate(), "acme-bank", None, T0, "wrong key")
    assert not (root / ERASURES).exists()
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_a_replaced_master_key_or_swapped_data_key_is_named(root: Path) -> None:
    path = root / "_keys" / "keystore.json"
    doc = json.loads(path.read_text())
    key_id = sorted(doc["keys"])[0]
    # Same id, other key material, wrapped properly under the real master key.
    master = AESGCM((root / "_keys" / "master.key").read_bytes())
    nonce = os.urandom(12)
    wrapped = nonce + master.encrypt(nonce, AESGCM.generate_key(bit_length=256), key_id.encode())
    doc["keys"][key_id]["wrapped"] = base64.b64encode(wrapped).decode()
    path.write_text(json.dumps(doc))
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert fatal(report.findings) == {"key_unusable"} and key_id in report.findings[0].detail
    (root / "_keys" / "master.key").write_bytes(os.urandom(32))
    assert fatal(verify(root, PUBLIC, KNOWN, workers=1).findings) == {"key_unusable"}
    (root / "_keys" / "master.key").unlink()
    assert fatal(verify(root, PUBLIC, KNOWN, workers=1).findings) == {"key_unusable"}
    assert not (root / "_keys" / "master.key").exists()  # verify writes nothing


def test_the_cli_erase_signs_and_verify_catches_a_wiped_keystore(
    root: Path,
    keys_on_disk: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    private, public = keys_on_disk
    args = ["evidence", "erase", "--tenant", "acme-bank", "--reason", "offboarded", "--yes", "-e", str(root)]
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "no signing key" in err
    code, out, _ = cli(monkeypatch, capsys, *args, "--signing-key", str(private))
    assert code == 0 and "erased" in out
    code, out, _ = cli(
        monkeypatch, capsys, "evidence", "verify", "-e", str(root), "--public-key", str(public)
    )
    assert code == 0, out
    (root / "_keys" / "keystore.json").write_text("{}")
    code, out, _ = cli(
        monkeypatch, capsys, "evidence", "verify", "-e", str(root), "--public-key", str(public)
    )
    assert code == 1 and "key_missing" in out


# --- 3. the whole folder under verify -------------------------------------------------------------


def test_a_missing_file_is_a_named_finding_and_exit_1(
    root: Path,
    keys_on_disk: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gone = next(e for e in committed_files(root) if e["table"] == "outcomes")
    (root / gone["path"]).unlink()
    code, out, err = cli(
        monkeypatch, capsys, "evidence", "verify", "-e", str(root), "--public-key", str(keys_on_disk[1])
    )
    assert code == 1, err
    assert "file_missing" in out and gone["path"] in out


@pytest.mark.parametrize(
    "stray",
    [
        "region=eu/requests/evil.parquet",
        "region=eu/requests/notes.txt",
        "region=eu/notes.txt",
        "region=eu/requests/deeper/x.parquet",
        "region=mars/requests/nexus.requests-p0-000000000000-000000000001.parquet",
        "region=eu/requests/nexus.requests-p0-000000000000-000000000001.parquet",  # offsets committed
    ],
)
def test_a_file_among_the_tables_that_no_entry_names_fails_verify(root: Path, stray: str) -> None:
    path = root / stray
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / committed_files(root)[0]["path"], path)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert [(f.kind, f.where) for f in report.findings if f.fatal] == [("unlisted_file", stray)]


def test_a_file_elsewhere_in_the_folder_is_named_and_a_flush_in_progress_tolerated(root: Path) -> None:
    (root / "stolen.csv").write_text("prompt\n")
    (root / "_keys" / "backup.json").write_text("{}")  # the keystore's folder is the keystore's
    # The next flush of nexus.requests[0] starts where the last checkpoint ended.
    end = committed_end(root, "nexus.requests", 0)
    flushing = f"region=eu/requests/nexus.requests-p0-{end:012d}-{end + 3:012d}.parquet"
    (root / flushing).write_bytes(b"being written")
    (root / f"region=eu/requests/.nexus.requests-p0-{end:012d}-{end + 5:012d}.parquet.tmp").write_bytes(b"..")
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.ok
    kinds = {(f.kind, f.where) for f in report.findings}
    assert ("foreign_file", "stolen.csv") in kinds
    assert ("unflushed_file", flushing) in kinds
    assert len(report.findings) == 3


# --- 4. signing keys outside the evidence ----------------------------------------------------------


def test_the_demo_keeps_its_keys_and_logs_beside_the_evidence_not_in_it(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    keys, logs = demo_dirs(evidence)
    assert keys == tmp_path / "evidence.keys" and logs == tmp_path / "evidence.logs"
    for inside in (evidence, evidence / "_demo_keys", evidence / "a" / "b"):
        with pytest.raises(NexusError, match="inside the evidence folder"):
            demo_dirs(evidence, inside)
    assert demo_dirs(evidence, tmp_path / "elsewhere")[0] == tmp_path / "elsewhere"
    # An older demo's keys and logs inside the folder are cleared with its evidence.
    for legacy in ("_demo_keys/evidence-signing.pem", "_logs/projector.log", "erasures.jsonl"):
        (evidence / legacy).parent.mkdir(parents=True, exist_ok=True)
        (evidence / legacy).write_text("x")
    clear_evidence(evidence)
    assert list(evidence.iterdir()) == []


def test_a_key_named_by_an_erasure_record_stays_erased_and_the_next_write_gets_a_new_key(
    tmp_path: Path,
) -> None:
    """The record is written before the keys are destroyed: cut short there (or with the keystore
    put back from a backup), the key is still in the keystore, but the record rules. New content of
    the tenant goes under a new key, so the projector goes on."""
    root = tmp_path / "evidence"
    root.mkdir()
    keys = LocalKeyStore(root / "_keys")
    old, _ = keys.data_key("acme-bank", None, T0)
    line = {
        "tenant": "acme-bank",
        "subject": None,
        "key_ids": [old],
        "erased_at": T0.isoformat(),
        "reason": "r",
    }
    (root / ERASURES).write_bytes(canonical(line) + b"\n")
    again = LocalKeyStore(root / "_keys")
    assert again.lookup(old) is None and again.erased_at(old) == T0.isoformat()
    new, key = again.data_key("acme-bank", None, T0)
    assert new != old and again.lookup(new) == key
    # A keystore kept outside the evidence folder follows the folder's erasure ledger too.
    shutil.copytree(root / "_keys", tmp_path / "elsewhere")
    assert LocalKeyStore(tmp_path / "elsewhere", erasures_from=root).lookup(old) is None
    assert LocalKeyStore(tmp_path / "elsewhere").lookup(old) is not None  # (no ledger beside it)


def test_verify_since_a_kept_head_passes_a_store_that_grew_and_refuses_a_bad_head_in_one_line(
    root: Path,
    keys_on_disk: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kept = tmp_path / "kept.head.json"
    shutil.copy(root / "manifest.head.json", kept)
    verify_args = ["evidence", "verify", "-e", str(root), "--public-key", str(keys_on_disk[1])]
    code, out, err = cli(monkeypatch, capsys, *verify_args, "--since-head", str(kept))
    assert code == 0, out + err
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "x").write_text("{")
    for bad, says in [
        (tmp_path / "missing.json", "not a file"),
        (tmp_path / "pipe", "not a file"),
        (tmp_path / "x", "not JSON"),
    ]:
        code, _, err = cli(monkeypatch, capsys, *verify_args, "--since-head", str(bad))
        assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err


# --- the erasure ledger, sealed in the manifest ------------------------------------------------


def test_an_erasure_is_sealed_in_the_manifest_and_deleting_its_record_is_named(root: Path) -> None:
    """With a keystore from before the erasure put back and the erasure ledger deleted, the erased
    content was readable again and ``verify`` found nothing. The erasure's own commit seals the
    ledger's records (count and sha256), so ``verify`` now names its loss, its cut or a change."""
    erase(root, LocalKeyStore(root / "_keys"), signing_key(), "acme-bank", "subject-7", T0, "art. 17")
    assert signed_entries(root)[-1]["erasures"]["lines"] == 1
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []
    kept = (root / ERASURES).read_bytes()
    (root / ERASURES).unlink()
    assert "erasures_altered" in fatal(verify(root, PUBLIC, KNOWN, workers=1).findings)
    (root / ERASURES).write_bytes(kept.replace(b"art. 17", b"art. 18"))
    assert "erasures_altered" in fatal(verify(root, PUBLIC, KNOWN, workers=1).findings)
    (root / ERASURES).write_bytes(kept)
    erase(root, LocalKeyStore(root / "_keys"), signing_key(), "globex-insurance", None, T0, "art. 17")
    assert signed_entries(root)[-1]["erasures"]["lines"] == 2  # a later record extends the seal
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_while_a_projector_writes_an_erasure_is_sealed_by_its_next_commit(root: Path) -> None:
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running projector holds it
    try:
        before = len(signed_entries(root))
        erase(root, LocalKeyStore(root / "_keys"), signing_key(), "acme-bank", None, T0, "art. 17")
        assert len(signed_entries(root)) == before  # the ledger has one writer: not erase
        Manifest(root, signing_key()).commit([], T0)  # the projector's next flush
    finally:
        os.close(fd)
    assert signed_entries(root)[-1]["erasures"]["lines"] == 1
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_a_cut_erasure_ledger_is_not_sealed_again_by_the_next_commit(root: Path) -> None:
    """Cut back to its first record, the erasure ledger would be sealed as it is by the next
    commit (a projector's flush, a compaction, another erasure), and ``verify`` would see a ledger
    that matches its last seal. A commit seals it only if it begins with what was sealed before."""
    for tenant in ("acme-bank", "globex-insurance"):
        erase(root, LocalKeyStore(root / "_keys"), signing_key(), tenant, None, T0, "art. 17")
    assert signed_entries(root)[-1]["erasures"]["lines"] == 2
    first = (root / ERASURES).read_bytes().split(b"\n")[0] + b"\n"
    (root / ERASURES).write_bytes(first)
    Manifest(root, signing_key()).commit([], T0)  # the next commit
    assert signed_entries(root)[-1]["erasures"]["lines"] == 2  # the earlier seal, kept
    assert "erasures_altered" in fatal(verify(root, PUBLIC, KNOWN, workers=1).findings)


def test_a_record_being_appended_is_not_sealed_half_written(root: Path) -> None:
    erase(root, LocalKeyStore(root / "_keys"), signing_key(), "acme-bank", None, T0, "art. 17")
    with (root / ERASURES).open("ab") as f:
        f.write(b'{"tenant":"globex-insurance"')  # an erasure writing its record right now
    Manifest(root, signing_key()).commit([], T0)
    assert signed_entries(root)[-1]["erasures"]["lines"] == 1
