"""``nexuscore demo``: the whole pipeline on a local broker, end to end, with synthetic traffic."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from nexuscore._broker import kafka_broker
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import malformed_messages, publish, synthetic_requests
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import load_private_key, load_public_key
from nexuscore.policy import RoutingPolicy, load_policy, load_trust_store
from nexuscore.projections import EvidenceStore, verify
from nexuscore.schemas import AvroCodec, ReviewRecorded
from nexuscore.services import publish as publish_operation
from nexuscore.services import review_event, signer_name
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client


class Pipeline:
    """The four stages as child processes: simulated provider, decider, worker, projector."""

    def __init__(
        self, services: Services, bootstrap: str, topics: Topics, keys: DevKeys, evidence_dir: Path
    ) -> None:
        self.services = services
        # A few provider errors, so that retries show in the attempts table.
        provider = services.start("provider", "run", "provider", "--port", "0", "--error-rate", "0.03")
        url = provider.wait_for_line("simulated provider listening on", 30)
        common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
        services.start("decider", *decider_args(common, keys))
        services.start("worker", "run", "worker", *common, "--simulated-url", url)
        services.start("projector", *projector_args(common, keys, evidence_dir))


def decider_args(common: list[str], keys: DevKeys) -> list[str]:
    return ["run", "decider", *common, "--policy", str(keys.policy), "--trust-store", str(keys.trust_store)]


def projector_args(common: list[str], keys: DevKeys, evidence_dir: Path) -> list[str]:
    return [
        "run",
        "projector",
        *common,
        "--evidence-dir",
        str(evidence_dir),
        "--signing-key",
        str(keys.evidence_private),
        "--policy",
        str(keys.policy),
        "--trust-store",
        str(keys.trust_store),
    ]


def demo_dirs(evidence_dir: Path, keys_dir: Path | None = None) -> tuple[Path, Path]:
    """Where the demo keeps its keys and its services' logs: beside the evidence folder, never in it.

    A key that signs the evidence must not sit with what it signs (whoever can write the folder
    could re-sign it), and ``verify`` names every file the manifest does not.
    """
    evidence_dir = evidence_dir.resolve()
    keys = (keys_dir or evidence_dir.with_name(evidence_dir.name + ".keys")).resolve()
    if keys == evidence_dir or evidence_dir in keys.parents:
        raise NexusError(
            f"the keys folder {keys} is inside the evidence folder {evidence_dir}: keep it outside"
        )
    return keys, evidence_dir.with_name(evidence_dir.name + ".logs")


def clear_evidence(evidence_dir: Path) -> None:
    """Remove an earlier demo's evidence (only what NexusCore itself writes there, including the
    keys and logs older versions of the demo kept inside it)."""
    for region in evidence_dir.glob("region=*"):
        shutil.rmtree(region, ignore_errors=True)
    for name in ("manifest.jsonl", "manifest.head.json", "erasures.jsonl", "_keys", "_demo_keys", "_logs"):
        path = evidence_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


async def _publish_all(bootstrap: str, topics: Topics, policy: RoutingPolicy, n: int, run: str) -> int:
    codec = AvroCodec()
    requests = synthetic_requests(policy, n, seed=7, start=datetime.now(UTC), run=run)
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        await publish(producer, topics, codec, requests)
        bad = malformed_messages(codec, requests[0])
        for _, value in bad:
            await producer.send_and_wait(topics.requests, value, key=b"acme-bank")
        return len(bad)
    finally:
        await producer.stop()


class ReviewDesk:
    """A stand-in for the people at the escalation boundary: it reviews each escalation it finds
    pending in the evidence, approving about half and denying the rest, through the same signed
    events `nexuscore review approve|deny` publishes (with the reviewer key of ``keys``)."""

    def __init__(self, bootstrap: str, topics: Topics, keys: DevKeys) -> None:
        if keys.reviewer is None:
            raise NexusError("the review desk needs a reviewer's key (NEXUSCORE_REVIEWER_KEY)")
        self.bootstrap = bootstrap
        self.topics = topics
        self.key = load_private_key(keys.reviewer)
        self.reviewer = signer_name(self.key, load_trust_store(keys.trust_store), "reviewer")
        self.reviewed: set[tuple[str, str]] = set()

    def poll(self, store: EvidenceStore) -> int:
        pending = store.query(
            "SELECT d.tenant_id, d.request_id, d.event_id FROM decisions d "
            "JOIN escalations e ON e.tenant_id = d.tenant_id AND e.request_id = d.request_id "
            "WHERE d.verdict = 'escalated' AND e.review_state = 'pending'"
        ).to_pylist()
        todo = [row for row in pending if (row["tenant_id"], row["request_id"]) not in self.reviewed]
        if todo:
            asyncio.run(self._publish(todo))
        return len(todo)

    async def _publish(self, rows: list[dict[str, Any]]) -> None:
        now = datetime.now(UTC)
        events = [self.review(row["tenant_id"], row["request_id"], row["event_id"], now) for row in rows]
        await publish_operation(self.bootstrap, self.topics, *events)  # one producer for all of them

    def review(self, tenant_id: str, request_id: str, escalation_id: str, now: datetime) -> ReviewRecorded:
        """The desk's signed review of one escalation (approved for about half of the requests, by
        their id), remembered as done."""
        approve = int(hashlib.sha256(request_id.encode()).hexdigest(), 16) % 2 == 0
        action = "approved" if approve else "denied"
        why = "checked against the file: fine to answer" if approve else "not for a model: handled by phone"
        self.reviewed.add((tenant_id, request_id))
        return review_event(request_id, tenant_id, escalation_id, action, why, self.key, self.reviewer, now)


def wait_for_evidence(
    evidence_dir: Path,
    expected: int,
    services: Services,
    timeout_s: float,
    console: Console,
    desk: ReviewDesk | None = None,
) -> dict[str, int]:
    """Poll the evidence until every request has a terminal state; raise on timeout. With a desk,
    escalations found pending are reviewed on the way (else they wait for their deadline)."""
    deadline = time.monotonic() + timeout_s
    summary = {"requests": 0, "terminal": 0, "multiple_terminal": 0, "deadletters": 0}
    columns = (
        TextColumn("terminal states in the evidence"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("evidence", total=expected)
        while time.monotonic() < deadline:
            services.check()
            with EvidenceStore(evidence_dir) as store:
                summary = store.terminal_summary()
                if desk is not None:
                    desk.poll(store)
            progress.update(task, completed=summary["terminal"])
            if summary["terminal"] >= expected:
                return summary
            time.sleep(0.5)
    raise NexusError(
        f"only {summary['terminal']} of {expected} requests reached a terminal state within {timeout_s:.0f} s "
        f"(logs in {services.log_dir})"
    )


def run_demo(
    requests: int,
    evidence_dir: Path,
    policy_path: Path,
    timeout_s: float,
    console: Console,
    *,
    keys_dir: Path | None = None,
) -> dict[str, int]:
    policy = load_policy(policy_path)  # a bad policy fails before anything starts
    evidence_dir = evidence_dir.resolve()
    keys_dir, logs_dir = demo_dirs(evidence_dir, keys_dir)
    try:
        clear_evidence(evidence_dir)
        evidence_dir.mkdir(parents=True, exist_ok=True)  # the projector fills it; readers wait on it
        logs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NexusError(f"cannot write evidence under {evidence_dir}: {exc.strerror}") from exc
    run = uuid.uuid4().hex[:8]
    console.print(
        f"[bold]NexusCore demo[/] run {run}: {requests} requests, policy {policy.version} ({policy.digest[:19]}…)"
    )
    with kafka_broker() as bootstrap:
        # A fresh namespace per run: a shared broker keeps earlier runs' history.
        topics = Topics(namespace=f"demo-{run}.")
        asyncio.run(ensure_topics(bootstrap, topics))
        console.print(f"broker {bootstrap}; topics {topics.requests} …")
        keys = dev_keys(keys_dir, policy_path)
        with Services(logs_dir) as services:
            Pipeline(services, bootstrap, topics, keys, evidence_dir)
            started = time.monotonic()
            malformed = asyncio.run(_publish_all(bootstrap, topics, policy, requests, run))
            console.print(f"published {requests} requests and {malformed} malformed messages")
            desk = ReviewDesk(bootstrap, topics, keys)
            summary = wait_for_evidence(evidence_dir, requests, services, timeout_s, console, desk)
            # The dead letters trail the last request by at most one projector flush.
            deadline = time.monotonic() + 10
            while summary["deadletters"] < malformed and time.monotonic() < deadline:
                time.sleep(0.5)
                with EvidenceStore(evidence_dir) as store:
                    summary = store.terminal_summary()
            elapsed = time.monotonic() - started
    console.print(f"{len(desk.reviewed)} escalations reviewed by {desk.reviewer} (about half approved)")
    console.print(
        f"all {summary['terminal']} requests reached a terminal state {elapsed:.1f} s after the first was "
        "published (stage start-up included; `make bench` measures throughput); "
        f"{summary['deadletters']} dead letters; {summary['multiple_terminal']} with more than one terminal state"
    )
    if summary["multiple_terminal"] or summary["deadletters"] < malformed:
        raise NexusError(f"evidence incomplete: {summary}")
    known = {policy.digest}
    report = verify(evidence_dir, load_public_key(keys.evidence_public), known)
    if not report.ok:
        problems = "; ".join(f"{f.kind} {f.where}: {f.detail}" for f in report.findings if f.fatal)
        raise NexusError(f"the evidence does not verify: {problems}")
    console.print(
        f"evidence verified: {report.rows} events in {report.files} sealed files, every offset of "
        f"{report.partitions} partitions accounted for, manifest signed by key {report.head['key_id']} "
        f"(check it yourself: nexuscore evidence verify -e {evidence_dir} --public-key {keys.evidence_public})"
    )
    return summary
