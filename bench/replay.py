"""The replay benchmark: recorded decisions re-decided per second, per core.

``python -m bench.replay [--requests N]`` records a history of N synthetic requests (the core's own
steps, escalations and their reviews, outcomes out of order, a budget tight enough to deny),
generated and projected in chunks into a sealed evidence store with the projector's code path (so a
1,000,000-request store fits in memory), checks the store with ``verify``, then times on one
process, in the same run:

1. **replay, counterfactual** (``replay(store, candidate)``, the candidate with other budgets),
2. **replay, verify** (``replay(store, None, recorded_policies=...)``: every decision must match,
   every delta must be exactly zero, or the benchmark fails),
3. **baseline**: the simplest correct loop, ``decide(request, policy, state, now)`` over the same
   recorded requests (read from the store in chunks, the reading not timed), with no ordering,
   budget folding or comparison: the core's own cost per decision.

Figures: CPU seconds of the process (DuckDB's threads included) per decision, which is stable on a
busy machine, and wall seconds; each replay's speed as a multiple of the baseline's. If the target
is missed, a cProfile of the counterfactual replay is put in the results. Results:
``bench/results/replay.{json,md}``. Target (issue 13): >= 200,000 decisions/s on one core; a
1,000,000-request replay in < 10 s.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import platform
import pstats
import random
import shutil
import sys
import tempfile
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import ConsumerRecord

from bench._harness import git_commit, own_cpu_s, run_main, table
from nexuscore._synthetic import synthetic_requests
from nexuscore.core import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    decide,
    derive_id,
    on_outcome,
    on_request,
    on_review,
)
from nexuscore.kernel.clock import FixedClock
from nexuscore.policy import RoutingPolicy
from nexuscore.projections import EvidenceStore, Projector, verify
from nexuscore.replay import ReplayReport, fold_history, load_history, replay
from nexuscore.schemas import (
    AvroCodec,
    DispatchRequested,
    Event,
    InferenceRequested,
    OutcomeRecorded,
    RequestDecided,
    ReviewRecorded,
)
from nexuscore.transport import Topics
from tests.factories import _TOPIC_OF, POLICY, T0, _key_of, signing_key, with_budgets

TARGET_PER_CORE = 200_000
TARGET_1M_S = 10.0
CHUNK = 50_000


class _Recorder:
    """What the decider and the workers would have recorded, chunk by chunk: budget states carry
    over, every chunk's calls are answered (out of order) before the next chunk starts."""

    def __init__(self, policy: RoutingPolicy, seed: int) -> None:
        self.policy, self.rng = policy, random.Random(seed)
        self.states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
        self.held: dict[str, Reservation] = {}

    def chunk(self, requests: list[InferenceRequested]) -> list[Event]:
        events: list[Event] = []
        in_flight: list[DispatchRequested] = []
        for req in requests:
            self.states[req.tenant_id], reservation, out = on_request(
                self.states[req.tenant_id], req, self.policy, "decider", req.occurred_at
            )
            if reservation is not None:
                self.held[req.request_id] = reservation
            events += [req, *out]
            if isinstance(out[0], RequestDecided) and out[0].verdict == "escalated":
                out = self._review(req, out[0])
                events += out
            in_flight += [e for e in out if isinstance(e, DispatchRequested)]
            while in_flight and self.rng.random() < 0.5:
                events += self._finish(in_flight.pop(self.rng.randrange(len(in_flight))))
        while in_flight:
            events += self._finish(in_flight.pop())
        return events

    def _review(self, req: InferenceRequested, escalated: RequestDecided) -> list[Event]:
        assert escalated.review_deadline is not None
        action = self.rng.choice(["approved", "denied", "timed_out"])
        late = action == "timed_out"
        at = escalated.review_deadline + timedelta(seconds=1) if late else escalated.occurred_at
        review = ReviewRecorded(
            event_id=derive_id(req.request_id, "review"), request_id=req.request_id, tenant_id=req.tenant_id,
            occurred_at=at, producer="reviewer", action=action,  # type: ignore[arg-type]  # one of the three
            reviewer="nexuscore.decider" if late else "carol@bank", reason=action, deadline=escalated.review_deadline,
        )  # fmt: skip
        self.states[req.tenant_id], reservation, out = on_review(
            self.states[req.tenant_id], req, escalated, review, self.policy, "decider", at
        )
        if reservation is not None:
            self.held[req.request_id] = reservation
        return [review, *out]

    def _finish(self, d: DispatchRequested) -> list[Event]:
        out_tokens = self.rng.randint(1, d.max_output_tokens)
        cost = -(-(8 * d.input_price_micros_per_1k + out_tokens * d.output_price_micros_per_1k) // 1000)
        outcome = OutcomeRecorded(
            event_id=derive_id(d.event_id, "outcome"), request_id=d.request_id, tenant_id=d.tenant_id,
            occurred_at=d.occurred_at, producer="w", status="answered", feature=d.feature,
            deployment_id=d.deployment_id, model=d.model, model_version="v", region=d.region, attempts=1,
            input_tokens=8, output_tokens=out_tokens, cost_micros=cost, latency_ms=3.0, response="r",
            finish_reason="stop",
        )  # fmt: skip
        self.states[d.tenant_id], settled = on_outcome(
            self.states[d.tenant_id], self.held.pop(d.request_id), outcome, "decider", d.occurred_at
        )
        return [outcome, *settled]


def record_store(root: Path, policy: RoutingPolicy, requests: int, seed: int) -> int:
    """Generate and project ``requests`` requests' history into ``root``; the number of events."""
    topics, codec = Topics(), AvroCodec()
    projector = Projector(
        "unused:9092", root, signing_key(), FixedClock(T0),
        regions={t.id: t.home_region for t in policy.tenants}, topics=topics,
    )  # fmt: skip
    projector.recover()
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    recorder, events = _Recorder(policy, seed), 0
    for n, first in enumerate(range(0, requests, CHUNK)):
        start = T0 + timedelta(milliseconds=first)
        chunk = synthetic_requests(
            policy, min(CHUNK, requests - first), seed=seed + n, start=start, run=f"bench-{n}"
        )
        batches: dict[Any, Any] = {}
        for e in recorder.chunk(chunk):
            topic = getattr(topics, _TOPIC_OF[type(e).__name__])
            key = _key_of(e)
            partition = zlib.crc32(key) % 2
            offset = offsets[(topic, partition)]
            offsets[(topic, partition)] += 1
            record = ConsumerRecord(
                topic=topic, partition=partition, offset=offset, timestamp=int(e.occurred_at.timestamp() * 1000),
                timestamp_type=1, key=key, value=codec.encode(e), checksum=None, serialized_key_size=0,
                serialized_value_size=0, headers=(),
            )  # fmt: skip
            projector.add(batches, record)
            events += 1
        projector.flush(batches)
    return events


def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), own_cpu_s()
    out = fn()
    return out, time.perf_counter() - wall, own_cpu_s() - cpu


_REQUEST_ROWS = (
    "SELECT tenant_id, request_id, feature, task_type, risk_class, data_classification, "
    "required_capabilities, complexity, prompt_chars, max_output_tokens, latency_slo_ms, occurred_at "
    "FROM requests ORDER BY tenant_id, src_partition, src_offset LIMIT $n OFFSET $at"
)


def baseline(store: EvidenceStore, policy: RoutingPolicy, total: int) -> tuple[float, float]:
    """A bare ``decide()`` loop over the recorded requests: (wall, CPU) seconds of the loops only."""
    wall = cpu = 0.0
    for at in range(0, total, CHUNK):
        rows = store.query(_REQUEST_ROWS, {"n": CHUNK, "at": at}).to_pylist()
        reqs = [
            InferenceRequested(
                event_id="b", producer="bench", prompt="x" * max(1, r.pop("prompt_chars")), **r
            )
            for r in rows
        ]
        _, w, c = _timed(lambda reqs=reqs: [decide(r, policy, EMPTY_STATE, r.occurred_at) for r in reqs])
        wall, cpu = wall + w, cpu + c
    return wall, cpu


def _profile(store: EvidenceStore, candidate: RoutingPolicy) -> str:
    profiler = cProfile.Profile()
    profiler.runcall(replay, store, candidate)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(12)
    return out.getvalue()


def _replays(store: EvidenceStore, policy: RoutingPolicy, candidate: RoutingPolicy) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    report, wall, cpu = _timed(lambda: replay(store, candidate))
    figures["counterfactual"] = {
        "wall_s": wall,
        "cpu_s": cpu,
        "requests": report.requests,
        "changed": report.changed,
    }
    report, wall, cpu = _timed(lambda: replay(store, None, recorded_policies={policy.digest: policy}))
    exact = (
        report.changed,
        report.context_differences,
        report.estimated_delta_micros,
        report.actual_delta_micros,
    )
    if exact != (0, 0, 0, 0):
        raise AssertionError(f"the identity replay is not exact: {report.summary()}")
    figures["verify"] = {"wall_s": wall, "cpu_s": cpu, "requests": report.requests, "changed": report.changed}
    # Where a counterfactual replay's time goes: reading the evidence, then the fold over it.
    history, wall, cpu = _timed(lambda: load_history(store, None, None, None, digests=False))
    figures["counterfactual: reading"] = {"wall_s": wall, "cpu_s": cpu, "requests": history.requests.rows}
    empty = ReplayReport(policy_version=candidate.version, policy_digest=candidate.digest)
    _, wall, cpu = _timed(lambda: fold_history(history, candidate, None, empty, 1000))
    figures["counterfactual: fold"] = {"wall_s": wall, "cpu_s": cpu, "requests": history.requests.rows}
    return figures


def run(requests: int, keep: Path | None) -> dict[str, Any]:
    policy = with_budgets(POLICY, "2", "1")
    candidate = with_budgets(POLICY, "1.5", "0.6")
    scratch = Path(tempfile.mkdtemp(prefix="nexuscore-bench-replay-"))
    root = keep or scratch / "evidence"
    try:
        built = None
        if not (root / "manifest.jsonl").exists():
            built = _timed(lambda: record_store(root, policy, requests, seed=42))
        checked = verify(root, signing_key().public_key(), {policy.digest})
        with EvidenceStore(root) as store:
            figures = _replays(store, policy, candidate)
            wall, cpu = baseline(store, policy, figures["verify"]["requests"])
            figures["baseline_decide_loop"] = {
                "wall_s": wall,
                "cpu_s": cpu,
                "requests": figures["verify"]["requests"],
            }
            for f in figures.values():
                f["decisions_per_s_per_core"] = round(f["requests"] / f["cpu_s"])
                f["cpu_us_per_decision"] = round(1e6 * f["cpu_s"] / f["requests"], 2)
            slowest = min(
                figures["counterfactual"]["decisions_per_s_per_core"],
                figures["verify"]["decisions_per_s_per_core"],
            )
            profile = _profile(store, candidate) if slowest < TARGET_PER_CORE else ""
    finally:
        if keep is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return {
        "benchmark": "replay",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "loadavg": os.getloadavg()},
        "requests": requests,
        "events": built[0] if built else None,
        "build_s": round(built[1], 1) if built else None,
        "store_verifies": checked.ok,
        "store_findings": len(checked.findings),
        "figures": figures,
        "target_decisions_per_s_per_core": TARGET_PER_CORE,
        "profile": profile,
    }


def render(r: dict[str, Any]) -> str:
    base = r["figures"]["baseline_decide_loop"]
    rows = [
        (
            name, f"{f['requests']:,}", f"{f['decisions_per_s_per_core']:,}", f"{f['cpu_us_per_decision']:.2f}",
            f"{f['cpu_s']:.2f}", f"{f['wall_s']:.2f}", f"{base['cpu_s'] / f['cpu_s']:.1f} x",
        )
        for name, f in r["figures"].items()
    ]  # fmt: skip
    built = (
        f"generated and projected in {r['build_s']} s"
        if r["build_s"] is not None
        else "kept from an earlier run"
    )
    lines = [
        "# Replay benchmark",
        "",
        f"`python -m bench.replay --requests {r['requests']}` at {r['date']}, commit `{r['commit']}`, "
        f"{r['machine']['cores']} cores (load average {', '.join(f'{x:.1f}' for x in r['machine']['loadavg'])}), "
        f"Python {r['machine']['python']}. History: {r['requests']:,} requests ({built}); "
        f"`verify` on the store: {'ok' if r['store_verifies'] else 'FAILED'}, {r['store_findings']} findings.",
        "",
        *table(
            (
                "run",
                "requests",
                "decisions/s per core (CPU)",
                "CPU µs per decision",
                "CPU s",
                "wall s",
                "vs the bare decide() loop (CPU)",
            ),
            rows,
        ),
        "",
        f"Target: >= {r['target_decisions_per_s_per_core']:,} decisions/s per core, 1,000,000 in < {TARGET_1M_S:.0f} s. "
        "CPU is the whole process's (DuckDB's reading threads included); the replays include reading "
        "the evidence, the baseline does not. Verify mode reproduced every decision with every delta exactly 0. "
        "The counterfactual replay runs first in the process (cold: its memory touched for the first "
        "time, page faults counted as system CPU, first-use caches filled) and releases its history; the "
        "reading and the fold are timed after both replays (warm) and keep it: their sum and the first "
        "replay's time are not measured alike.",
    ]
    if r["profile"]:
        lines += [
            "",
            "Target missed: cProfile of the counterfactual replay (tottime, profiler overhead included):",
            "",
            "```",
            r["profile"].strip(),
            "```",
        ]
    return "\n".join([*lines, ""])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1_000_000, help="Recorded requests to replay.")
    parser.add_argument("--keep", type=Path, default=None, help="Build the store here once and reuse it.")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return run_main("replay", lambda: run(args.requests, args.keep), render, lambda r: print(render(r)))


if __name__ == "__main__":
    sys.exit(main())
