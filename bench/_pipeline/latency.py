"""Phase 3, gateway-added latency: requests paced at R/s for S s through a fresh pipeline.

Each request is stamped with the wall clock right before it is sent; the added latency of a request is
Kafka's record timestamp of its dispatch (set by the decider when it sends it) minus that stamp, and
the decider's own part is that timestamp minus the broker's append time of the request (the
dispatch's ``occurred_at``). The dispatches are read back after the run, so the reader does not compete with the
decider for the CPU. When the decider dispatches more slowly than requests arrive, a queue builds up
and the figures measure that queue: ``decider_kept_up`` says which case a run is. Requests the policy
escalates are dispatched only once a person approves them: those dispatches are counted apart
(``dispatched_after_review``), their wait is the review's.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from bench._harness import BenchError, CpuMeter, loadavg
from bench._pipeline.params import FLOOR_RPS, LATE_MS, Params
from bench._pipeline.stages import peak_rss, running_pipeline, stage_pids, wait_for_terminal, warm_up
from nexuscore._demo import ReviewDesk
from nexuscore._synthetic import synthetic_requests
from nexuscore.core import derive_id
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec, DispatchRequested, InferenceRequested, RequestDecided
from nexuscore.transport import DEFAULT_PARTITIONS, Topics, new_producer, start_client


async def publish_paced(
    bootstrap: str, topic: str, requests: Sequence[InferenceRequested], rate: float
) -> tuple[dict[str, Any], dict[str, float]]:
    """Send ``requests`` at ``rate`` per second, each stamped with the wall clock just before sending;
    return the pacing figures and each request's send time (epoch seconds, by request id)."""
    # What earlier phases left in this process (their requests, results, clients) is not garbage for
    # the pacing to walk: a collection over it would hold sends back, then send them in a burst. (Its
    # effect is within the runs' noise: p50 7.8 and 11.5 ms after the other phases, 10.2-17.2 before.)
    gc.collect()
    gc.freeze()
    try:
        return await _paced(bootstrap, topic, requests, rate)
    finally:
        gc.unfreeze()


async def _paced(
    bootstrap: str, topic: str, requests: Sequence[InferenceRequested], rate: float
) -> tuple[dict[str, Any], dict[str, float]]:
    codec = AvroCodec()
    # No linger: the client batching on purpose would be counted as gateway latency.
    producer = new_producer(bootstrap, linger_ms=0)
    await start_client(producer, bootstrap)
    futures = []
    sent: dict[str, float] = {}
    late = 0
    worst_lag = 0.0
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        first = last = start
        for i, request in enumerate(requests):
            # Absolute schedule: a late send is followed by catch-up sends, so the mean rate holds.
            target = start + i / rate
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = loop.time() - target
            worst_lag = max(worst_lag, lag)
            late += lag * 1000 > LATE_MS
            stamped = msgspec.structs.replace(request, occurred_at=datetime.now(UTC))
            sent[stamped.request_id] = stamped.occurred_at.timestamp()
            futures.append(await producer.send(topic, codec.encode(stamped), key=stamped.tenant_id.encode()))
            if i == 0:
                first = loop.time()
            last = loop.time()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    span = last - first
    return _pacing(rate, len(requests), span, late, worst_lag), sent


def _pacing(rate: float, n: int, span: float, late: int, worst_lag: float) -> dict[str, Any]:
    return {
        "offered_per_s": rate,
        "sent": n,
        "send_span_s": round(span, 3),
        "achieved_per_s": round((n - 1) / span, 1) if span > 0 else None,
        "late_sends": late,
        "late_threshold_ms": LATE_MS,
        "worst_lag_ms": round(worst_lag * 1000, 1),
    }


@dataclass(frozen=True)
class Dispatch:
    """One request's times, in s: sent by the client (its ``occurred_at``), appended by the broker
    (the dispatch's ``occurred_at``: the decider times a decision by its input record's
    LogAppendTime), and its dispatch produced by the decider (the dispatch record's timestamp: the
    broker's LogAppendTime, as on every topic)."""

    requested_s: float
    appended_s: float
    record_s: float

    @property
    def added_ms(self) -> float:
        """Sent by the client -> dispatch produced: what the gateway adds, the client's send included."""
        return (self.record_s - self.requested_s) * 1000

    @property
    def decider_ms(self) -> float:
        """Appended by the broker -> dispatch produced: the decider's part alone."""
        return (self.record_s - self.appended_s) * 1000


async def _read_topic(bootstrap: str, topic: str, timeout_s: float, take: Callable[[Any], None]) -> None:
    """Hand every record's value of ``topic``, from its start to its current end, to ``take`` (no
    consumer group)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await start_client(consumer, bootstrap)
    try:
        # The topic was created by ensure_topics with this count and checked by await_topics.
        tps = [TopicPartition(topic, p) for p in range(DEFAULT_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        remaining = {tp for tp in tps if end[tp] > 0}
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise BenchError(f"reading {topic} back did not reach its end within {timeout_s:.0f} s")
            batches = await consumer.getmany(*remaining, timeout_ms=200, max_records=10_000)
            for tp, records in batches.items():
                for r in records:
                    take(r)
                if records and records[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()


async def read_dispatches(
    bootstrap: str, topics: Topics, wanted: set[str], timeout_s: float
) -> tuple[list[Dispatch], list[Dispatch]]:
    """The dispatches of ``wanted`` requests: those the decider sent on its own decision, and those
    it sent once a person approved an escalation (their time is the review's, not the gateway's)."""
    codec = AvroCodec()
    escalated: set[str] = set()
    found: list[tuple[str, Dispatch]] = []

    def decision(record: Any) -> None:
        if b"escalated" in record.value:  # a cheap filter before decoding: the verdict's text
            d = codec.decode(record.value)
            if isinstance(d, RequestDecided) and d.verdict == "escalated" and d.request_id in wanted:
                escalated.add(d.request_id)

    def dispatch(record: Any) -> None:
        d = codec.decode(record.value, (DispatchRequested,))
        assert isinstance(d, DispatchRequested)
        if d.request_id in wanted:
            times = Dispatch(d.requested_at.timestamp(), d.occurred_at.timestamp(), record.timestamp / 1000)
            found.append((d.request_id, times))

    await _read_topic(bootstrap, topics.decisions, timeout_s, decision)
    await _read_topic(bootstrap, topics.dispatch, timeout_s, dispatch)
    direct = [t for rid, t in found if rid not in escalated]
    reviewed = [t for rid, t in found if rid in escalated]
    return direct, reviewed


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method); q in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(values: Sequence[float]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)
    return {
        "count": len(s),
        "p50_ms": round(percentile(s, 50), 3),
        "p90_ms": round(percentile(s, 90), 3),
        "p99_ms": round(percentile(s, 99), 3),
        "max_ms": round(s[-1], 3),
        "mean_ms": round(sum(s) / len(s), 3),
        "min_ms": round(s[0], 3),
    }


def queue_figures(dispatches: Sequence[Dispatch]) -> dict[str, Any]:
    """Whether the decider kept up with the offered load, and the latency of the first second's requests.

    If it dispatched more slowly than the requests behind those dispatches were sent, a queue built
    up and the latency figures measure that queue rather than the gateway's own cost. Requests of the
    first second met at most a second's worth of queue: the closest such a run gets to the unloaded
    cost.
    """
    first_s = min((d.requested_s for d in dispatches), default=0.0)
    sent_span = max((d.requested_s for d in dispatches), default=0.0) - first_s
    dispatch_span = max((d.record_s for d in dispatches), default=0.0) - min(
        (d.record_s for d in dispatches), default=0.0
    )
    offered_rate = len(dispatches) / sent_span if sent_span > 0 else None
    dispatch_rate = len(dispatches) / dispatch_span if dispatch_span > 0 else None
    keeps_up = None if offered_rate is None or dispatch_rate is None else dispatch_rate >= 0.95 * offered_rate
    early = [d for d in dispatches if d.requested_s - first_s < 1.0]
    return {
        "offered_dispatches_per_s": None if offered_rate is None else round(offered_rate, 1),
        "decider_dispatches_per_s": None if dispatch_rate is None else round(dispatch_rate, 1),
        "decider_kept_up": keeps_up,
        "added_ms_first_second": latency_stats([d.added_ms for d in early]),
    }


def fresh_requests(policy: RoutingPolicy, total: int, run: str) -> list[InferenceRequested]:
    """``total`` synthetic requests with ids of this run only, so nothing can be mistaken for an
    earlier request (or deduplicated)."""
    base = synthetic_requests(policy, total, seed=13, start=datetime.now(UTC), run=f"{run}-latency")
    requests = []
    for i, r in enumerate(base):
        rid = derive_id(run, "latency-request", i)
        requests.append(msgspec.structs.replace(r, event_id=rid, request_id=rid))
    return requests


def run_latency(
    bootstrap: str,
    policy: RoutingPolicy,
    policy_path: Path,
    args: Params,
    run: str,
    work: Path,
    broker_pid: int | None,
) -> dict[str, Any]:
    topics = Topics(namespace=f"bench-{run}-latency.")
    total = max(1, round(args.rate * args.duration))
    requests = fresh_requests(policy, total, run)
    with running_pipeline(bootstrap, topics, policy_path, work / "latency", args.workers) as (
        services,
        stages,
        watch,
    ):
        warmup_s = warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        cpu = CpuMeter(stage_pids(stages, "bench (paced publisher)", broker_pid))
        cpu.start()
        pacing, _ = asyncio.run(publish_paced(bootstrap, topics.requests, requests, args.rate))
        cpu.stop()
        during = cpu.result()
        print(
            f"    sent {pacing['sent']} requests at {pacing['achieved_per_s']}/s (offered {args.rate:g}/s); "
            "waiting for the evidence",
            flush=True,
        )
        summary, _, _ = wait_for_terminal(
            watch,
            services,
            args.warmup + total,
            120 + total / FLOOR_RPS,
            "latency run",
            ReviewDesk(bootstrap, topics, watch.keys),
        )
        rss = peak_rss(stages)
    wanted = {r.request_id for r in requests}
    # A dispatch that followed an escalation waited for a person (the stand-in desk polls): its
    # time is the review's, so it is counted apart, not as the gateway's latency or rate.
    dispatches, reviewed = asyncio.run(read_dispatches(bootstrap, topics, wanted, 60 + total / 1000))
    queue = queue_figures(dispatches)
    return {
        "namespace": topics.namespace,
        "pipeline": "fresh (own namespace, own four processes, empty budget state)",
        "warmup_requests": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "duration_s": args.duration,
        "pacing": pacing,
        "dispatched": len(dispatches),
        "dispatched_after_review": len(reviewed),
        "review_wait_ms": latency_stats([d.added_ms for d in reviewed]),
        "not_dispatched": total - len(dispatches) - len(reviewed),
        "offered_dispatches_per_s": queue["offered_dispatches_per_s"],
        "decider_dispatches_per_s": queue["decider_dispatches_per_s"],
        "decider_kept_up": queue["decider_kept_up"],
        "added_ms": latency_stats([d.added_ms for d in dispatches]),
        "decider_ms": latency_stats([d.decider_ms for d in dispatches]),
        "added_ms_first_second": queue["added_ms_first_second"],
        "evidence_summary": summary,
        "peak_rss_mb": rss,
        "cpu_during_sends": during,
        "cpu_ms_per_request_during_sends": {
            name: None if v is None else round(v["cpu_s"] * 1000 / max(1, pacing["sent"]), 3)
            for name, v in during["processes"].items()
        },
        "loadavg_after": loadavg(),
    }
