"""Phase 2, throughput: N requests published at once, timed until all have a terminal state in the evidence.

A fresh namespace and pipeline; after the warm-up, the requests (encoded before the clock starts, as
in the baseline) are published as fast as the producer takes them. The end is when the last terminal
state's Parquet file was renamed into place (its mtime), not when the poll noticed it. CPU per process
is measured over the run, and one stage (``--profile``) is profiled with py-spy meanwhile.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._harness import CpuMeter, loadavg
from bench._pipeline.desk import LiveDesk
from bench._pipeline.params import FLOOR_RPS, Params
from bench._pipeline.stages import (
    EvidenceWatch,
    peak_rss,
    running_pipeline,
    stage_pids,
    wait_for_terminal,
    warm_up,
)
from bench._pipeline.topics import Sent, encode_requests, send_all, topic_stats
from bench._profile import Profiler
from nexuscore._demo import ReviewDesk
from nexuscore._services import Service, Services
from nexuscore._synthetic import synthetic_requests
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics


@dataclass
class Timed:
    """What the timed part of the run saw, inside the running pipeline."""

    sent: Sent
    summary: dict[str, int]
    seen_mono: float
    check_s: float
    cpu: CpuMeter
    profile: dict[str, Any]


def _timed_run(
    bootstrap: str,
    topics: Topics,
    pipeline: tuple[Services, dict[str, Service], EvidenceWatch],
    messages: list[tuple[bytes, bytes]],
    args: Params,
    broker_pid: int | None,
) -> Timed:
    """Publish ``messages`` and wait for their terminal states, measuring CPU (and profiling the decider)."""
    services, stages, watch = pipeline
    stage = args.profile
    profile_raw = watch.root.parent / f"{stage}.pyspy.txt"
    profiler = Profiler(stages[stage].proc.pid, profile_raw) if stage else None
    pids = stage_pids(stages, "bench (publisher, evidence poll)", broker_pid)
    if profiler is not None and profiler.pid is not None:
        pids["py-spy"] = profiler.pid
    cpu = CpuMeter(pids)
    desk = ReviewDesk(bootstrap, topics, watch.keys)
    try:
        cpu.start()
        with LiveDesk(bootstrap, topics, desk):  # escalations reviewed as they appear
            sent = asyncio.run(send_all(bootstrap, topics.requests, messages))
            print(
                f"    published {sent.count} requests in {sent.seconds:.2f} s; waiting for the evidence",
                flush=True,
            )
            summary, seen_mono, check_s = wait_for_terminal(
                watch,
                services,
                args.warmup + args.requests,
                120 + args.requests / FLOOR_RPS,
                "throughput",
                desk,
            )
        cpu.stop()
    finally:
        if profiler is not None:
            profiler.stop()
    profile = (
        {"skipped": "--no-profile"}
        if profiler is None
        else {"stage": stage, **profiler.summary(keep_as=f"pipeline-{stage}.pyspy.txt")}
    )
    return Timed(sent, summary, seen_mono, check_s, cpu, profile)


def run_throughput(
    bootstrap: str,
    policy: RoutingPolicy,
    policy_path: Path,
    args: Params,
    run: str,
    work: Path,
    broker_pid: int | None,
) -> dict[str, Any]:
    topics = Topics(namespace=f"bench-{run}-throughput.")
    # Encoded before the clock starts, as in the baseline: the producer's cost is the same in both.
    requests = synthetic_requests(
        policy, args.requests, seed=7, start=datetime.now(UTC), run=f"{run}-throughput"
    )
    messages = encode_requests(AvroCodec(), requests)
    with running_pipeline(bootstrap, topics, policy_path, work / "throughput", args.workers) as pipeline:
        services, stages, watch = pipeline
        warmup_s = warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        timed = _timed_run(bootstrap, topics, pipeline, messages, args, broker_pid)
        rss = peak_rss(stages)
        files = watch.files()
    topics_written = topic_stats(bootstrap, topics.namespace, broker_pid)
    sent = timed.sent
    # The last terminal state landed when its Parquet file was renamed into place; the poll only
    # notices it up to POLL_S (or a DuckDB check) later.
    evidence_s = watch.latest_mtime - sent.first_wall
    polled_s = timed.seen_mono - sent.first_mono
    cpu = timed.cpu.result()
    total = args.requests + args.warmup  # the topics hold the warm-up's messages too
    return {
        "namespace": topics.namespace,
        "requests": args.requests,
        "warmup_requests": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "publish_s": round(sent.seconds, 3),
        "published_per_s": round(sent.count / sent.seconds, 1),
        "end_to_end_s": round(evidence_s, 3),
        "requests_per_s": round(args.requests / evidence_s, 1),
        "end_to_end_polled_s": round(polled_s, 3),
        "requests_per_s_polled": round(args.requests / polled_s, 1),
        "evidence_summary": timed.summary,
        "evidence_files": files,
        # One EvidenceStore + terminal_summary() over all those files, as the demo and CLI do it.
        "evidence_check_s": round(timed.check_s, 3),
        "topics": topics_written,
        "peak_rss_mb": rss,
        "cpu": cpu,
        "cpu_ms_per_request": {
            name: None if v is None else round(v["cpu_s"] * 1000 / args.requests, 3)
            for name, v in cpu["processes"].items()
        },
        "messages_per_request": round(sum(t["messages"] for t in topics_written.values()) / total, 2),
        "kb_per_request": round(sum(t["mb"] or 0 for t in topics_written.values()) * 1024 / total, 2),
        "profile": timed.profile,
        "loadavg_after": loadavg(),
    }
