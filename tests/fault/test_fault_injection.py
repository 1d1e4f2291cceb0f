"""Fault injection under load: FAULT_REQUESTS requests (default 20,000) flow through the whole pipeline
(two deciders, two workers, one projector, one simulated provider answering 503s, 429s, hangs and
latency spikes) while every process type is killed with SIGKILL and restarted and the broker is
restarted. Then, from the evidence alone: no request lost, none with two terminal outcomes, no call
outside the decision's allowed regions, no budget exceeded by more than one request's estimate, and
``nexuscore evidence verify`` passes.

Slow (minutes), so outside the default run: ``make fault`` (``FAULT_REQUESTS=2000 make fault`` for a
short run). The figures go to ``bench/results/fault.{md,json}``; the services' logs stay in the test's
temporary folder (printed), for a post-mortem.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from nexuscore._broker import REPO_ROOT, LocalKafka, ensure_kafka_jars
from nexuscore._demo import ReviewDesk, decider_args, projector_args
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Service, Services
from nexuscore._synthetic import malformed_messages, publish, synthetic_requests
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH, RoutingPolicy, default_policy
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client
from tests.fault._stalls import stalls

# Minutes of load: its own deadline, far above a normal run.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

REQUESTS = int(os.environ.get("FAULT_REQUESTS", "20000"))
# Enough waves that each of the six faults finds a fresh one to strike (a fault and its restart
# take about a wave's gap, so one may skip a wave).
WAVES = 14
# Waves 0..WAVES-2 go out this far apart from the start; the last one right after the last fault, so
# requests are still arriving while every fault happens.
WAVE_GAP_S = 8.0
# After the last fault, how long its recovery runs before the last wave; how long a killed process
# stays dead before its restart.
FAULT_GAP_S = 10.0
# How long after a wave is out a fault strikes: its requests are then waiting at every stage.
FAULT_DELAY_S = 0.5
DEAD_S = 3.0
# 5% 503, 3% 429, 1% hangs (60 s, past the worker's 30 s call timeout), 5% spikes of 2 s.
PROVIDER_FAULTS = {
    "error_rate": 0.05,
    "rate_limit_rate": 0.03,
    "timeout_rate": 0.01,
    "hang_s": 60.0,
    "spike_rate": 0.05,
    "spike_ms": 2000.0,
}
MALFORMED = 4
RESULTS = REPO_ROOT / "bench" / "results"
READY = {
    "decider": "decider ready",
    "worker": "worker ready",
    "projector": "projector ready",
    "provider": "simulated provider listening on",
}


@dataclass
class Fault:
    at_s: float  # seconds after the first request was published
    utc: str
    fault: str
    detail: str
    kind: str = ""  # the faulted stage: decider, worker, projector, provider, broker
    ready_s: float | None = None  # a killed process: from its restart to "ready"
    stall_s: float | None = None  # from the fault until its stage's topic moved again (see _stalls)


# --- traffic -------------------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes the requests in waves from its own thread (and event loop). Holds ``lock`` while a
    wave is in flight, so that the broker is never restarted under a half-sent wave."""

    def __init__(
        self, bootstrap: str, topics: Topics, policy: RoutingPolicy, run: str, lock: threading.Lock
    ) -> None:
        super().__init__(name="fault-publisher", daemon=True)
        self.bootstrap, self.topics, self.policy, self.run_id, self.lock = (
            bootstrap,
            topics,
            policy,
            run,
            lock,
        )
        self.ids: list[str] = []
        self.waves: list[tuple[float, int]] = []  # (seconds after start, requests)
        self.error: BaseException | None = None
        self.release_last = threading.Event()
        self.wave_out = threading.Condition()  # notified as each wave is out
        self.stop = threading.Event()
        self.started_at = 0.0

    def run(self) -> None:
        sizes = [REQUESTS // WAVES + (1 if k < REQUESTS % WAVES else 0) for k in range(WAVES)]
        self.started_at = time.monotonic()
        try:
            for k, size in enumerate(sizes):
                if k == WAVES - 1:
                    while not self.release_last.wait(0.5):
                        if self.stop.is_set():
                            return
                else:
                    due = self.started_at + k * WAVE_GAP_S
                    while time.monotonic() < due:
                        if self.stop.wait(0.2):
                            return
                with self.lock:
                    at = time.monotonic() - self.started_at
                    asyncio.run(self._wave(k, size))
                with self.wave_out:
                    self.waves.append((round(at, 1), size))
                    self.wave_out.notify_all()
        except BaseException as exc:  # re-raised by the test thread
            self.error = exc
        finally:
            with self.wave_out:
                self.wave_out.notify_all()

    def next_wave(self, seen: int, timeout_s: float) -> int:
        """Wait until more than ``seen`` waves are out (or the publisher ended, or the timeout
        passed); return how many are out."""
        with self.wave_out:
            self.wave_out.wait_for(lambda: len(self.waves) > seen or not self.is_alive(), timeout_s)
            return len(self.waves)

    async def _wave(self, k: int, size: int) -> None:
        codec = AvroCodec()
        requests = synthetic_requests(
            self.policy, size, seed=1000 + k, start=datetime.now(UTC), run=f"{self.run_id}-w{k}"
        )
        producer = new_producer(self.bootstrap)
        await start_client(producer, self.bootstrap)
        try:
            await publish(producer, self.topics, codec, requests)
            if k == 0:
                for _, value in malformed_messages(codec, requests[0]):
                    await producer.send_and_wait(self.topics.requests, value, key=b"acme-bank")
        finally:
            await producer.stop()
        self.ids.extend(r.request_id for r in requests)


# --- the pipeline and its faults -----------------------------------------------------------------


class Pipeline:
    def __init__(
        self, broker: LocalKafka, services: Services, topics: Topics, keys: DevKeys, evidence: Path
    ) -> None:
        self.broker, self.services, self.topics, self.keys, self.evidence = (
            broker,
            services,
            topics,
            keys,
            evidence,
        )
        self.common = ["--bootstrap", broker.bootstrap, "--namespace", topics.namespace]
        self.current: dict[str, Service] = {}
        self.starts: Counter[str] = Counter()
        self.faults: list[Fault] = []
        self.t0 = 0.0
        self.provider_port = 0
        self.broker_lock = threading.Lock()
        # Stands in for the reviewers: escalations wait for a person (or their deadline, minutes away).
        self.desk = ReviewDesk(broker.bootstrap, topics, keys)
        self._desk_polled = 0.0

    def args(self, role: str) -> list[str]:
        kind = role.split("-")[0]
        if kind == "provider":
            options = [f"--{k.replace('_', '-')}={v}" for k, v in PROVIDER_FAULTS.items()]
            return ["run", "provider", "--port", str(self.provider_port), "--seed", "11", *options]
        if kind == "decider":
            # Static membership: a restarted decider (or worker) takes its partitions back at once.
            return [*decider_args(self.common, self.keys), "--instance-id", role]
        if kind == "worker":
            return [
                "run",
                "worker",
                *self.common,
                "--simulated-url",
                self.provider_url,
                "--instance-id",
                role,
            ]
        return projector_args(self.common, self.keys, self.evidence)

    @property
    def provider_url(self) -> str:
        return f"http://127.0.0.1:{self.provider_port}/v1"

    def start(self, role: str) -> Service:
        self.starts[role] += 1
        name = role if self.starts[role] == 1 else f"{role}.{self.starts[role]}"
        service = self.services.start(name, *self.args(role))
        line = service.wait_for_line(READY[role.split("-")[0]], 90)
        if role == "provider" and not self.provider_port:
            self.provider_port = int(line.rsplit(":", 1)[1].split("/")[0])
        self.current[role] = service
        return service

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def record(
        self, at: float, utc: datetime, fault: str, detail: str, kind: str, ready_s: float | None = None
    ) -> None:
        self.faults.append(Fault(at, utc.isoformat(timespec="milliseconds"), fault, detail, kind, ready_s))
        print(f"[fault +{at:6.1f} s] {fault}: {detail}", flush=True)

    def kill_and_restart(self, role: str) -> None:
        victim = self.current[role]
        at, utc = self.now(), datetime.now(UTC)
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait(10)
        victim.stop()  # already dead: closes its log
        self.services.started.remove(victim)
        self.pause(DEAD_S)
        started = time.monotonic()
        new = self.start(role)
        ready = time.monotonic() - started
        self.record(
            at,
            utc,
            f"SIGKILL {victim.name} (pid {victim.proc.pid})",
            f"dead {DEAD_S:g} s, restarted as {new.name}, ready {ready:.1f} s later",
            role.split("-")[0],
            round(ready, 2),
        )

    def restart_broker(self) -> None:
        before = (self.broker.bootstrap, self.broker.data_dir)
        with self.broker_lock:
            at, utc = self.now(), datetime.now(UTC)
            started = time.monotonic()
            self.broker.restart()
            took = time.monotonic() - started
        assert (self.broker.bootstrap, self.broker.data_dir) == before, "the broker moved on restart"
        self.record(
            at,
            utc,
            "broker restart (SIGTERM, same ports and data)",
            f"answering again {took:.1f} s later on {self.broker.bootstrap}",
            "broker",
            round(took, 2),
        )

    def pause(self, seconds: float) -> None:
        """Sleep, but fail at once if a process died on its own (only faults may kill them); review
        the escalations pending meanwhile."""
        deadline = time.monotonic() + seconds
        while True:
            self.services.check()
            self.review()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.5, left))

    def review(self, every_s: float = 5.0) -> dict[str, int]:
        """Poll the evidence (at most every ``every_s``): the terminal summary, and a review for
        every escalation found pending."""
        if time.monotonic() - self._desk_polled < every_s:
            return {}
        self._desk_polled = time.monotonic()
        if not (self.evidence / "manifest.head.json").exists():
            return _summary(self.evidence)
        with EvidenceStore(self.evidence) as store:
            self.desk.poll(store)
            return store.terminal_summary()


def _summary(evidence: Path) -> dict[str, int]:
    if not (evidence / "manifest.head.json").exists():
        return {"requests": 0, "terminal": 0, "multiple_terminal": 0, "deadletters": 0}
    with EvidenceStore(evidence) as store:
        return store.terminal_summary()


def _wait_until_terminal(pipeline: Pipeline, expected: int, timeout_s: float, stall_s: float) -> str | None:
    """Like ``nexuscore._demo.wait_for_evidence`` (escalations reviewed on the way), but gives up
    early once nothing moves for ``stall_s`` and never raises: the checks that follow say what is
    missing. Returns why it stopped waiting, or None once every request has a terminal state."""
    deadline = time.monotonic() + timeout_s
    last, last_change = (-1, -1, -1), time.monotonic()
    summary = _summary(pipeline.evidence)
    while True:
        try:
            pipeline.services.check()
        except NexusError as exc:
            return f"a process died on its own: {exc}"
        summary = pipeline.review(every_s=0) or summary
        now = time.monotonic()
        if summary["terminal"] >= expected:
            return None
        progress = (summary["requests"], summary["terminal"], len(pipeline.desk.reviewed))
        if progress != last:
            last, last_change = progress, now
        elif now - last_change > stall_s:
            return f"no progress for {stall_s:.0f} s at {summary}"
        if now > deadline:
            return f"timed out after {timeout_s:.0f} s at {summary}"
        time.sleep(3)


def _settle(evidence: Path, timeout_s: float = 90) -> None:
    """Let the trailing events land: dead letters, and the settlement of every answered outcome."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with EvidenceStore(evidence) as store:
            letters = store.terminal_summary()["deadletters"]
            unsettled = store.query(
                "SELECT count(*) AS n FROM outcomes o ANTI JOIN settlements s USING (request_id) "
                "WHERE o.status = 'answered'"
            ).to_pylist()[0]["n"]
        if letters >= MALFORMED and unsettled == 0:
            return
        time.sleep(2)


# --- the checks, from the evidence ---------------------------------------------------------------

_EVENTS_SQL = """
SELECT request_id, occurred_at, 'request' AS event, producer, src_topic, src_partition, src_offset,
       concat(tenant_id, ' ', feature) AS detail
FROM requests WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'rejection', producer, src_topic, src_partition, src_offset, reason_code
FROM rejections WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'decision', producer, src_topic, src_partition, src_offset,
       concat(verdict, ' ', deployment_id, ' budget ', budget_action, ' event ', event_id)
FROM decisions WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'review', producer, src_topic, src_partition, src_offset,
       concat(action, ' by ', reviewer)
FROM reviews WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'resolution', producer, src_topic, src_partition, src_offset,
       concat(resolution, ' ', deployment_id, ' (', verdict_reason, ')')
FROM resolutions WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'dispatch', producer, src_topic, src_partition, src_offset,
       concat(deployment_id, ' in ', region)
FROM dispatches WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'attempt', producer, src_topic, src_partition, src_offset,
       concat(attempt, ' ', status, ' HTTP ', http_status, ' in ', region, ' ', left(error, 60))
FROM attempts WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'outcome', producer, src_topic, src_partition, src_offset,
       concat(status, ' in ', region, ' after ', attempts, ' attempt(s), ', cost_micros, ' micro-USD')
FROM outcomes WHERE list_contains($ids, request_id)
UNION ALL
SELECT request_id, occurred_at, 'settlement', producer, src_topic, src_partition, src_offset,
       concat('reserved ', reserved_micros, ' actual ', actual_micros, ' tenant spent ', tenant_spent_micros)
FROM settlements WHERE list_contains($ids, request_id)
ORDER BY request_id, occurred_at
"""


def _events(store: EvidenceStore, ids: list[str], limit: int = 5) -> str:
    """The first ``limit`` requests of ``ids`` with every event the evidence holds for each."""
    shown = sorted(ids)[:limit]
    lines = []
    by_request: dict[str, list[str]] = {rid: [] for rid in shown}
    for r in store.query(_EVENTS_SQL, {"ids": shown}).to_pylist():
        by_request[r["request_id"]].append(
            f"    {r['occurred_at']:%H:%M:%S.%f} {r['event']:<10} {r['src_topic']}[{r['src_partition']}]@"
            f"{r['src_offset']} by {r['producer']}: {r['detail']}"
        )
    for rid, events in by_request.items():
        lines.append(f"  {rid}:")
        lines.extend(events or ["    (no event at all in the evidence)"])
    more = f" (first {limit} of {len(ids)})" if len(ids) > limit else ""
    return f"{len(ids)} request(s){more}:\n" + "\n".join(lines)


# What every client logs while the broker restarts, and a busy decider's routine warnings: not a
# diagnosis.
_ROUTINE = re.compile(
    r"Unable connect|Failed fetch|Unable to update metadata|Unable to request metadata|NodeNotReady|"
    r"Got error produce response|Group Coordinator|coordinator dead|Heartbeat|Timer commit is overlapping|"
    r"producer buffer full|is now active"
)


def _decider_log_errors(log_dir: Path) -> str:
    lines = []
    for log in sorted(log_dir.glob("decider*.log")):
        found = [
            line
            for line in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if re.search(r"WARNING|ERROR|Traceback|Crash|Error:", line)
        ]
        noise = [line for line in found if _ROUTINE.search(line)]
        rest = [line for line in found if not _ROUTINE.search(line)]
        lines.append(
            f"  {log.name}: {len(rest)} warning/error line(s) besides {len(noise)} routine ones (broker away, slow commits)"
            + "".join(f"\n    {x[:200]}" for x in rest[:5])
        )
    return "\n".join(lines)


_HOW_FAR_SQL = """
SELECT CASE
         WHEN d.verdict IS NULL THEN 'no decision'
         WHEN d.verdict = 'escalated' AND v.request_id IS NOT NULL
             THEN 'escalated, review recorded, no resolution'
         WHEN d.verdict = 'escalated' THEN 'escalated, no review yet'
         WHEN o.request_id IS NULL THEN d.verdict || ', no outcome'
         ELSE d.verdict || ', other'
       END AS stage, count(*) AS n,
       list(v.src_partition || '@' || v.src_offset ORDER BY v.src_partition, v.src_offset)
           FILTER (WHERE v.request_id IS NOT NULL) AS review_positions
FROM (SELECT unnest($ids) AS request_id) l
LEFT JOIN (SELECT request_id, any_value(verdict) AS verdict FROM decisions GROUP BY 1) d USING (request_id)
LEFT JOIN reviews v USING (request_id)
LEFT JOIN (SELECT DISTINCT request_id FROM outcomes) o USING (request_id)
GROUP BY 1 ORDER BY 2 DESC
"""


def _budget(store: EvidenceStore, policy: RoutingPolicy) -> tuple[dict[str, Any], list[str]]:
    """Spent per tenant (and feature) and UTC day against its budget plus the largest single estimate.

    Spent is the larger of the decider's own running total (settlements) and the sum of the billed
    outcomes of the requests it dispatched in that window."""
    rows = store.query(
        """
        WITH est AS (
            -- What each dispatched request was estimated at: when decided, or when its escalation
            -- was approved and it resumed.
            SELECT request_id, tenant_id, feature, estimated_cost_micros AS estimate
            FROM decisions WHERE verdict = 'dispatch'
            UNION ALL
            SELECT request_id, tenant_id, feature, estimated_cost_micros
            FROM resolutions WHERE resolution = 'dispatched'
        ), win AS (
            SELECT e.request_id, coalesce(any_value(s.budget_window), any_value(d.budget_window))
                       AS budget_window
            FROM (SELECT DISTINCT request_id FROM est) e
            LEFT JOIN settlements s USING (request_id) LEFT JOIN decisions d USING (request_id)
            GROUP BY e.request_id
        ), d AS (
            SELECT request_id, any_value(tenant_id) AS tenant_id, any_value(feature) AS feature,
                   any_value(budget_window) AS budget_window, max(estimate) AS estimate
            FROM est JOIN win USING (request_id) GROUP BY request_id
        ), billed AS (
            SELECT d.tenant_id, d.feature, d.budget_window, CAST(sum(o.cost) AS BIGINT) AS billed
            FROM (SELECT request_id, max(cost_micros) AS cost FROM outcomes GROUP BY request_id) o
            JOIN d USING (request_id) GROUP BY ALL
        ), recorded AS (
            SELECT tenant_id, feature, budget_window, max(tenant_spent_micros) AS tenant_spent,
                   max(feature_spent_micros) AS feature_spent
            FROM settlements GROUP BY ALL
        ), largest AS (
            SELECT tenant_id, feature, budget_window, max(estimate) AS max_estimate FROM d GROUP BY ALL
        )
        SELECT * FROM largest LEFT JOIN billed USING (tenant_id, feature, budget_window)
        LEFT JOIN recorded USING (tenant_id, feature, budget_window)
        """
    ).to_pylist()
    tenants: dict[tuple[str, str], dict[str, int]] = {}
    checks: list[dict[str, Any]] = []
    for r in rows:
        tenant = policy.tenants_by_id[r["tenant_id"]]
        feature = next(f for f in tenant.features if f.id == r["feature"])
        spent = max(r["billed"] or 0, r["feature_spent"] or 0)
        checks.append(
            {
                "scope": f"{r['tenant_id']}/{r['feature']}",
                "day": r["budget_window"],
                "spent": spent,
                "budget": int(feature.daily_budget_usd * 1_000_000),
                "max_estimate": r["max_estimate"],
            }
        )
        t = tenants.setdefault(
            (r["tenant_id"], r["budget_window"]),
            {
                "billed": 0,
                "recorded": 0,
                "max_estimate": 0,
                "budget": int(tenant.daily_budget_usd * 1_000_000),
            },
        )
        t["billed"] += r["billed"] or 0
        t["recorded"] = max(t["recorded"], r["tenant_spent"] or 0)
        t["max_estimate"] = max(t["max_estimate"], r["max_estimate"])
    for (tenant_id, day), t in tenants.items():
        checks.append(
            {
                "scope": tenant_id,
                "day": day,
                "spent": max(t["billed"], t["recorded"]),
                "budget": t["budget"],
                "max_estimate": t["max_estimate"],
            }
        )
    problems = [
        f"{c['scope']} on {c['day']}: spent {c['spent']} > budget {c['budget']} + largest estimate "
        f"{c['max_estimate']} micro-USD"
        for c in checks
        if c["spent"] > c["budget"] + c["max_estimate"]
    ]
    if not checks:
        return {"scopes_checked": 0, "max_overshoot_micros": 0}, ["no dispatched request to check budgets on"]
    worst = max(checks, key=lambda c: c["spent"] - c["budget"])
    figures = {
        "scopes_checked": len(checks),
        "max_overshoot_micros": max(0, worst["spent"] - worst["budget"]),
        "worst_scope": worst,
        "tenant_days": {
            f"{c['scope']} {c['day']}": {k: c[k] for k in ("spent", "budget", "max_estimate")}
            for c in checks
            if "/" not in c["scope"]
        },
    }
    return figures, problems


def _residency(store: EvidenceStore, policy: RoutingPolicy) -> tuple[dict[str, Any], list[str]]:
    """The residency report (calls against the decision's allowed regions), and the same worked out
    independently from the policy and the request, so that a wrong decision cannot hide a breach."""
    report = store.residency().to_pylist()
    breaches = [r for r in report if r["finding"] != "cross_border"]
    calls = store.query(
        "SELECT c.request_id, c.event, c.region, r.tenant_id, r.data_classification FROM ("
        "SELECT request_id, 'attempt' AS event, region FROM attempts UNION ALL "
        "SELECT request_id, 'outcome', region FROM outcomes) c JOIN requests r USING (request_id)"
    ).to_pylist()
    outside = []
    for c in calls:
        tenant = policy.tenants_by_id[c["tenant_id"]]
        rule = policy.residency_by_class[c["data_classification"]]
        allowed = {tenant.home_region if r == "home" else r for r in rule.allowed}
        if c["region"] not in allowed:
            outside.append(c)
    problems = []
    if breaches:
        ids = sorted({r["request_id"] for r in breaches})
        kinds = Counter(r["finding"] for r in breaches)
        problems.append(f"residency report: {dict(kinds)} for {len(ids)} request(s): {ids[:5]}")
    if outside:
        ids = sorted({c["request_id"] for c in outside})
        problems.append(
            f"calls outside the policy's allowed regions for {len(ids)} request(s): {outside[:5]}"
        )
    figures = {
        "calls_checked": len(calls),
        "cross_border_calls_with_basis": sum(r["finding"] == "cross_border" for r in report),
        "outside_allowed_regions": len(breaches) + len(outside),
    }
    return figures, problems


def _verify(evidence: Path, public_key: Path) -> tuple[dict[str, Any], list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "nexuscore", "evidence", "verify", "-e", str(evidence), "--public-key", str(public_key)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    lines = done.stdout.strip().splitlines()
    figures = {"exit_code": done.returncode, "summary": lines[-2:] if lines else [done.stderr.strip()]}
    problems = (
        []
        if done.returncode == 0 and "OK: complete and unaltered" in done.stdout
        else [
            f"nexuscore evidence verify exited {done.returncode}: {' | '.join(lines[-12:])} {done.stderr[-500:]}"
        ]
    )
    return figures, problems


def _analyse(
    evidence: Path, published: list[str], policy: RoutingPolicy, public_key: Path, log_dir: Path
) -> tuple[dict[str, Any], list[str]]:
    """Every check, from the evidence alone: the figures, and a description of each problem."""
    problems: list[str] = []
    figures: dict[str, Any] = {}
    with EvidenceStore(evidence) as store:
        store.con.register("published", pa.table({"request_id": published}))
        summary = store.terminal_summary()
        figures["evidence"] = summary

        def ids(sql: str) -> list[str]:
            return [r["request_id"] for r in store.query(sql).to_pylist()]

        unrecorded = ids("SELECT request_id FROM published ANTI JOIN requests USING (request_id)")
        lost = ids("SELECT request_id FROM published ANTI JOIN terminal_states USING (request_id)")
        strangers = ids("SELECT DISTINCT request_id FROM requests ANTI JOIN published USING (request_id)")
        doubled = ids(
            "SELECT request_id FROM terminal_states GROUP BY request_id HAVING count(*) > 1 ORDER BY 1"
        )
        figures["evidence"] |= {
            "published": len(published),
            "not_in_requests_table": len(unrecorded),
            "without_terminal_state": len(lost),
            "with_two_or_more_terminal_states": len(doubled),
        }
        if unrecorded:
            problems.append(f"published but not in the requests table: {_events(store, unrecorded)}")
        if lost:
            partitions = store.query(
                "SELECT src_partition AS p, count(*) AS n, min(src_offset) AS first, max(src_offset) AS last "
                "FROM requests WHERE list_contains($ids, request_id) GROUP BY 1 ORDER BY 1",
                {"ids": lost},
            ).to_pylist()
            how_far = store.query(_HOW_FAR_SQL, {"ids": lost}).to_pylist()
            problems.append(
                f"LOST (no terminal state): {_events(store, lost)}\n  how far they got: {how_far}"
                f"\n  by partition of the requests topic: {partitions}"
                f"\n  decider logs:\n{_decider_log_errors(log_dir)}"
            )
        if strangers:
            problems.append(f"requests in the evidence that were never published: {strangers[:5]}")
        if doubled:
            problems.append(f"TWO OR MORE terminal states: {_events(store, doubled)}")

        # From the evidence, not the polling: the first request's time to the last terminal state's.
        duration = store.query(
            "SELECT epoch((SELECT max(occurred_at) FROM terminal_states))"
            " - epoch((SELECT min(occurred_at) FROM requests)) AS s"
        ).to_pylist()[0]["s"]
        figures["duration_s"] = round(duration, 1)
        figures["throughput_rps"] = round(len(published) / duration, 1)
        figures["terminal_states"] = {
            r["state"]: r["n"]
            for r in store.query(
                "SELECT state, count(*) AS n FROM terminal_states GROUP BY 1 ORDER BY 2 DESC"
            ).to_pylist()
        }
        figures["attempts"] = store.query(
            """
            SELECT count(*) AS attempts,
                   count(*) FILTER (WHERE attempt > 1) AS retries,
                   count(*) FILTER (WHERE status = 'error') AS failed_attempts,
                   count(*) FILTER (WHERE http_status = 503) AS http_503,
                   count(*) FILTER (WHERE http_status = 429) AS http_429,
                   count(*) FILTER (WHERE error LIKE '%timed out%' AND latency_ms >= 29000) AS timeouts,
                   -- Everything else without an HTTP status: no connection (the provider down).
                   count(*) FILTER (WHERE status = 'error' AND http_status IS NULL
                                    AND NOT (error LIKE '%timed out%' AND latency_ms >= 29000))
                       AS connection_errors,
                   count(*) FILTER (WHERE status = 'ok' AND latency_ms >= 2000) AS slow_ok_calls_over_2s,
                   count(DISTINCT request_id) AS requests_called
            FROM attempts
            """
        ).to_pylist()[0]
        figures["outcomes"] = {
            r["status"]: r["n"]
            for r in store.query("SELECT status, count(*) AS n FROM outcomes GROUP BY 1").to_pylist()
        }
        figures["failed_outcomes_by_cause"] = {
            r["cause"]: r["n"]
            for r in store.query(
                """
                SELECT CASE WHEN error LIKE '%circuit open%' THEN 'circuit open'
                            WHEN error LIKE '%bulkhead%' THEN 'bulkhead full'
                            WHEN error LIKE '%timed out%' THEN 'timed out'
                            WHEN error LIKE '%no connection%' THEN 'no connection (provider down)'
                            WHEN error LIKE '%HTTP 503%' THEN 'HTTP 503'
                            WHEN error LIKE '%HTTP 429%' THEN 'HTTP 429'
                            ELSE left(error, 60) END AS cause, count(*) AS n
                FROM outcomes WHERE status = 'failed' GROUP BY 1 ORDER BY 2 DESC
                """
            ).to_pylist()
        }
        figures["escalations"] = {
            r["review_state"]: r["n"]
            for r in store.query(
                "SELECT review_state, count(*) AS n FROM escalations GROUP BY 1 ORDER BY 2 DESC"
            ).to_pylist()
        }
        figures["budget"], budget_problems = _budget(store, policy)
        figures["residency"], residency_problems = _residency(store, policy)
    problems += budget_problems + residency_problems
    figures["verify"], verify_problems = _verify(evidence, public_key)
    problems += verify_problems
    return figures, problems


# --- the figures -----------------------------------------------------------------------------------


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return f"{head.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _beyond(fault: dict[str, Any]) -> float | None:
    """A restarted process's stall beyond the time it was dead and starting up."""
    if fault["stall_s"] is None or fault["ready_s"] is None or fault["kind"] in ("broker", "projector"):
        return None
    return max(fault["stall_s"] - DEAD_S - fault["ready_s"], 0.0)


def _markdown(f: dict[str, Any]) -> str:
    ev, att, bud, res = f["evidence"], f["attempts"], f["budget"], f["residency"]
    states = ", ".join(f"{k} {v:,}" for k, v in f["terminal_states"].items())
    outcomes = ", ".join(f"{k} {v:,}" for k, v in sorted(f["outcomes"].items()))
    failed = ", ".join(f"{k} {v:,}" for k, v in f["failed_outcomes_by_cause"].items()) or "none"
    escalations = ", ".join(f"{k} {v:,}" for k, v in f["escalations"].items()) or "none"
    lines = [
        "# Fault injection",
        "",
        f"Run of {f['started_utc'][:10]} (commit `{f['commit']}`, `{f['command']}`): "
        f"{f['requests']:,} requests in {len(f['waves'])} waves through 2 deciders, 2 workers, 1 projector and "
        f"1 simulated provider ({f['provider_faults']}), on one local KRaft broker, on {os.cpu_count()} cores.",
        "",
        "| | |",
        "|---|---|",
        f"| requests published / in the evidence / with a terminal state | {ev['published']:,} / {ev['requests']:,} / {ev['terminal']:,} |",
        f"| **lost** (no terminal state) | **{ev['without_terminal_state']:,}** |",
        f"| **two or more terminal states** | **{ev['with_two_or_more_terminal_states']:,}** |",
        f"| **calls outside the allowed regions** | **{res['outside_allowed_regions']:,}** (of {res['calls_checked']:,} calls; {res['cross_border_calls_with_basis']:,} cross-border with a transfer basis) |",
        f"| **largest budget overshoot** | **{bud['max_overshoot_micros']:,} micro-USD** ({bud['scopes_checked']} tenant and feature days checked; allowed: the largest single estimate) |",
        f"| `nexuscore evidence verify` | exit {f['verify']['exit_code']}: {' '.join(f['verify']['summary'])} |",
        f"| duration (first request published → last terminal state, from the evidence) | {f['duration_s']:.1f} s |",
        f"| throughput over that time, faults and recoveries included | {f['throughput_rps']:.1f} requests/s |",
        f"| terminal states | {states} |",
        f"| outcomes | {outcomes} |",
        f"| failed outcomes by cause | {failed} |",
        f"| escalations, by review state (reviewed by a stand-in desk, about half approved) | {escalations} |",
        f"| attempts / retries / failed attempts | {att['attempts']:,} / {att['retries']:,} / {att['failed_attempts']:,} |",
        f"| failed attempts: 503 / 429 / timeouts (30 s) / connection failures (provider down) | {att['http_503']:,} / {att['http_429']:,} / {att['timeouts']:,} / {att['connection_errors']:,} |",
        f"| calls answered after ≥ 2 s (latency spikes) | {att['slow_ok_calls_over_2s']:,} |",
        f"| dead letters (4 malformed messages sent) | {ev['deadletters']} |",
        "",
        "Faults (seconds after the first request was published):",
        "",
        "| at | fault | detail | stood still (s) | of which beyond dead time and start-up (s) |",
        "|---:|---|---|---:|---:|",
        *(
            f"| {x['at_s']:.1f} s | {x['fault']} | {x['detail']} | {_seconds(x['stall_s'])} | {_seconds(_beyond(x))} |"
            for x in f["faults"]
        ),
        "",
        "*Stood still*: from the fault until the last tenant partition that had work waiting and completed "
        "none completed some again (deciders: requests waiting for a decision; workers and provider: "
        "dispatches waiting for an outcome; broker and projector: both, which the projector must not hold "
        "up); idle time is not counted; see `tests/fault/_stalls.py`.",
        "",
        f"Waves (seconds after the first, requests): {', '.join(f'{a:g} s: {n:,}' for a, n in f['waves'])}.",
        "",
        f"Result: **{'all checks passed' if not f['problems'] else 'FAILED: ' + str(len(f['problems'])) + ' problem(s)'}**"
        + ("" if not f["problems"] else "\n\n```\n" + "\n".join(f["problems"])[:6000] + "\n```"),
        "",
    ]
    return "\n".join(lines)


# --- the test ----------------------------------------------------------------------------------------


def test_no_request_lost_or_doubled_under_process_kills_broker_restart_and_provider_faults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The services' logs then say when each joined its group and what it restored: the post-mortem
    # of a stall.
    monkeypatch.setenv("NEXUSCORE_LOG_LEVEL", "INFO")
    policy = default_policy()
    run = uuid.uuid4().hex[:8]
    topics = Topics(f"fault-{run}.")
    evidence = tmp_path / "evidence"
    log_dir = evidence / "_logs"
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    # Our own broker, not the session's: this test restarts it.
    broker = LocalKafka(ensure_kafka_jars())
    broker.start()
    stop_reason: str | None = None
    try:
        asyncio.run(ensure_topics(broker.bootstrap, topics))
        with Services(log_dir) as services:
            pipeline = Pipeline(broker, services, topics, keys, evidence)
            pipeline.start("provider")
            # One decider first: it publishes the bootstrap policy the second one then finds.
            for role in ("decider-a", "decider-b", "worker-a", "worker-b", "projector"):
                pipeline.start(role)
            publisher = Publisher(broker.bootstrap, topics, policy, run, pipeline.broker_lock)
            publisher.start()
            pipeline.t0 = time.monotonic()
            print(f"\nfault run {run}: {REQUESTS} requests; logs in {log_dir}", flush=True)
            try:
                # Faults begin once requests are flowing end to end.
                while _summary(evidence)["terminal"] < min(100, REQUESTS // 20):
                    pipeline.pause(2)
                    assert pipeline.now() < 300, "no request reached a terminal state within 300 s"
                seen = len(publisher.waves)
                for fault in (
                    lambda: pipeline.kill_and_restart("decider-a"),
                    lambda: pipeline.kill_and_restart("worker-a"),
                    lambda: pipeline.kill_and_restart("projector"),
                    lambda: pipeline.kill_and_restart("provider"),
                    pipeline.restart_broker,
                    lambda: pipeline.kill_and_restart("decider-b"),
                ):
                    # Every fault strikes a backlog: just after a wave is out, while its requests
                    # are being decided and called (a stage killed while idle shows no stall).
                    seen = publisher.next_wave(seen, timeout_s=2 * WAVE_GAP_S)
                    pipeline.pause(FAULT_DELAY_S)
                    fault()
                pipeline.pause(FAULT_GAP_S)  # the last fault's recovery, before the last wave
            except NexusError as exc:  # a process died without being killed: still look at the evidence
                stop_reason = f"during the faults: {exc}"
            finally:
                publisher.release_last.set()
                publisher.join(120)
                publisher.stop.set()
            if publisher.error is not None:
                raise publisher.error
            assert len(publisher.ids) == REQUESTS, f"published {len(publisher.ids)} of {REQUESTS}"
            if stop_reason is None:
                stop_reason = _wait_until_terminal(
                    pipeline, REQUESTS, timeout_s=max(900.0, REQUESTS * 0.1), stall_s=240.0
                )
            if stop_reason is None:
                _settle(evidence)
        faults = [(datetime.fromisoformat(f.utc).timestamp(), f.kind) for f in pipeline.faults]
        measured = stalls(broker.bootstrap, topics.requests, topics.decisions, topics.outcomes, faults)
        for fault, stall in zip(pipeline.faults, measured, strict=True):
            fault.stall_s = round(stall, 2)
        # Every service stopped (the projector's last flush sealed): the evidence no longer moves.
        figures, problems = _analyse(evidence, publisher.ids, policy, keys.evidence_public, log_dir)
    finally:
        if broker.log_path is not None and broker.log_path.exists():
            shutil.copyfile(broker.log_path, log_dir / "broker.log")
        broker.stop()
    if stop_reason is not None:
        problems.insert(0, f"stopped waiting: {stop_reason}")

    figures = {
        "started_utc": started_utc,
        "commit": _commit(),
        "command": f"FAULT_REQUESTS={REQUESTS} make fault",
        "requests": REQUESTS,
        "provider_faults": ", ".join(f"{k} {v:g}" for k, v in PROVIDER_FAULTS.items()),
        "waves": publisher.waves,
        "faults": [asdict(x) for x in pipeline.faults],
        **figures,
        "log_dir": str(log_dir),
        "problems": problems,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fault.json").write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = _markdown(figures)
    (RESULTS / "fault.md").write_text(markdown, encoding="utf-8")
    print("\n" + markdown, flush=True)
    assert not problems, "\n\n".join(problems)
