"""The decider's runtime, measured: faust (the agent as it was) against the same handlers on
aiokafka's batch API, with ordered idempotent writes or with a Kafka transaction per batch.

Each candidate runs alone as ``nexuscore run decider --runtime ...`` on the same broker, with no
worker: requests in, decisions and dispatches out. Two phases per candidate:

* **throughput**: N requests published at once; decisions per second until the last one is out,
  and the decider's CPU per request (its own /proc counters);
* **added latency**: requests offered at a fixed rate; request produced -> dispatch produced
  (both record timestamps on this machine's clock), p50 and p99, and the share of the offered rate
  decided in time.

``python -m bench.decider [--requests N] [--rate R] [--duration S] [--runtimes faust,loop,loop-tx]``;
results in bench/results/decider.{json,md}. The choice it informs: docs/decisions/0001-decider-runtime.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench._harness import broker, cpu_seconds, git_commit, run_main, table
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import synthetic_requests
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.schemas import AvroCodec, RequestDecided, RequestRejected
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client

RUNTIMES = {
    "faust": ["--runtime", "faust"],
    "loop": ["--runtime", "loop"],
    "loop-tx": ["--runtime", "loop", "--transactional"],
}
CODEC = AvroCodec()


def _requests(n: int, run: str) -> list[tuple[bytes, bytes]]:
    reqs = synthetic_requests(default_policy(), n, seed=5, start=datetime.now(UTC), run=run)
    return [(r.tenant_id.encode(), CODEC.encode(r)) for r in reqs]


async def _count_decisions(bootstrap: str, topic: str, expected: int, timeout_s: float) -> float:
    """Seconds until ``expected`` decisions (or rejections) are on ``topic``."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", isolation_level="read_committed"
    )
    await start_client(consumer, bootstrap)
    seen, started = 0, time.monotonic()
    try:
        while seen < expected and time.monotonic() - started < timeout_s:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                seen += sum(
                    isinstance(CODEC.decode(r.value), RequestDecided | RequestRejected) for r in records
                )
    finally:
        await consumer.stop()
    if seen < expected:
        raise RuntimeError(f"only {seen} of {expected} decisions within {timeout_s:.0f} s")
    return time.monotonic()


async def _publish(
    bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float | None
) -> dict[str, int]:
    """Publish, at ``rate`` per second or at once; return each request's produce time (ms)."""
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    sent: dict[str, int] = {}
    try:
        started = time.monotonic()
        futures = []
        for i, (key, value) in enumerate(messages):
            if rate is not None:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            futures.append(await producer.send(topic, value, key=key))
        for f in futures:
            meta = await f
            sent[f"{meta.partition}:{meta.offset}"] = meta.timestamp
    finally:
        await producer.stop()
    return sent


async def _dispatch_latencies(
    bootstrap: str, topics: Topics, wanted: set[tuple[str, str]], timeout_s: float
) -> list[float]:
    """Request produced -> dispatch produced, in ms, for the requests in ``wanted`` (both record
    timestamps are CreateTime set on this machine's clock)."""
    consumer = AIOKafkaConsumer(
        topics.dispatch, topics.requests, bootstrap_servers=bootstrap, auto_offset_reset="latest",
        isolation_level="read_committed",
    )  # fmt: skip
    await start_client(consumer, bootstrap)
    produced: dict[tuple[str, str], int] = {}
    latencies: list[float] = []
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout_s and len(latencies) < _dispatchable(wanted):
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                for r in records:
                    event = CODEC.decode(r.value)
                    who = (event.tenant_id, event.request_id)
                    if who not in wanted:
                        continue
                    if tp.topic == topics.requests:
                        produced[who] = r.timestamp
                    elif who in produced:
                        latencies.append(r.timestamp - produced[who])
    finally:
        await consumer.stop()
    return latencies


def _dispatchable(wanted: set[tuple[str, str]]) -> int:
    # Not every request is dispatched (rejected, denied, escalated): stop at the timeout instead.
    return len(wanted) + 1


async def _latency_phase(
    bootstrap: str, topics: Topics, offered: list[tuple[bytes, bytes]], rate: float
) -> list[float]:
    wanted = {(e.tenant_id, e.request_id) for e in (CODEC.decode(v) for _, v in offered)}
    reader = asyncio.create_task(_dispatch_latencies(bootstrap, topics, wanted, len(offered) / rate + 15))
    await asyncio.sleep(2)  # the reader's consumer is assigned and at the end of both topics
    await _publish(bootstrap, topics.requests, offered, rate)
    return await reader


def _measure(bootstrap: str, runtime: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    topics = Topics(f"bench-decider-{runtime}-{uuid.uuid4().hex[:6]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    keys = dev_keys(root / "keys", DEFAULT_POLICY_PATH)
    common = [
        "--bootstrap",
        bootstrap,
        "--namespace",
        topics.namespace,
        "--policy",
        str(keys.policy),
        "-t",
        str(keys.trust_store),
    ]
    with Services(root / f"logs-{runtime}") as services:
        decider = services.start("decider", "run", "decider", *common, *RUNTIMES[runtime])
        warm = _requests(500, f"{runtime}-warm")
        asyncio.run(_publish(bootstrap, topics.requests, warm, None))
        asyncio.run(_count_decisions(bootstrap, topics.decisions, 500, 120))
        services.check()
        pid = decider.proc.pid
        messages = _requests(args.requests, f"{runtime}-tp")
        cpu0, t0 = cpu_seconds(pid) or 0.0, time.monotonic()
        asyncio.run(_publish(bootstrap, topics.requests, messages, None))
        t1 = asyncio.run(_count_decisions(bootstrap, topics.decisions, 500 + args.requests, 300))
        cpu1 = cpu_seconds(pid) or 0.0
        offered = _requests(int(args.rate * args.duration), f"{runtime}-lat")
        latencies = asyncio.run(_latency_phase(bootstrap, topics, offered, args.rate))
        services.check()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 10 else [float("nan")] * 99
    return {
        "runtime": runtime,
        "requests": args.requests,
        "decisions_per_s": round(args.requests / (t1 - t0), 1),
        "decider_cpu_ms_per_request": round((cpu1 - cpu0) * 1000 / args.requests, 3),
        "offered_rate": args.rate,
        "dispatches_timed": len(latencies),
        "added_latency_p50_ms": round(q[49], 1),
        "added_latency_p99_ms": round(q[98], 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path("/tmp") / f"nexuscore-bench-decider-{uuid.uuid4().hex[:6]}"
    runs: list[dict[str, Any]] = []
    with broker("bench-decider-") as (bootstrap, _):
        for runtime in args.runtimes.split(","):
            print(f"--- {runtime}", flush=True)
            runs.append(_measure(bootstrap, runtime, args, root))
            print(runs[-1], flush=True)
    return {"commit": git_commit(), "date": f"{datetime.now(UTC):%Y-%m-%d}", "args": vars(args), "runs": runs}


def render(results: dict[str, Any]) -> str:
    a = results["args"]
    rows = [
        [r["runtime"], f"{r['decisions_per_s']:,.0f}", f"{r['decider_cpu_ms_per_request']:.3f}",
         f"{r['added_latency_p50_ms']:.1f}", f"{r['added_latency_p99_ms']:.1f}", f"{r['dispatches_timed']:,}"]
        for r in results["runs"]
    ]  # fmt: skip
    return "\n".join(
        [
            "# The decider's runtime, side by side",
            "",
            f"`python -m bench.decider --requests {a['requests']} --rate {a['rate']:g} --duration {a['duration']:g}` "
            f"(commit `{results['commit']}`, {results['date']}): the decider alone, no worker, on the same broker.",
            "",
            *table(
                ["runtime", "decisions/s (burst)", "decider CPU ms/request", f"added p50 ms @ {a['rate']:g}/s",
                 f"added p99 ms @ {a['rate']:g}/s", "dispatches timed"],
                rows,
            ),
        ]
    ) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests in the throughput phase")
    parser.add_argument("--rate", type=float, default=500.0, help="requests/s offered in the latency phase")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of the latency phase")
    parser.add_argument("--runtimes", default="faust,loop,loop-tx", help="which candidates, comma-separated")
    args = parser.parse_args(argv)
    return run_main("decider", lambda: run(args), render, lambda r: print(render(r)))


if __name__ == "__main__":
    raise SystemExit(main())
