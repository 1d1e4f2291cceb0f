"""Staged promotion on a live pipeline: draft -> shadow -> canary -> active through the governance
topic, taken up by the running decider without a restart; every refused step refused with its
reason; shadow decisions and the provenance of every policy in the evidence."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from nexuscore._demo import Pipeline, ReviewDesk, _publish_all, wait_for_evidence
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy, load_policy
from nexuscore.projections import EvidenceStore
from nexuscore.transport import Topics, ensure_topics
from tests.integration.test_pipeline import nexuscore
from tests.waiting import eventually, logged, service

pytestmark = pytest.mark.integration
BATCH = 60


def _until(evidence: Path, sql: str, expected: int, services: Services, timeout_s: float = 90) -> int:
    deadline = time.monotonic() + timeout_s
    n = -1
    while time.monotonic() < deadline:
        services.check()
        if (evidence / "manifest.head.json").exists():
            with EvidenceStore(evidence) as store:
                n = int(store.query(sql).to_pylist()[0]["n"])
            if n >= expected:
                return n
        time.sleep(0.5)
    raise AssertionError(f"{sql}: {n} < {expected} after {timeout_s} s")


def test_a_policy_is_promoted_stage_by_stage_on_a_live_pipeline(bootstrap: str, tmp_path: Path) -> None:
    topics = Topics(f"gov-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    evidence = tmp_path / "evidence"
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(
        DEFAULT_POLICY_PATH.read_text().replace('version: "2026.11.1"', 'version: "2026.12.0-rc1"')
    )
    digest = load_policy(candidate).digest
    common = [
        "--bootstrap",
        bootstrap,
        "--namespace",
        topics.namespace,
        "--trust-store",
        str(keys.trust_store),
    ]

    def promote(stage: str, *extra: str) -> tuple[int, str]:
        out = nexuscore(
            "policy", "promote", str(candidate), "--to", stage, "--key", str(keys.operator), *common, *extra
        )
        return out.returncode, out.stdout + out.stderr

    def publish(run: str) -> None:
        asyncio.run(_publish_all(bootstrap, topics, default_policy(), BATCH, run))

    with Services(evidence / "_logs") as services:
        Pipeline(services, bootstrap, topics, keys, evidence)
        desk = ReviewDesk(bootstrap, topics, keys)
        publish("a")
        wait_for_evidence(evidence, BATCH, services, 120, Console(quiet=True), desk)

        code, out = promote("draft")
        assert code == 2 and "unsigned" in out and "no signatures" in out
        sign = nexuscore("policy", "sign", str(candidate), "--key", str(tmp_path / "keys" / "alice.pem"),
                         "--signer", "alice@demo")  # fmt: skip
        assert sign.returncode == 0, sign.stderr
        code, out = promote("shadow")
        assert code == 2 and "was never promoted" in out
        code, out = promote("draft")
        assert code == 0, out
        code, out = promote("shadow")
        assert code == 0, out
        decider = service(services, "decider")
        eventually(
            lambda: logged(decider, "is now shadow"), "the decider takes up the shadow", services=services
        )
        publish("b")
        _until(
            evidence,
            f"SELECT count(*) AS n FROM shadow_decisions WHERE policy_digest = '{digest}'",
            1,
            services,
        )

        code, out = promote("canary", "--canary-share", "0.5")
        assert code == 2 and "replay report" in out
        report = tmp_path / "replay.json"
        rep = nexuscore("replay", "--policy", str(candidate), "-t", str(keys.trust_store), "-e", str(evidence),
                        "--report-out", str(report), "--html", str(tmp_path / "replay.html"))  # fmt: skip
        assert rep.returncode == 0, rep.stdout + rep.stderr
        assert json.loads(report.read_text())["policy_digest"] == digest
        code, out = promote("canary", "--canary-share", "0.5", "--replay-report", str(report))
        assert code == 0, out
        code, out = promote("active", "--replay-report", str(report))
        assert code == 2 and "2 distinct reviewers" in out
        sign = nexuscore("policy", "sign", str(candidate), "--key", str(tmp_path / "keys" / "bob.pem"),
                         "--signer", "bob@demo")  # fmt: skip
        assert sign.returncode == 0, sign.stderr
        active_before = logged(decider, "is now active")
        code, out = promote("active", "--replay-report", str(report))
        assert code == 0, out
        eventually(
            lambda: logged(decider, "is now active") > active_before,
            "the decider takes up the new active",
            services=services,
        )
        publish("c")
        wait_for_evidence(evidence, 3 * BATCH, services, 120, Console(quiet=True), desk)
        _until(
            evidence,
            f"SELECT count(*) AS n FROM decisions WHERE policy_digest = '{digest}' AND policy_stage = 'active'",
            1,
            services,
        )

    with EvidenceStore(evidence) as store:
        stages = store.query(
            "SELECT to_stage, reason FROM policy_events ORDER BY occurred_at, src_offset"
        ).to_pylist()
        assert [s["to_stage"] for s in stages] == ["active", "draft", "shadow", "canary", "active"]
        assert stages[0]["reason"] == "bootstrap"
        # The decider that started under the bootstrap policy decided the last batch under the
        # candidate, with no restart in between.
        late = store.query(
            "SELECT DISTINCT policy_digest FROM decisions "
            "WHERE occurred_at > (SELECT max(occurred_at) FROM policy_events)"
        ).to_pylist()
        assert {r["policy_digest"] for r in late} == {digest}
    # Verify mode: every decision, under bootstrap, canary and active policies alike, reproduced.
    verified = nexuscore("replay", "--recorded", "-t", str(keys.trust_store), "-e", str(evidence))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "decisions changed:     0" in verified.stdout
    # The same, from the topics themselves rather than the evidence store.
    from_log = nexuscore("replay", "--recorded", "--from-kafka", "-t", str(keys.trust_store),
                         "--bootstrap", bootstrap, "--namespace", topics.namespace)  # fmt: skip
    assert from_log.returncode == 0, from_log.stdout + from_log.stderr
    assert f"requests replayed:     {3 * BATCH}" in from_log.stdout
    assert "decisions changed:     0" in from_log.stdout
    history = nexuscore("policy", "history", "-e", str(evidence), "-t", str(keys.trust_store), "-f", "json")
    assert history.returncode == 0, history.stderr
    rows = json.loads(history.stdout)
    assert (
        rows[-1]["to_stage"] == "active"
        and "alice@demo" in rows[-1]["signers"]
        and "bob@demo" in rows[-1]["signers"]
    )
