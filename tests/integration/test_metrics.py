"""Every stage's /metrics, scraped while the pipeline runs on the real broker: the counters moved by
exactly what the evidence says happened (decisions by verdict, rejections, dead letters, calls,
outcomes, sealed rows and files), and lag is reported per partition."""

from __future__ import annotations

import asyncio
import socket
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from nexuscore._demo import _publish_all, decider_args, projector_args
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore
from nexuscore.transport import Topics, ensure_topics
from tests.waiting import eventually

pytestmark = pytest.mark.integration
REQUESTS = 60
Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> Samples:
    """Every sample of a stage's /metrics, by sample name and label set."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    out: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        v for k, v in samples.get(name, {}).items() if all((key, val) in k for key, val in labels.items())
    )


def evidence_counts(evidence: Path) -> dict[str, int]:
    if not (evidence / "manifest.jsonl").exists():
        return {}
    with EvidenceStore(evidence) as store:

        def n(sql: str) -> int:
            return int(next(iter(store.query(sql).to_pylist()[0].values())))

        counts = {
            f"verdict:{r['verdict']}": r["n"]
            for r in store.query("SELECT verdict, count(*) AS n FROM decisions GROUP BY 1").to_pylist()
        }
        counts.update(
            decisions=n("SELECT count(*) FROM decisions"),
            rejections=n("SELECT count(*) FROM rejections"),
            decider_deadletters=n("SELECT count(*) FROM deadletters WHERE producer = 'nexuscore.decider'"),
            attempts=n("SELECT count(*) FROM attempts"),
            outcomes=n("SELECT count(*) FROM outcomes"),
            requests=n("SELECT count(*) FROM requests"),
            files=sum(1 for _ in evidence.glob("region=*/*/*.parquet")),
        )
    return counts


@pytest.fixture(scope="module")
def pipeline(
    bootstrap: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, int], Path]]:
    topics = Topics(f"met-{uuid.uuid4().hex[:8]}")
    evidence = tmp_path_factory.mktemp("evidence")
    keys = dev_keys(tmp_path_factory.mktemp("keys"), DEFAULT_POLICY_PATH)
    asyncio.run(ensure_topics(bootstrap, topics))
    ports = {name: free_port() for name in ("provider", "decider", "worker", "projector")}
    with Services(evidence.with_name(evidence.name + "-logs")) as services:
        provider = services.start(
            "provider", "run", "provider", "--port", "0", "--metrics-port", str(ports["provider"])
        )
        url = provider.wait_for_line("simulated provider listening on", 30)
        common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
        services.start("decider", *decider_args(common, keys), "--metrics-port", str(ports["decider"]))
        services.start(
            "worker", "run", "worker", *common, "--simulated-url", url, "--metrics-port", str(ports["worker"])
        )
        services.start(
            "projector", *projector_args(common, keys, evidence), "--metrics-port", str(ports["projector"])
        )
        malformed = asyncio.run(_publish_all(bootstrap, topics, default_policy(), REQUESTS, topics.namespace))
        eventually(
            lambda: (
                evidence_counts(evidence).get("requests") == REQUESTS
                and evidence_counts(evidence)["decider_deadletters"] == malformed
            ),
            "every request and dead letter in the evidence",
            180,
            services,
        )
        yield ports, evidence


def test_decider_counts_what_the_evidence_holds(pipeline: tuple[dict[str, int], Path]) -> None:
    ports, evidence = pipeline

    def matches() -> bool:
        seen, want = scrape(ports["decider"]), evidence_counts(evidence)
        by_verdict = {k: v for k, v in want.items() if k.startswith("verdict:")} == {
            f"verdict:{v}": int(total(seen, "nexuscore_decisions_total", verdict=v))
            for v in ("dispatch", "denied", "escalated")
            if total(seen, "nexuscore_decisions_total", verdict=v)
        }
        return (
            by_verdict
            and total(seen, "nexuscore_decisions_total", verdict="rejected") == want["rejections"]
            and total(seen, "nexuscore_refusals_total", kind="request") == want["rejections"]
            and total(seen, "nexuscore_dead_letters_total", stage="decider") == want["decider_deadletters"]
        )

    eventually(matches, "the decider's counters equal the evidence", 60)
    seen = scrape(ports["decider"])
    tenants = {dict(k)["tenant"] for k in seen["nexuscore_decisions_total"]}
    assert tenants and tenants <= {t.id for t in default_policy().tenants} | {"unknown"}
    lag = seen["nexuscore_consumer_lag"]
    assert lag and all(v >= 0 for v in lag.values())
    assert any(dict(k)["stage"] == "decider" and dict(k)["topic"].endswith("nexus.requests") for k in lag)
    assert any(k for k in seen["nexuscore_budget_utilisation"])


def test_worker_counts_every_call_and_outcome(pipeline: tuple[dict[str, int], Path]) -> None:
    ports, evidence = pipeline

    def matches() -> bool:
        seen, want = scrape(ports["worker"]), evidence_counts(evidence)
        return (
            total(seen, "nexuscore_model_call_seconds_count") == want["attempts"] > 0
            and total(seen, "nexuscore_outcomes_total") == want["outcomes"] > 0
        )

    eventually(matches, "the worker's call histogram and outcomes equal the evidence", 60)
    seen = scrape(ports["worker"])
    assert seen["nexuscore_circuit_state"], "every deployment called has a circuit state"
    assert set(seen["nexuscore_circuit_state"].values()) <= {0.0, 1.0, 2.0}


def test_projector_counts_sealed_rows_and_files(pipeline: tuple[dict[str, int], Path]) -> None:
    ports, evidence = pipeline

    def matches() -> bool:
        seen, want = scrape(ports["projector"]), evidence_counts(evidence)
        return (
            total(seen, "nexuscore_evidence_rows_sealed_total", table="requests") == want["requests"]
            and total(seen, "nexuscore_evidence_rows_sealed_total", table="decisions") == want["decisions"]
            and total(seen, "nexuscore_evidence_files_sealed_total") == want["files"]
        )

    eventually(matches, "the projector's sealed rows and files equal the evidence", 60)


def test_provider_serves_metrics_too(pipeline: tuple[dict[str, int], Path]) -> None:
    ports, _ = pipeline
    assert "process_cpu_seconds_total" in scrape(ports["provider"])
