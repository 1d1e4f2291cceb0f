"""Phases 4 and 5: what a producer sees, and whether the pipeline holds a sustained load.

4. **Producer-observed latency**: requests paced at ``--observed-rate`` (200/s) through a fresh
   pipeline; a client in this process reads ``nexus.outcomes`` and ``nexus.decisions`` as a producer
   would (the topics that hold the answer) and notes when each request's terminal state arrives:
   latency = that moment - the moment it was sent. Escalations wait for a person and are left out.
5. **Sustained load**: ``--sustained-rate`` (800/s) for ``--sustained-s`` (60 s) through a fresh
   pipeline; every 5 s, the backlog of the decider (requests not yet committed by its group) and of
   the workers (dispatches not yet committed), and the CPU of every process over the whole run.
   Flat means the backlog at the end is no larger than the largest seen in the first half.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bench._harness import CpuMeter, loadavg
from bench._pipeline.latency import fresh_requests, latency_stats, publish_paced
from bench._pipeline.params import Params
from bench._pipeline.stages import peak_rss, running_pipeline, stage_pids, warm_up
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec, InferenceRequested, OutcomeRecorded, RequestDecided, RequestRejected
from nexuscore.transport import DEFAULT_PARTITIONS, Topics, start_client

SAMPLE_EVERY_S = 5.0


def _terminal(event: object) -> str | None:
    """The request id of a terminal state a producer can read (an escalation is not one yet)."""
    if isinstance(event, OutcomeRecorded | RequestRejected):
        return event.request_id
    if isinstance(event, RequestDecided) and event.verdict == "denied":
        return event.request_id
    return None


async def _answers(
    consumer: AIOKafkaConsumer, wanted: set[str], seen: dict[str, tuple[float, float]], done: asyncio.Event
) -> None:
    """Note, for each wanted request, when its terminal state was read and when the broker took it."""
    codec = AvroCodec()
    while not done.is_set():
        for records in (await consumer.getmany(timeout_ms=100)).values():
            now = time.time()
            for r in records:
                rid = _terminal(codec.decode(r.value))
                if rid in wanted and rid not in seen:
                    seen[rid] = (now, r.timestamp / 1000)


async def observe(
    bootstrap: str, topics: Topics, requests: Sequence[InferenceRequested], rate: float, wait_s: float
) -> tuple[dict[str, Any], list[float], list[float]]:
    """Publish ``requests`` paced at ``rate`` and time each one's terminal state as a client reads it."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    tps = [
        TopicPartition(t, p) for t in (topics.outcomes, topics.decisions) for p in range(DEFAULT_PARTITIONS)
    ]
    consumer.assign(tps)
    await consumer.seek_to_end(*tps)
    wanted = {r.request_id for r in requests}
    seen: dict[str, tuple[float, float]] = {}
    done = asyncio.Event()
    reader = asyncio.create_task(_answers(consumer, wanted, seen, done))
    try:
        pacing, sent = await publish_paced(bootstrap, topics.requests, requests, rate)
        deadline = time.monotonic() + wait_s
        while len(seen) < len(wanted) and time.monotonic() < deadline and not reader.done():
            await asyncio.sleep(0.2)
    finally:
        done.set()
        await reader
        await consumer.stop()
    # Sent -> read by this client; and sent -> taken by the broker (the answer's record timestamp:
    # LogAppendTime, as on every topic), which leaves out the reading.
    read = [(seen[rid][0] - sent[rid]) * 1000 for rid in seen if rid in sent]
    appended = [(seen[rid][1] - sent[rid]) * 1000 for rid in seen if rid in sent]
    return pacing, read, appended


def run_observed(
    bootstrap: str, policy: RoutingPolicy, policy_path: Path, args: Params, run: str, work: Path,
    broker_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    topics = Topics(namespace=f"bench-{run}-observed.")
    total = max(1, round(args.observed_rate * args.observed_s))
    requests = fresh_requests(policy, total, f"{run}-observed")
    with running_pipeline(bootstrap, topics, policy_path, work / "observed", args.workers) as (
        services,
        stages,
        watch,
    ):
        warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        pacing, latencies, appended = asyncio.run(
            observe(bootstrap, topics, requests, args.observed_rate, 60.0)
        )
        services.check()
    return {
        "namespace": topics.namespace,
        "offered_per_s": args.observed_rate,
        "pacing": pacing,
        "answered_or_refused": len(latencies),
        "not_seen": total - len(latencies),
        "note": "escalated requests wait for a person and are not timed",
        "published_to_terminal_state_ms": latency_stats(latencies),
        "published_to_answer_on_broker_ms": latency_stats(appended),
        "loadavg_after": loadavg(),
    }


async def _backlog(admin: AIOKafkaAdminClient, consumer: AIOKafkaConsumer, group: str, topic: str) -> int:
    tps = [TopicPartition(topic, p) for p in range(DEFAULT_PARTITIONS)]
    end = await consumer.end_offsets(tps)
    committed = await admin.list_consumer_group_offsets(group, partitions=tps)
    return sum(
        end[tp] - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0) for tp in tps
    )


async def _sample(bootstrap: str, topics: Topics, samples: list[dict[str, Any]], done: asyncio.Event) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(admin, bootstrap)
    await start_client(consumer, bootstrap)
    started = time.monotonic()
    try:
        while not done.is_set():
            samples.append(
                {
                    "at_s": round(time.monotonic() - started, 1),
                    "decider_backlog": await _backlog(admin, consumer, topics.group("nexuscore-decider"), topics.requests),
                    "worker_backlog": await _backlog(admin, consumer, topics.group("nexuscore-workers"), topics.dispatch),
                }
            )  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), SAMPLE_EVERY_S)
    finally:
        await consumer.stop()
        await admin.close()


async def _offer(
    bootstrap: str, topics: Topics, requests: Sequence[InferenceRequested], rate: float
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    samples: list[dict[str, Any]] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(_sample(bootstrap, topics, samples, done))
    try:
        pacing, _ = await publish_paced(bootstrap, topics.requests, requests, rate)
    finally:
        done.set()
        await sampler
    return pacing, samples


def flat(samples: Sequence[dict[str, Any]]) -> bool | None:
    """No growth: the backlog at the end is no larger than the largest seen in the first half."""
    if len(samples) < 4:
        return None
    half = samples[: len(samples) // 2]
    last = samples[-1]
    return all(last[k] <= max(s[k] for s in half) + 50 for k in ("decider_backlog", "worker_backlog"))


def run_sustained(
    bootstrap: str, policy: RoutingPolicy, policy_path: Path, args: Params, run: str, work: Path,
    broker_pid: int | None,
) -> dict[str, Any]:  # fmt: skip
    topics = Topics(namespace=f"bench-{run}-sustained.")
    total = max(1, round(args.sustained_rate * args.sustained_s))
    requests = fresh_requests(policy, total, f"{run}-sustained")
    with running_pipeline(bootstrap, topics, policy_path, work / "sustained", args.workers) as (
        services,
        stages,
        watch,
    ):
        warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        cpu = CpuMeter(stage_pids(stages, "bench (publisher)", broker_pid))
        cpu.start()
        pacing, samples = asyncio.run(_offer(bootstrap, topics, requests, args.sustained_rate))
        cpu.stop()
        services.check()
        rss = peak_rss(stages)
    used = cpu.result()
    per_request = {
        name: None if v is None else round(v["cpu_s"] * 1000 / total, 3)
        for name, v in used["processes"].items()
    }
    return {
        "namespace": topics.namespace,
        "offered_per_s": args.sustained_rate,
        "seconds": args.sustained_s,
        "pacing": pacing,
        "backlog": samples,
        "backlog_at_end": samples[-1] if samples else None,
        "flat": flat(samples),
        "cpu": used,
        "cpu_ms_per_request": per_request,
        "peak_rss_mb": rss,
        "loadavg_after": loadavg(),
    }
