"""The evidence store without a broker: sealing, verification, tampering, proofs, erasure, regions,
and recovery of the projector, all through the projector's own code path (tests.factories.project)."""

from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import (
    SCHEMAS,
    EvidenceStore,
    LocalKeyStore,
    SealedWriter,
    check_proof,
    committed_files,
    erase,
    prove,
    verify,
)
from nexuscore.projections._manifest import canonical, head_message
from nexuscore.projections._seal import leaf_sql
from nexuscore.schemas import EscalationResolved, Event, InferenceRequested, OutcomeRecorded, RequestDecided
from tests.factories import POLICY, T0, project, run_history, signing_key

README = Path(__file__).resolve().parents[2] / "README.md"
PUBLIC = signing_key().public_key()
KNOWN = {POLICY.digest}


@pytest.fixture(scope="module")
def history() -> list[Event]:
    events = run_history(POLICY, 80, seed=5)
    # One request names a data subject, so that subject erasure has something to erase.
    first = next(e for e in events if isinstance(e, InferenceRequested) and e.tenant_id == "acme-bank")
    return [msgspec.structs.replace(e, data_subject="subject-42") if e is first else e for e in events]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory, history: list[Event]) -> Path:
    root = tmp_path_factory.mktemp("pristine") / "evidence"
    project(root, history, flush_every=160)
    return root


def copy(pristine: Path, tmp_path: Path) -> Path:
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    return root


def rows_of(root: Path) -> dict[str, list[tuple[object, ...]]]:
    with EvidenceStore(root) as store:
        return {
            t: sorted(tuple(r.values()) for r in store.query(f"SELECT * FROM {t}").to_pylist())  # noqa: S608
            for t in SCHEMAS
        }


def test_a_projected_history_verifies_complete_and_unaltered(pristine: Path, history: list[Event]) -> None:
    report = verify(pristine, PUBLIC, KNOWN, workers=1)
    assert report.findings == []
    assert report.ok and report.rows == len(history)
    assert report.requests == sum(isinstance(e, InferenceRequested) for e in history)
    assert report.files == len(committed_files(pristine)) > 1


def test_the_signature_is_checked_against_the_trusted_key_not_the_one_in_the_head(pristine: Path) -> None:
    stranger = Ed25519PrivateKey.generate().public_key()
    report = verify(pristine, stranger, KNOWN, workers=1)
    assert [f.kind for f in report.findings] == ["head_signature"]


def _flip_byte(root: Path, rng: random.Random) -> str:
    path = rng.choice(sorted(root.glob("region=*/*/*.parquet")))
    data = bytearray(path.read_bytes())
    data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return "file_altered"


def _rewrite(root: Path, rng: random.Random, change: str) -> str:
    candidates = [p for p in sorted(root.glob("region=*/*/*.parquet")) if pq.read_metadata(p).num_rows > 1]
    path = rng.choice(candidates)
    table = pq.read_table(path)
    if change == "delete":
        i = rng.randrange(table.num_rows)
        table = pa.concat_tables([table.slice(0, i), table.slice(i + 1)])
    else:
        order = list(range(table.num_rows))
        while order == sorted(order):
            rng.shuffle(order)
        table = table.take(order)
    pq.write_table(table, path, compression="zstd")
    return "file_altered"


def _drop_file(root: Path, rng: random.Random) -> str:
    rng.choice(sorted(root.glob("region=*/*/*.parquet"))).unlink()
    return "file_missing"


def _reseal_entry(root: Path, rng: random.Random) -> str:
    """A careful forger: deletes a row, then fixes the file's manifest entry to match."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    files = [
        i
        for i, line in enumerate(lines)
        if json.loads(line)["kind"] == "file" and json.loads(line)["rows"] > 1
    ]
    i = rng.choice(files)
    entry = json.loads(lines[i])
    path = root / entry["path"]
    table = pq.read_table(path).slice(1)
    pq.write_table(table, path, compression="zstd")
    import hashlib

    from nexuscore.projections._seal import table_root

    entry.update(
        rows=table.num_rows,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        merkle_root=table_root(__import__("duckdb").connect(), table).hex(),
    )
    lines[i] = canonical(entry)
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    return "chain_broken" if i + 1 < len(lines) else "head_mismatch"


def _swap_entries(root: Path, rng: random.Random) -> str:
    lines = (root / "manifest.jsonl").read_bytes().splitlines()
    i = rng.randrange(len(lines) - 1)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    (root / "manifest.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    return "chain_broken"


def _resign_all(root: Path, rng: random.Random) -> str:
    """A forger with write access to everything but the private key: rebuilds the whole ledger."""
    lines = (root / "manifest.jsonl").read_bytes().splitlines()[:-2]
    (root / "manifest.jsonl").write_bytes(
        b"".join(line + b"\n" for line in lines[: rng.randrange(1, len(lines))])
    )
    from nexuscore.projections._manifest import Manifest

    # (Our Manifest refuses a ledger whose head another key signed: the forger removes the head first.)
    (root / "manifest.head.json").unlink()
    Manifest(root, Ed25519PrivateKey.generate())  # recovers to its last checkpoint and signs the head
    return "head_signature"


TAMPERINGS = [
    _flip_byte,
    lambda r, g: _rewrite(r, g, "delete"),
    lambda r, g: _rewrite(r, g, "reorder"),
    _drop_file,
    _reseal_entry,
    _swap_entries,
    _resign_all,
]


@pytest.mark.parametrize("seed", range(21))
def test_every_tampering_is_detected(pristine: Path, tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    root = copy(pristine, tmp_path)
    tamper = TAMPERINGS[seed % len(TAMPERINGS)]
    expected = tamper(root, rng)
    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert not report.ok
    assert expected in {f.kind for f in report.findings}, report.findings


def test_gaps_are_named_precisely(tmp_path: Path, history: list[Event]) -> None:
    lost = next(e for e in history if isinstance(e, OutcomeRecorded))
    root = tmp_path / "evidence"
    project(root, [e for e in history if e is not lost])
    report = verify(root, PUBLIC, set(), workers=1)
    found = {f.kind: f for f in report.findings}
    assert lost.request_id in found["no_terminal_state"].detail
    assert POLICY.digest in found["unknown_policy"].detail
    # A checkpoint that starts past the partition's last end leaves offsets unaccounted for.
    writer = SealedWriter(root, signing_key())
    end = writer.manifest.positions[("nexus.outcomes", 0)]
    writer.commit([{"topic": "nexus.outcomes", "partition": 0, "start": end + 5, "end": end + 6}], T0)
    gaps = [f for f in verify(root, PUBLIC, KNOWN, workers=1).findings if f.kind == "offset_gap"]
    assert [(g.where, g.detail.split(" are ")[0]) for g in gaps] == [
        ("nexus.outcomes[0]", f"offsets {end}..{end + 4}")
    ]


def test_an_outcome_of_a_request_never_dispatched_is_named(tmp_path: Path, history: list[Event]) -> None:
    outcome = next(e for e in history if isinstance(e, OutcomeRecorded))
    decided = next(e for e in history if isinstance(e, RequestDecided) and e.request_id == outcome.request_id)
    root = tmp_path / "evidence"
    project(root, [e for e in history if e is not decided])
    found = {f.kind: f for f in verify(root, PUBLIC, KNOWN, workers=1).findings}
    assert found["outcome_without_decision"].detail == f"1: {outcome.tenant_id}/{outcome.request_id}"


def test_duplicate_events_are_named_with_their_counts() -> None:
    from nexuscore.projections._verify import _duplicates

    con = duckdb.connect()
    con.register(
        "decisions",
        pa.table({"tenant_id": ["a", "a", "b", "a", "b", "a"], "event_id": ["1", "2", "1", "1", "1", "1"]}),
    )
    assert _duplicates(con, "decisions") == [("a/1", 3), ("b/1", 2)]


def test_a_crash_mid_flush_is_undone_and_the_projection_is_exactly_once(
    pristine: Path, tmp_path: Path, history: list[Event]
) -> None:
    root = tmp_path / "evidence"
    # The same content keys as the undisturbed run, so that even the ciphertexts must match.
    shutil.copytree(pristine / "_keys", root / "_keys")
    project(root, history[:50], flush_every=20)
    # A flush cut short: files written, their entries half-appended, no checkpoint.
    writer = SealedWriter(root, signing_key())
    for name in ("a", "b"):
        sample = pq.read_table(next(root.glob("region=*/requests/*.parquet")))
        writer.write(sample, table="requests", region="eu", topic="nexus.requests", partition=0,
                     first_offset=900, last_offset=901 if name == "a" else 902)  # fmt: skip
    with (root / "manifest.jsonl").open("ab") as f:
        f.write(b'{"kind":"file","path":"region=eu/requests/half')  # the torn last line
    # The restarted projector resumes from its checkpoints; re-emitted events come as duplicates.
    replayed = history + [e for e in history[60:75] if not isinstance(e, InferenceRequested)]
    project(root, replayed, flush_every=15)
    assert not list(root.glob("region=*/requests/*000900-*.parquet"))
    assert rows_of(root) == rows_of(pristine)
    assert verify(root, PUBLIC, KNOWN, workers=1).ok


def test_evidence_is_filed_under_the_tenants_home_region(pristine: Path) -> None:
    home = {t.id: t.home_region for t in POLICY.tenants}
    with EvidenceStore(pristine) as store:
        for table in SCHEMAS:
            for r in store.query(f"SELECT DISTINCT tenant_id, data_region FROM {table}").to_pylist():  # noqa: S608
                assert r["data_region"] == home.get(r["tenant_id"], "unassigned")
    for entry in committed_files(pristine):
        assert entry["path"].startswith(f"region={entry['region']}/{entry['table']}/")
    eu_tenants = {t for t, r in home.items() if r == "eu"}
    eu_files = [e["path"] for e in committed_files(pristine) if e["region"] == "eu"]
    assert eu_files
    for path in eu_files:
        assert set(pq.read_table(pristine / path, columns=["tenant_id"]).column(0).to_pylist()) <= eu_tenants


def test_content_is_encrypted_at_rest_and_erasure_leaves_the_seals_intact(
    pristine: Path, tmp_path: Path, history: list[Event]
) -> None:
    root = copy(pristine, tmp_path)
    requests = [e for e in history if isinstance(e, InferenceRequested)]
    subject_req = next(r for r in requests if r.data_subject)
    acme_other = next(r for r in requests if r.tenant_id == "acme-bank" and not r.data_subject)
    globex = next(r for r in requests if r.tenant_id == "globex-insurance")
    for path in root.glob("region=*/requests/*.parquet"):
        assert subject_req.prompt.encode() not in path.read_bytes()

    def prompt_of(request_id: str) -> str:
        with EvidenceStore(root) as store:
            detail = store.lineage(request_id).to_pylist()[0]["detail"]
        return str(detail.split("prompt: ", 1)[1])

    assert prompt_of(subject_req.request_id) == subject_req.prompt
    keys = LocalKeyStore(root / "_keys")
    assert erase(root, keys, signing_key(), "acme-bank", "subject-42", T0, "art. 17 request") != []
    assert prompt_of(subject_req.request_id).startswith("[erased")
    assert prompt_of(acme_other.request_id) == acme_other.prompt
    erase(root, keys, signing_key(), "acme-bank", None, T0, "tenant offboarded")
    assert prompt_of(acme_other.request_id).startswith("[erased")
    assert prompt_of(globex.request_id) == globex.prompt
    assert verify(root, PUBLIC, KNOWN, workers=1).findings == []


def test_a_proof_checks_out_with_the_readmes_independent_auditor(
    pristine: Path, tmp_path: Path, history: list[Event]
) -> None:
    rid = next(e for e in history if isinstance(e, OutcomeRecorded)).request_id
    proof = prove(pristine, rid)
    assert {ev["table"] for ev in proof["events"]} >= {"requests", "decisions", "outcomes", "settlements"}
    raw = PUBLIC.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert check_proof(proof, raw) == []
    assert proof["signed_message"] == head_message(proof["head"]).decode()

    auditor = re.search(r"<!-- auditor -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert auditor, "the README's auditor script is missing"
    script, proof_file, key_file = tmp_path / "audit.py", tmp_path / "proof.json", tmp_path / "signer.pub"
    script.write_text(auditor.group(1))
    key_file.write_bytes(
        PUBLIC.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert len([line for line in auditor.group(1).splitlines() if line.strip()]) <= 30

    def audit(p: dict[str, object]) -> subprocess.CompletedProcess[str]:
        proof_file.write_text(json.dumps(p))
        return subprocess.run(
            [sys.executable, str(script), str(proof_file), str(key_file)], capture_output=True, text=True
        )

    ok = audit(proof)
    assert ok.returncode == 0, ok.stderr
    assert f"of {rid} proven" in ok.stdout
    forged = json.loads(json.dumps(proof))
    forged["events"][0]["leaf"] = (
        forged["events"][0]["leaf"].replace('"acme', '"evil', 1).replace("1", "2", 1)
    )
    assert audit(forged).returncode != 0
    assert check_proof(forged, raw) != []
    forged_head = json.loads(json.dumps(proof))
    forged_head["head"]["size"] += 1
    assert audit(forged_head).returncode != 0


def test_the_canonical_row_bytes_are_pinned(tmp_path: Path) -> None:
    # If a DuckDB upgrade changed these bytes, every stored seal would stop verifying.
    import duckdb

    con = duckdb.connect()
    row = pa.Table.from_pylist(
        [
            {
                "event_id": "e1", "request_id": "r1", "tenant_id": "t", "occurred_at": T0, "producer": "w",
                "causation_id": "", "trace_id": "", "policy_digest": "", "attempt": 2, "deployment_id": "eu-mid-1",
                "region": "eu", "status": "error", "http_status": None, "latency_ms": 0.1, "retryable": True,
                "error": 'timeout "é"', "data_region": "eu", "src_topic": "nexus.attempts", "src_partition": 1,
                "src_offset": 7,
            }
        ],
        schema=SCHEMAS["attempts"],
    )  # fmt: skip
    con.register("r", row)
    assert con.sql(f"SELECT {leaf_sql(row.schema)} FROM r").fetchall()[0][0] == (
        '["e1","r1","t",1795597200000000,"w","","","",2,"eu-mid-1","eu","error",null,0.1,true,'
        '"timeout \\"é\\"","eu","nexus.attempts",1,7]'
    )
    blob = pa.Table.from_pylist([{"b": b"\x00\xff"}], schema=pa.schema([("b", pa.binary())]))
    con.register("b", blob)
    assert con.sql(f"SELECT {leaf_sql(blob.schema)} FROM b").fetchall()[0][0] == '["AP8="]'
    assert base64.b64decode("AP8=") == b"\x00\xff"


def test_files_written_before_a_column_existed_read_with_that_column_as_nulls(
    pristine: Path, tmp_path: Path
) -> None:
    # An older version wrote decisions without the columns added since (review_deadline, ...).
    root = tmp_path / "evidence"
    shutil.copytree(pristine, root)
    added = ["review_deadline", "latency_observations", "confidence"]
    decision_files = sorted(root.glob("region=*/decisions/*.parquet"))
    for f in decision_files:
        table = pq.read_table(f)
        pq.write_table(table.drop_columns(added), f)
    with EvidenceStore(root) as store:
        rows = store.query("SELECT verdict, review_deadline, confidence FROM decisions").to_pylist()
        assert rows and all(r["review_deadline"] is None and r["confidence"] is None for r in rows)
        assert store.terminal_summary()["requests"] > 0  # the derived views still bind
    # Mixed: one file of today's shape among old ones.
    shutil.copyfile(next(pristine.glob("region=*/decisions/*.parquet")), decision_files[0])
    with EvidenceStore(root) as store:
        confidences = store.query("SELECT confidence FROM decisions").column("confidence").to_pylist()
        assert any(c is not None for c in confidences) and any(c is None for c in confidences)


def _escalated(events: list[Event], tenant: str, resolution: str) -> str:
    return next(
        e.request_id
        for e in events
        if isinstance(e, EscalationResolved) and e.tenant_id == tenant and e.resolution == resolution
    )


def test_two_tenants_may_use_the_same_request_id(tmp_path: Path, history: list[Event]) -> None:
    # globex's escalation was approved and answered; initech's was denied. Request ids are unique
    # per tenant only, so initech may well have picked globex's id (the tenants hash to different
    # partitions, as they may).
    shared = _escalated(history, "globex-insurance", "dispatched")
    renamed = _escalated(history, "initech-payments", "denied")
    events = [
        msgspec.structs.replace(e, request_id=shared) if e.request_id == renamed else e for e in history
    ]
    root = tmp_path / "evidence"
    project(root, events, flush_every=160)

    report = verify(root, PUBLIC, KNOWN, workers=1)
    assert report.findings == []
    assert report.requests == sum(isinstance(e, InferenceRequested) for e in events)
    with EvidenceStore(root) as store:
        summary = store.terminal_summary()
        assert summary["requests"] == summary["terminal"] == report.requests
        assert summary["multiple_terminal"] == 0
        states = store.query(
            "SELECT tenant_id, state FROM terminal_states WHERE request_id = $id ORDER BY 1", {"id": shared}
        ).to_pylist()
        assert states == [
            {"tenant_id": "globex-insurance", "state": "answered"},
            {"tenant_id": "initech-payments", "state": "escalation_denied"},
        ]
        escalations = {
            r["tenant_id"]: r["review_state"]
            for r in store.escalations().to_pylist()
            if r["request_id"] == shared
        }
        assert escalations == {"globex-insurance": "dispatched", "initech-payments": "denied"}
        assert len([r for r in store.escalations().to_pylist() if r["request_id"] == shared]) == 2

        # Who routed what: initech's denied escalation took none of globex's answer or cost.
        initech = [
            r for r in store.who_routed_what().to_pylist()
            if r["tenant_id"] == "initech-payments" and r["verdict"] == "escalated"
        ]  # fmt: skip
        assert sum(r["answered"] for r in initech) == 0
        assert sum(r["actual_usd"] for r in initech) == 0
        decided = [e for e in events if isinstance(e, RequestDecided)]
        assert sum(r["requests"] for r in store.who_routed_what().to_pylist()) == len(decided)

        # Residency: every call is judged against its own tenant's decision.
        home = {t.id: t.home_region for t in POLICY.tenants}
        for r in store.residency().to_pylist():
            assert r["home_region"] == home[r["tenant_id"]], r

        with pytest.raises(EvidenceError, match="globex-insurance, initech-payments"):
            store.lineage(shared)
        for tenant in ("globex-insurance", "initech-payments"):
            own = [e for e in events if e.request_id == shared and e.tenant_id == tenant]
            got = set(store.lineage(shared, tenant).column("event_id").to_pylist())
            assert got <= {e.event_id for e in own}  # nothing of the other tenant's
            kinds = (InferenceRequested, RequestDecided, EscalationResolved)
            assert {e.event_id for e in own if isinstance(e, kinds)} <= got
