"""The decider killed with SIGKILL in the middle of the traffic and started again: nothing lost,
nothing twice. Its state is recovered from the changelog topics by the new process."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console

from nexuscore._demo import ReviewDesk, _publish_all, decider_args, projector_args, wait_for_evidence
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import publish, synthetic_requests
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client

pytestmark = pytest.mark.integration
REQUESTS = 400
CODEC = AvroCodec()


async def _trickle(bootstrap: str, topics: Topics, n: int, per_wave: int = 2, gap_s: float = 0.1) -> None:
    """Publish ``n`` requests ``per_wave`` at a time, ``gap_s`` apart."""
    requests = synthetic_requests(
        default_policy(), n, seed=7, start=datetime.now(UTC), run=topics.namespace + "a"
    )
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        for i in range(0, n, per_wave):
            await publish(producer, topics, CODEC, requests[i : i + per_wave])
            await asyncio.sleep(gap_s)  # the pace of the traffic, not a wait for a condition
    finally:
        await producer.stop()


# On faust this test found three behaviours that lost requests or decided one twice (see
# nexuscore.streams._faust); it was a non-strict xfail there. On the default runtime (aiokafka
# batches: outputs, then state, then offsets) it passed 20 runs of 20 (2026-11-30,
# `pytest tests/integration/test_crash.py --runxfail` in a loop), so it is a strict test now; and
# 20 of 20 again with the decider killed while requests trickle in (2026-12-01).
def test_a_killed_decider_loses_and_duplicates_nothing(bootstrap: str, tmp_path: Path) -> None:
    topics = Topics(f"crash-{uuid.uuid4().hex[:8]}.")
    evidence = tmp_path / "evidence"
    asyncio.run(ensure_topics(bootstrap, topics))
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    with Services(evidence / "_logs") as services:
        provider = services.start("provider", "run", "provider", "--port", "0")
        url = provider.wait_for_line("simulated provider listening on", 30)
        decider = services.start("decider", *decider_args(common, keys))
        worker = services.start("worker", "run", "worker", *common, "--simulated-url", url)
        projector = services.start("projector", *projector_args(common, keys, evidence))
        for service, ready in (
            (decider, "decider ready"),
            (worker, "worker ready"),
            (projector, "projector ready"),
        ):
            service.wait_for_line(ready, 60)
        half = REQUESTS // 2
        # The first half trickles in (about 10 s), and the decider is killed while it flows, with
        # decisions out whose state is not yet durable most times: its restart decides them again
        # in their first order ("decided again" in its log). The second half arrives while it is dead.
        trickle = threading.Thread(target=asyncio.run, args=(_trickle(bootstrap, topics, half),))
        trickle.start()
        deadline = time.monotonic() + 120
        decided = 0
        while time.monotonic() < deadline:
            if (evidence / "manifest.head.json").exists():
                with EvidenceStore(evidence) as store:
                    decided = store.terminal_summary()["terminal"]
            if decided >= 20:
                break
            time.sleep(0.2)
        assert decided > 0, "the decider decided nothing"
        decider.proc.send_signal(signal.SIGKILL)
        decider.proc.wait(10)
        trickle.join(60)
        decider.stop()  # already dead: closes its log
        services.started.remove(decider)
        asyncio.run(_publish_all(bootstrap, topics, default_policy(), half, topics.namespace + "b"))
        services.start("decider-restarted", *decider_args(common, keys))
        summary = wait_for_evidence(
            evidence, REQUESTS, services, 240, Console(quiet=True), ReviewDesk(bootstrap, topics, keys)
        )
    assert summary["requests"] == REQUESTS
    assert summary["terminal"] == REQUESTS
    assert summary["multiple_terminal"] == 0
    policy = default_policy()
    with EvidenceStore(evidence) as store:
        spend = store.query(
            "SELECT tenant_id, max(tenant_spent_micros) AS spent FROM settlements GROUP BY ALL"
        ).to_pylist()
    for row in spend:
        assert row["spent"] <= policy.tenants_by_id[row["tenant_id"]].daily_budget_usd * 1_000_000
