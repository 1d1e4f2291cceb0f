"""Resilience on a live pipeline: a failing deployment, kill switches, and the escalation boundary.

One pipeline, driven through the same commands an operator and a reviewer use (`nexuscore control`,
`nexuscore review`), every assertion read back from the evidence.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from nexuscore._demo import decider_args, projector_args
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import publish
from nexuscore.kernel.signing import load_public_key
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore, verify
from nexuscore.schemas import AvroCodec, InferenceRequested
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client
from tests.waiting import eventually, logged, service

pytestmark = pytest.mark.integration


def _request(rid: str, **fields: Any) -> InferenceRequested:
    values: dict[str, Any] = {
        "event_id": rid,
        "request_id": rid,
        "tenant_id": "acme-bank",
        "occurred_at": datetime.now(UTC),
        "producer": "tests",
        "feature": "support-chat",
        "task_type": "chat",
        "risk_class": "low",
        "data_classification": "confidential",  # eu only: eu-small-1, failing over to eu-small-2
        "prompt": f"where is my card? ({rid})",
        "max_output_tokens": 64,
        "complexity": 0.1,
    }
    values.update(fields)
    return InferenceRequested(**values)


def _send(bootstrap: str, topics: Topics, requests: list[InferenceRequested]) -> None:
    async def go() -> None:
        producer = new_producer(bootstrap)
        await start_client(producer, bootstrap)
        try:
            await publish(producer, topics, AvroCodec(), requests)
        finally:
            await producer.stop()

    asyncio.run(go())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(  # noqa: S603  # our own CLI
        [sys.executable, "-m", "nexuscore", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    assert result.returncode == 0, f"nexuscore {' '.join(args)} failed: {result.stdout}{result.stderr}"
    return result


def _until(what: str, check: Callable[[], bool], services: Services, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        services.check()
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (logs in {services.log_dir})")


def test_failover_circuits_kill_switches_and_reviews_on_a_live_pipeline(
    bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics(f"res-{uuid.uuid4().hex[:8]}.")
    evidence = tmp_path / "evidence"
    asyncio.run(ensure_topics(bootstrap, topics))
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    assert keys.operator is not None and keys.reviewer is not None
    acts = [*common, "--trust-store", str(keys.trust_store)]  # signed acts name their signer from it

    def rows(sql: str) -> list[dict[str, Any]]:
        with EvidenceStore(evidence) as store:
            result: list[dict[str, Any]] = store.query(sql).to_pylist()
            return result

    def ended(ids: list[str]) -> Callable[[], bool]:
        listed = ", ".join(f"'{i}'" for i in ids)
        sql = f"SELECT count(DISTINCT request_id) AS n FROM terminal_states WHERE request_id IN ({listed})"  # noqa: S608
        return lambda: (evidence / "manifest.head.json").exists() and rows(sql)[0]["n"] == len(ids)

    with Services(evidence / "_logs") as services:
        healthy = services.start("healthy", "run", "provider", "--port", "0")
        broken = services.start("broken", "run", "provider", "--port", "0", "--error-rate", "1.0")
        healthy_url = healthy.wait_for_line("simulated provider listening on", 30)
        broken_url = broken.wait_for_line("simulated provider listening on", 30)
        services.start("decider", *decider_args(common, keys))
        for name in ("worker-a", "worker-b"):
            services.start(
                name, "run", "worker", *common, "--simulated-url", healthy_url, "--route",
                f"eu-small-1={broken_url}", "--breaker-failures", "3", "--breaker-cool-down", "60",
            )  # fmt: skip
        services.start("projector", *projector_args(common, keys, evidence), "--flush-interval", "0.3")

        # 1. eu-small-1 fails every call: retried, then failed over to eu-small-2 (same region), until
        #    its circuit opens; from then on both workers pass it over.
        first = [_request(f"fo-{n}") for n in range(40)]
        # A few first, until the circuit opens (a burst would put every call in flight before the
        # breaker has seen three failures), then the rest, which pass the broken deployment over.
        _send(bootstrap, topics, first[:8])
        _until("the first failovers", ended([r.request_id for r in first[:8]]), services)
        _until("the circuit to open", lambda: bool(rows(
            "SELECT 1 FROM circuit_events WHERE deployment_id = 'eu-small-1' AND to_state = 'open'")), services)  # fmt: skip
        _send(bootstrap, topics, first[8:])
        _until("the failover batch", ended([r.request_id for r in first]), services)
        outcomes = rows("SELECT * FROM outcomes WHERE request_id LIKE 'fo-%'")
        assert {(o["status"], o["deployment_id"], o["region"]) for o in outcomes} == {
            ("answered", "eu-small-2", "eu")
        }
        attempts = rows("SELECT * FROM attempts WHERE request_id LIKE 'fo-%'")
        failed = [a for a in attempts if a["deployment_id"] == "eu-small-1"]
        assert failed and all(a["status"] == "error" and a["http_status"] == 503 for a in failed)
        assert {a["region"] for a in attempts} == {"eu"}
        opened = rows("SELECT * FROM circuit_events WHERE deployment_id = 'eu-small-1' AND to_state = 'open'")
        assert opened and opened[0]["from_state"] == "closed" and opened[0]["consecutive_failures"] >= 3
        assert any("eu-small-1: circuit open" in o["skipped"] for o in outcomes)
        # Calls to the broken deployment stop once its circuit is open: far fewer than 3 per request.
        assert len(failed) < len(first)

        # 2. The kill switch: acme-bank off, signed by an operator; taken up without a restart.
        _cli("control", "off", "--scope", "tenant", "--target", "acme-bank", "--reason", "incident 42",
             "--actor", "alice@demo", "--key", str(keys.operator), *acts)  # fmt: skip
        decider = service(services, "decider")
        eventually(
            lambda: logged(decider, "inference off (tenant acme-bank)"),
            "the switch taken up",
            services=services,
        )
        off = [_request(f"off-{n}") for n in range(3)]
        _send(bootstrap, topics, off)
        _until("the switched-off batch", ended([r.request_id for r in off]), services)
        denied = rows("SELECT verdict, verdict_reason FROM decisions WHERE request_id LIKE 'off-%'")
        assert all(
            d["verdict"] == "denied" and d["verdict_reason"].startswith("kill_switch:") for d in denied
        )
        assert not rows("SELECT * FROM dispatches WHERE request_id LIKE 'off-%'")

        # 3. Offline mode: a prompt answered before is answered from the cache, marked cached.
        _cli("control", "offline", "--reason", "provider outage", "--actor", "alice@demo",
             "--key", str(keys.operator), *acts)  # fmt: skip
        _cli("control", "on", "--scope", "tenant", "--target", "acme-bank", "--reason", "incident 42 over",
             "--actor", "alice@demo", "--key", str(keys.operator), *acts)  # fmt: skip
        eventually(
            lambda: logged(decider, "inference on (tenant acme-bank)"),
            "offline and on taken up",
            services=services,
        )
        again = _request("cached-1", prompt=first[0].prompt)
        unseen = _request("cached-miss", prompt="a question nobody asked")
        _send(bootstrap, topics, [again, unseen])
        _until("the offline batch", ended(["cached-1", "cached-miss"]), services)
        [cached] = rows("SELECT * FROM outcomes WHERE request_id = 'cached-1'")
        assert cached["cached"] and cached["cached_from"] == "fo-0" and cached["cost_micros"] == 0
        [miss] = rows("SELECT verdict, verdict_reason FROM decisions WHERE request_id = 'cached-miss'")
        assert miss["verdict"] == "denied" and miss["verdict_reason"].startswith("offline: no cached answer")
        switches = rows("SELECT scope, target, mode, actor FROM kill_switches ORDER BY occurred_at")
        assert [(s["scope"], s["mode"]) for s in switches] == [
            ("tenant", "off"),
            ("global", "offline"),
            ("tenant", "on"),
        ]
        _cli(
            "control",
            "on",
            "--reason",
            "outage over",
            "--actor",
            "alice@demo",
            "--key",
            str(keys.operator),
            *acts,
        )
        eventually(lambda: logged(decider, "inference on (global)"), "inference back on", services=services)

        # 4. The escalation boundary: two critical requests wait for a person.
        critical = [
            _request(f"crit-{n}", risk_class="critical", data_classification="public") for n in range(2)
        ]
        _send(bootstrap, topics, critical)
        _until(
            "the escalations",
            lambda: len(rows("SELECT * FROM escalations WHERE request_id LIKE 'crit-%'")) == 2,
            services,
        )
        listed = _cli("review", "list", "-e", str(evidence)).stdout
        assert "crit-0" in listed and "crit-1" in listed
        shown = _cli("review", "show", "crit-0", "-e", str(evidence)).stdout
        assert "critical-risk" in shown
        approve = _cli("review", "approve", "crit-0", "--key", str(keys.reviewer), "--reason", "memo checked",
                       "-e", str(evidence), *acts)  # fmt: skip
        assert "resolution: dispatched" in approve.stdout
        _cli("review", "deny", "crit-1", "--key", str(keys.reviewer), "--reason", "call the customer",
             "-e", str(evidence), *acts)  # fmt: skip
        _until("the reviewed requests", ended(["crit-0", "crit-1"]), services)
        states = {
            r["request_id"]: r["state"]
            for r in rows("SELECT * FROM terminal_states WHERE request_id LIKE 'crit-%'")
        }
        assert states == {"crit-0": "answered", "crit-1": "escalation_denied"}
        reviewed = {
            r["request_id"]: r for r in rows("SELECT * FROM escalations WHERE request_id LIKE 'crit-%'")
        }
        assert (
            reviewed["crit-0"]["reviewer"] == "bob@demo"  # the key's name in the trust store
            and reviewed["crit-0"]["review_state"] == "dispatched"
        )
        assert reviewed["crit-1"]["review_reason"] == "call the customer"
        again_denied = subprocess.run(  # noqa: S603  # our own CLI
            [sys.executable, "-m", "nexuscore", "review", "deny", "crit-1", "--key", str(keys.reviewer), "--reason", "y",
             "-e", str(evidence), *acts],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert again_denied.returncode == 2 and "no longer awaiting review" in again_denied.stderr

    report = verify(evidence, load_public_key(keys.evidence_public), {default_policy().digest})
    assert report.ok, [f for f in report.findings if f.fatal]
