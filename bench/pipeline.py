"""The pipeline benchmark: throughput, gateway-added latency, memory and CPU of NexusCore on real Kafka.

``python -m bench.pipeline [--requests N] [--rate R] [--duration S] [--quick]`` runs, on one broker
(``nexuscore._broker.kafka_broker()``: ``$NEXUSCORE_BOOTSTRAP``, Docker, or a local KRaft broker):

1. **Baseline**: N messages of exactly the encoded synthetic requests' bytes and keys through plain
   aiokafka with no processing (an idempotent acks=all producer here, a consumer-group member in a
   child process) into a fresh 4-partition topic: the transport's own limit on this machine.
2. **Throughput**: the stages as child processes (the demo's command lines, but a provider that
   answers at once and never fails, and ``--workers`` worker processes, 1 by default: see ``--help``)
   in a fresh namespace; after a warm-up batch has reached the evidence (so every consumer group has
   joined), N requests are published as fast as possible and timed until every one has a terminal
   state in the Parquet evidence. Escalations are reviewed the moment they are on the decisions topic
   (``bench._pipeline.desk``): the run measures the pipeline, not a person. One stage (the decider
   unless ``--profile`` names another) is profiled with py-spy meanwhile.
3. **Latency**: a fresh pipeline in another namespace; requests paced at R/s for S s, each stamped
   with the wall clock right before it is sent; added latency = dispatch.occurred_at - requested_at,
   and Kafka's record timestamp of the dispatch - requested_at.
4. **Producer-observed latency** (``bench._pipeline.sustained``): 200 requests/s; a client reads the
   answers off ``nexus.outcomes`` and ``nexus.decisions`` as a producer would: sent -> terminal state.
5. **Sustained load**: 800 requests/s for 60 s; the decider's and workers' backlog every 5 s, whether
   it stayed flat, and CPU per request per stage.
6. **Gateway** (``bench.gateway``, on a broker of its own): the same closed-loop load through the
   OpenAI-compatible HTTP gateway and straight to Kafka with the SDK (SDK, gateway, SDK again).
7. Peak RSS (VmHWM) of every process and CPU seconds (utime + stime) per process and phase.

Results go to ``bench/results/pipeline.json`` and ``bench/results/pipeline.md`` (overwritten), and the
profiled stage's collapsed py-spy stacks to ``bench/results/pipeline-<stage>.pyspy.txt``.

Needs ``py-spy`` in the virtualenv for the profile (``pip install py-spy``); without it the profile is
skipped with a note and everything else still runs.

This module is the command line and the run from start to end; its parts are in ``bench._pipeline``.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._harness import broker, external_broker, git_commit, kafka_version, loadavg, run_main
from bench._pipeline.baseline import run_baseline
from bench._pipeline.latency import run_latency
from bench._pipeline.params import PHASES, PIPELINE_STAGES, Params
from bench._pipeline.report import print_summary, render_markdown
from bench._pipeline.stages import worker_names
from bench._pipeline.sustained import run_observed, run_sustained
from bench._pipeline.throughput import run_throughput
from bench._pipeline.topics import encode_requests
from bench.gateway import measure as measure_gateway
from nexuscore._services import peak_rss_mb
from nexuscore._synthetic import synthetic_requests
from nexuscore.policy import DEFAULT_POLICY_PATH, RoutingPolicy, load_policy
from nexuscore.schemas import AvroCodec

DESCRIPTION = (__doc__ or "").split("\n\n")[0]


STAGES = ("decider", "worker", "projector")  # the stages --profile may name


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=DESCRIPTION)
    parser.add_argument(
        "--requests", type=int, help="Requests in the throughput run (default 20000; 2000 with --quick)."
    )
    parser.add_argument(
        "--rate", type=float, default=500.0, help="Offered requests/s in the latency run (default 500)."
    )
    parser.add_argument(
        "--duration", type=float, help="Seconds of the latency run (default 20; 5 with --quick)."
    )
    parser.add_argument(
        "--warmup", type=int, default=200, help="Warm-up requests per pipeline (default 200)."
    )
    parser.add_argument(
        "--observed-rate",
        type=float,
        default=200.0,
        help="Offered requests/s in the producer-observed run (200).",
    )
    parser.add_argument(
        "--sustained-rate", type=float, default=800.0, help="Offered requests/s in the sustained run (800)."
    )
    parser.add_argument(
        "--sustained-s", type=float, help="Seconds of the sustained run (60; 10 with --quick)."
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"Which phases, comma-separated (default: all of {', '.join(PHASES)}).",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help=(
            "Worker processes, one consumer group (default 1: on 2 cores shared with the broker a "
            "second one added its wake-ups and Kafka requests but no throughput: 1,282 against "
            "1,269 requests/s, added latency at 500/s p50 about 22 against 12 ms)."
        ),
    )
    parser.add_argument("--quick", action="store_true", help="Tiny sizes for a smoke check.")
    parser.add_argument(
        "--profile", choices=STAGES, default="decider", help="The stage py-spy samples (default decider)."
    )
    parser.add_argument("--no-profile", dest="profile", action="store_const", const="", help="No profile.")
    parser.add_argument(
        "--keep-work", action="store_true", help="Keep evidence and logs (kept anyway on failure)."
    )
    ns = parser.parse_args(argv)
    requests = ns.requests if ns.requests is not None else (2000 if ns.quick else 20_000)
    duration = ns.duration if ns.duration is not None else (5.0 if ns.quick else 20.0)
    sustained_s = ns.sustained_s if ns.sustained_s is not None else (10.0 if ns.quick else 60.0)
    if (
        min(
            requests,
            ns.rate,
            duration,
            ns.warmup,
            ns.observed_rate,
            ns.sustained_rate,
            sustained_s,
            ns.workers,
        )
        <= 0
    ):
        parser.error("--requests, --rate, --duration, --warmup, --workers and the rates must be positive")
    phases = tuple(p.strip() for p in ns.phases.split(",") if p.strip())
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        parser.error(
            f"unknown phase(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PHASES)}"
        )
    return Params(
        requests, ns.rate, duration, ns.warmup, ns.quick, ns.profile, ns.keep_work,
        observed_rate=ns.observed_rate, observed_s=min(duration, 20.0), sustained_rate=ns.sustained_rate,
        sustained_s=sustained_s, phases=phases, workers=ns.workers,
    )  # fmt: skip


def machine_info(bootstrap: str, broker_pid: int | None) -> dict[str, Any]:
    external = external_broker()
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka_version": kafka_version() + (" (local jars; the broker is external)" if external else ""),
        "broker": ("external " if external else "")
        + (f"local JVM pid {broker_pid}" if broker_pid else "not on this machine"),
        "bootstrap": bootstrap,
        "loadavg_start": loadavg(),
    }


def memory(results: dict[str, Any], args: Params, broker_pid: int | None) -> dict[str, Any]:
    """Peak RSS of every stage over both pipelines, of the broker and of this process."""
    peaks = {
        stage: max(
            (
                v
                for v in (
                    results[p]["peak_rss_mb"].get(stage)
                    for p in ("throughput", "latency", "sustained")
                    if p in results
                )
                if v is not None
            ),
            default=None,
        )
        for stage in (*PIPELINE_STAGES, *worker_names(args.workers)[1:])
    }
    broker_rss = peak_rss_mb(broker_pid) if broker_pid is not None else None
    return {
        "pipeline_peak_rss_mb": peaks,
        "broker_peak_rss_mb": None if broker_rss is None else round(broker_rss, 1),
        "broker_note": None if broker_pid else "the broker is not a local process: not measured",
        "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_phases(results: dict[str, Any], args: Params, policy: RoutingPolicy, run_id: str, work: Path) -> None:
    """The chosen phases on one broker, each phase's figures added to ``results``."""
    with broker(f"bench-{run_id}") as (bootstrap, broker_pid):
        results["machine"] = machine_info(bootstrap, broker_pid)
        print(
            f"bench run {run_id}: broker {bootstrap} ({results['machine']['broker']}); work dir {work}",
            flush=True,
        )
        if "baseline" in args.phases:
            # The same requests (seed and size) as the throughput run, so the bytes match exactly.
            sample = synthetic_requests(
                policy, args.requests, seed=7, start=datetime.now(UTC), run=f"{run_id}-baseline"
            )
            print(f"[baseline] {args.requests} messages through plain aiokafka", flush=True)
            messages = encode_requests(AvroCodec(), sample)
            del sample
            results["baseline"] = run_baseline(bootstrap, messages, run_id, broker_pid)
            del messages
        phase = (bootstrap, policy, DEFAULT_POLICY_PATH, args, run_id, work, broker_pid)
        if "throughput" in args.phases:
            print(f"[throughput] {args.requests} requests through the pipeline", flush=True)
            results["throughput"] = run_throughput(*phase)
            if "baseline" in results:
                results["ratio_to_baseline"] = round(
                    results["throughput"]["requests_per_s"] / results["baseline"]["end_to_end_msgs_per_s"], 4
                )
        if "latency" in args.phases:
            print(
                f"[latency] {args.rate:g} requests/s for {args.duration:g} s through a fresh pipeline",
                flush=True,
            )
            results["latency"] = run_latency(*phase)
        if "observed" in args.phases:
            print(
                f"[observed] {args.observed_rate:g} requests/s, answers read as a producer would", flush=True
            )
            results["observed"] = run_observed(*phase)
        if "sustained" in args.phases:
            print(f"[sustained] {args.sustained_rate:g} requests/s for {args.sustained_s:g} s", flush=True)
            results["sustained"] = run_sustained(*phase)
        results["memory"] = memory(results, args, broker_pid)


def run(args: Params) -> dict[str, Any]:
    policy = load_policy(DEFAULT_POLICY_PATH)
    run_id = uuid.uuid4().hex[:8]
    results: dict[str, Any] = {
        "benchmark": "pipeline",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench.pipeline", *sys.argv[1:]]),
        "git_commit": git_commit(),
        "parameters": {
            "requests": args.requests,
            "rate": args.rate,
            "duration": args.duration,
            "warmup": args.warmup,
            "quick": args.quick,
            "profile": args.profile,
            "phases": list(args.phases),
            "observed_rate": args.observed_rate,
            "sustained_rate": args.sustained_rate,
            "sustained_s": args.sustained_s,
            "workers": args.workers,
        },
        "policy": {"version": policy.version, "digest": policy.digest},
    }
    work = Path(tempfile.mkdtemp(prefix=f"nexuscore-bench-{run_id}-"))
    ok = False
    try:
        run_phases(results, args, policy, run_id, work)
        if "gateway" in args.phases:
            print("[gateway] the same load through HTTP and straight to Kafka (SDK)", flush=True)
            results["gateway"] = measure_gateway(min(args.requests, 2000), 32)
        results["machine"]["loadavg_end"] = loadavg()
        ok = True
    finally:
        if ok and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"evidence and logs kept in {work}", file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("pipeline", lambda: run(args), render_markdown, print_summary)


if __name__ == "__main__":
    sys.exit(main())
