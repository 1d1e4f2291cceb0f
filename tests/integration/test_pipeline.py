"""The whole pipeline against a real Kafka broker: a few hundred requests, end to end.

Every assertion is read back from what the pipeline left behind: the topics themselves and the
Parquet evidence.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import fastavro
import pyarrow.parquet as pq
import pytest
from aiokafka import AIOKafkaConsumer
from fastavro.schema import fingerprint, to_parsing_canonical_form

from nexuscore._demo import Pipeline, ReviewDesk, _publish_all, wait_for_evidence
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Services
from nexuscore.kernel.signing import generate_keypair
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore, FieldCipher, LocalKeyStore
from nexuscore.replay import replay
from nexuscore.schemas import AVRO_DIR
from nexuscore.transport import Topics, ensure_topics

pytestmark = pytest.mark.integration
REQUESTS = 300
MALFORMED = 4


@dataclass
class Run:
    bootstrap: str
    topics: Topics
    evidence: Path
    keys: DevKeys

    @property
    def public_key(self) -> Path:
        return self.keys.evidence_public


@pytest.fixture(scope="module")
def run(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    topics = Topics(f"it-{uuid.uuid4().hex[:8]}.")
    evidence = tmp_path_factory.mktemp("evidence")
    keys = dev_keys(tmp_path_factory.mktemp("keys"), DEFAULT_POLICY_PATH)
    asyncio.run(ensure_topics(bootstrap, topics))
    from rich.console import Console

    with Services(evidence / "_logs") as services:
        Pipeline(services, bootstrap, topics, keys, evidence)
        sent = asyncio.run(_publish_all(bootstrap, topics, default_policy(), REQUESTS, topics.namespace))
        assert sent == MALFORMED
        wait_for_evidence(
            evidence, REQUESTS, services, 180, Console(quiet=True), ReviewDesk(bootstrap, topics, keys)
        )
        # Let the last dead letters and settlements land (one projector flush).
        deadline = asyncio.run(_settle_evidence(evidence))
        assert deadline
    yield Run(bootstrap, topics, evidence, keys)


async def _settle_evidence(evidence: Path) -> bool:
    for _ in range(60):
        with EvidenceStore(evidence) as store:
            s = store.terminal_summary()
            pending = store.query(
                "SELECT count(*) AS n FROM outcomes o ANTI JOIN settlements s USING (request_id) WHERE o.status = 'answered'"
            ).to_pylist()[0]["n"]
        if s["deadletters"] >= MALFORMED and pending == 0:
            return True
        await asyncio.sleep(0.5)
    return False


def one(store: EvidenceStore, sql: str) -> object:
    return next(iter(store.query(sql).to_pylist()[0].values()))


def test_every_request_has_exactly_one_terminal_state(run: Run) -> None:
    with EvidenceStore(run.evidence) as store:
        summary = store.terminal_summary()
        assert summary["requests"] == REQUESTS
        assert summary["terminal"] == REQUESTS
        assert summary["multiple_terminal"] == 0
        states = dict(
            (r["state"], r["n"])
            for r in store.query("SELECT state, count(*) AS n FROM terminal_states GROUP BY 1").to_pylist()
        )
        # The synthetic mix exercises the endings: answered, rejected at admission, and escalations
        # ended by the review desk (about half approved: those end answered).
        assert {"answered", "rejected", "escalation_denied"} <= set(states), states
        reviewed = store.query("SELECT resolution, reviewer FROM resolutions").to_pylist()
        assert {r["resolution"] for r in reviewed} == {"dispatched", "denied"}
        assert {r["reviewer"] for r in reviewed} == {"bob@demo"}
        # Every decision and outcome points at a request that exists.
        assert one(store, "SELECT count(*) FROM decisions ANTI JOIN requests USING (request_id)") == 0
        assert one(store, "SELECT count(*) FROM outcomes ANTI JOIN dispatches USING (request_id)") == 0


def test_every_decision_carries_the_policy_digest_and_its_reasons(run: Run) -> None:
    digest = default_policy().digest
    with EvidenceStore(run.evidence) as store:
        assert one(store, f"SELECT count(*) FROM decisions WHERE policy_digest <> '{digest}'") == 0
        assert (
            one(store, "SELECT count(*) FROM decisions d ANTI JOIN decision_reasons r USING (event_id)") == 0
        )
        assert (
            one(store, "SELECT min(n) FROM (SELECT count(*) AS n FROM decision_reasons GROUP BY event_id)")
            >= 2
        )


def test_no_call_ever_left_the_allowed_regions(run: Run) -> None:
    """Allowed regions are worked out here from the policy and the request, not read from the
    decision, so a residency bug in the decider cannot hide behind its own record."""
    policy = default_policy()
    with EvidenceStore(run.evidence) as store:
        calls = store.query(
            "SELECT r.tenant_id, r.data_classification, a.region AS attempt_region, o.region AS outcome_region "
            "FROM attempts a JOIN requests r USING (request_id) LEFT JOIN outcomes o USING (request_id)"
        ).to_pylist()
    assert calls
    for call in calls:
        tenant = policy.tenants_by_id[call["tenant_id"]]
        rule = policy.residency_by_class[call["data_classification"]]
        allowed = {tenant.home_region if r == "home" else r for r in rule.allowed}
        assert call["attempt_region"] in allowed, call
        assert call["outcome_region"] in allowed, call


def test_settled_spend_stays_within_every_budget(run: Run) -> None:
    policy = default_policy()
    with EvidenceStore(run.evidence) as store:
        spend = store.query(
            "SELECT tenant_id, feature, budget_window, max(tenant_spent_micros) AS tenant_spent, "
            "max(feature_spent_micros) AS feature_spent FROM settlements GROUP BY ALL"
        ).to_pylist()
        denied = one(store, "SELECT count(*) FROM decisions WHERE budget_action = 'denied'")
    assert spend
    for row in spend:
        tenant = policy.tenants_by_id[row["tenant_id"]]
        feature = next(f for f in tenant.features if f.id == row["feature"])
        assert row["tenant_spent"] <= tenant.daily_budget_usd * 1_000_000
        assert row["feature_spent"] <= feature.daily_budget_usd * 1_000_000
    # The default policy gives one tenant a budget small enough that the demo traffic exhausts it.
    assert denied > 0


def test_malformed_input_is_dead_lettered_with_its_bytes_reason_and_position(run: Run) -> None:
    with EvidenceStore(run.evidence) as store:
        letters = store.query("SELECT * FROM deadletters ORDER BY source_offset").to_pylist()
    assert len(letters) == MALFORMED
    reasons = " | ".join(r["reason"] for r in letters)
    for expected in (
        "not Avro single-object encoding",
        "unknown schema fingerprint",
        "body does not match",
        "Expected `int` >= 1",
    ):
        assert expected in reasons
    for letter in letters:
        assert letter["source_topic"] == run.topics.requests
        assert letter["raw_key"] == b"acme-bank"
    raw = asyncio.run(_read_topic(run.bootstrap, run.topics.requests))
    by_position = {(r.partition, r.offset): r.value for r in raw}
    cipher = FieldCipher(LocalKeyStore(run.evidence / "_keys"))
    for letter in letters:
        stored = cipher.decrypt(letter["raw_value_key"], letter["event_id"], "raw_value", letter["raw_value"])
        assert stored is not None
        assert by_position[(letter["source_partition"], letter["source_offset"])] == bytes.fromhex(stored)


async def _read_topic(bootstrap: str, topic: str) -> list:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    try:
        records = []
        while True:
            batch = await consumer.getmany(timeout_ms=1500, max_records=5000)
            if not batch:
                return records
            for rs in batch.values():
                records.extend(rs)
    finally:
        await consumer.stop()


def test_messages_on_the_topics_decode_with_plain_fastavro_and_the_avsc_files_alone(run: Run) -> None:
    schemas = {}
    for path in AVRO_DIR.glob("*.avsc"):
        schema = json.loads(path.read_text())
        schemas[bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))] = (
            schema["name"],
            fastavro.parse_schema(schema),
        )
    seen: dict[str, int] = {}
    for topic in (
        run.topics.decisions,
        run.topics.dispatch,
        run.topics.attempts,
        run.topics.outcomes,
        run.topics.deadletter,
    ):
        for record in asyncio.run(_read_topic(run.bootstrap, topic)):
            assert record.value[:2] == b"\xc3\x01"
            name, parsed = schemas[record.value[2:10]]
            body = fastavro.schemaless_reader(io.BytesIO(record.value[10:]), parsed, None)
            assert body["event_id"] and body["occurred_at"].tzinfo is not None
            seen[name] = seen.get(name, 0) + 1
    assert {"request_decided_v1", "request_rejected_v1", "budget_settled_v1", "dispatch_requested_v1",
            "model_call_attempted_v1", "outcome_recorded_v1", "dead_lettered_v1"} <= set(seen)  # fmt: skip


def test_replay_with_the_recorded_policy_reports_no_change(run: Run) -> None:
    with EvidenceStore(run.evidence) as store:
        report = replay(store, default_policy())
    assert report.requests == REQUESTS
    assert report.changed == 0 and report.context_differences == 0, report.changes[:3]


def nexuscore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexuscore", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_the_cli_queries_and_replays_the_evidence(run: Run) -> None:
    ev = str(run.evidence)
    who = nexuscore("evidence", "who-routed-what", "-e", ev, "--tenant", "acme-bank", "--format", "json")
    assert who.returncode == 0, who.stderr
    rows = json.loads(who.stdout)
    assert rows and {r["tenant_id"] for r in rows} == {"acme-bank"}
    future = nexuscore(
        "evidence",
        "who-routed-what",
        "-e",
        ev,
        "--since",
        datetime.now(UTC).replace(year=2100).date().isoformat(),
        "-f",
        "json",
    )
    assert future.returncode == 0 and json.loads(future.stdout) == []
    sql = nexuscore("evidence", "sql", "SELECT count(*) AS n FROM requests", "-e", ev, "-f", "csv")
    assert sql.returncode == 0 and sql.stdout.splitlines() == ["n", str(REQUESTS)]
    bad_sql = nexuscore("evidence", "sql", "SELECT nope FROM requests", "-e", ev)
    assert bad_sql.returncode == 2 and "query failed" in bad_sql.stderr and "Traceback" not in bad_sql.stderr
    rep = nexuscore("replay", "--policy", str(run.keys.policy), "-t", str(run.keys.trust_store), "-e", ev)
    assert rep.returncode == 0, rep.stderr
    assert "decisions changed:     0" in rep.stdout


def test_an_unreachable_broker_and_a_bad_policy_give_one_clear_line(tmp_path: Path) -> None:
    no_key = nexuscore("run", "projector", "--bootstrap", "127.0.0.1:1", "-e", str(tmp_path))
    assert no_key.returncode == 2 and "no signing key" in no_key.stderr
    generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    (tmp_path / "trust.yaml").write_text("keys: []\n")
    unreachable = nexuscore(
        "run",
        "projector",
        "--bootstrap",
        "127.0.0.1:1",
        "-e",
        str(tmp_path),
        "--signing-key",
        str(tmp_path / "k.pem"),
        "--trust-store",
        str(tmp_path / "trust.yaml"),
    )
    assert unreachable.returncode == 2
    assert "cannot reach the Kafka broker at 127.0.0.1:1" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: '1'\n")
    demo = nexuscore("demo", "--requests", "5", "--policy", str(bad), "-e", str(tmp_path / "ev"))
    assert demo.returncode == 2
    assert demo.stderr.count("\n") == 1 and f"{bad}: invalid policy" in demo.stderr


def test_the_demo_command_runs_the_pipeline_to_completion(bootstrap: str, tmp_path: Path) -> None:
    demo = nexuscore(
        "demo",
        "--requests",
        "150",
        "-e",
        str(tmp_path / "ev"),
        "--timeout",
        "200",
        env={"NEXUSCORE_BOOTSTRAP": bootstrap},
    )
    assert demo.returncode == 0, demo.stdout[-2000:] + demo.stderr[-2000:]
    assert "all 150 requests reached a terminal state" in demo.stdout
    assert "0 with more than one terminal state" in demo.stdout
    assert "Who routed what" in demo.stdout
    assert "evidence verified:" in demo.stdout
    with EvidenceStore(tmp_path / "ev") as store:
        assert store.terminal_summary()["terminal"] == 150


def test_the_evidence_verifies_and_every_report_answers(run: Run, tmp_path: Path) -> None:
    ev, key = str(run.evidence), str(run.public_key)
    verified = nexuscore("evidence", "verify", "-e", ev, "--public-key", key)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "OK: complete and unaltered" in verified.stdout
    stranger = tmp_path / "stranger"
    generate_keypair(stranger.with_suffix(".pem"), stranger.with_suffix(".pub"))
    refused = nexuscore("evidence", "verify", "-e", ev, "--public-key", str(stranger.with_suffix(".pub")))
    assert refused.returncode == 1 and "head_signature" in refused.stdout

    with EvidenceStore(run.evidence) as store:
        rid = one(store, "SELECT request_id FROM outcomes WHERE status = 'answered' LIMIT 1")
    lineage = nexuscore("evidence", "lineage", str(rid), "-e", ev, "-f", "json")
    assert lineage.returncode == 0, lineage.stderr
    events = [r["event"] for r in json.loads(lineage.stdout)]
    assert events[0] == "requests" and {"decisions", "dispatches", "attempts", "outcomes"} <= set(events)
    assert "prompt: " in json.loads(lineage.stdout)[0]["detail"]

    proof = nexuscore("evidence", "prove", str(rid), "-e", ev, "--public-key", key)
    assert proof.returncode == 0, proof.stderr
    assert "checks out" in proof.stderr and json.loads(proof.stdout)["request_id"] == rid

    residency = nexuscore("evidence", "residency", "-e", ev, "-f", "json")
    assert residency.returncode == 0, residency.stderr
    assert all(r["finding"] == "cross_border" and r["transfer_basis"] for r in json.loads(residency.stdout))

    spend = nexuscore("evidence", "spend", "-e", ev, "-f", "parquet", "-o", str(tmp_path / "spend.parquet"))
    assert spend.returncode == 0, spend.stderr
    table = pq.read_table(tmp_path / "spend.parquet")
    assert table.num_rows > 0 and "tenant_budget_used_pct" in table.column_names
    assert nexuscore("evidence", "spend", "-e", ev, "-f", "parquet").returncode == 2

    escalations = nexuscore("evidence", "escalations", "-e", ev, "-f", "csv")
    assert escalations.returncode == 0 and escalations.stdout.startswith("request_id,")
    report = nexuscore("evidence", "report", "-e", ev, "--public-key", key, "-o", str(tmp_path / "r.html"))
    assert report.returncode == 0, report.stderr
    page = (tmp_path / "r.html").read_text()
    assert page.count("<svg") >= 3 and "Verified:" in page and "<script" not in page
