"""Phase 1: the projector on a real broker, beside a plain consumer reading the same log.

A fresh namespace is filled with a recorded history (``tests.factories.run_history``), encoded and
keyed as the stages publish it. Then, each in its own child process: a plain aiokafka consumer reads
it all (the baseline), the real ``Projector`` projects it from offset 0 until its manifest positions
reach the end offsets (profiled with py-spy), and ``projector_offline`` times its steps with the
records already in memory. Last, ``verify`` checks what the projector wrote.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from bench._evidence.common import Params, partition_of, sealing_targets, signing_key
from bench._evidence.projector_offline import projector_offline
from bench._harness import (
    RESULTS_DIR,
    BenchError,
    CallTimer,
    Child,
    await_topics,
    broker,
    cpu_seconds,
    external_broker,
    kafka_version,
    own_cpu_s,
    own_rss_mb,
    run_child,
    topic_partitions,
)
from bench._profile import Profiler
from nexuscore.kernel.clock import SystemClock
from nexuscore.policy import RoutingPolicy, default_policy
from nexuscore.projections import Projector, verify
from nexuscore.schemas import AvroCodec
from nexuscore.transport import (
    Topics,
    ensure_topics,
    new_consumer,
    new_producer,
    start_client,
)

CHILD_TIMEOUT_S = 3600
TOPICS_TIMEOUT_S = 60.0

# --- the log ---------------------------------------------------------------------------------------


def history(events_wanted: int, seed: int) -> list[Any]:
    """At least ``events_wanted`` events of a recorded history (about 4.7 events per request)."""
    from tests.factories import POLICY, run_history

    n = max(1, math.ceil(events_wanted / 4.6))
    events = run_history(POLICY, n, seed)
    while len(events) < events_wanted:  # never more than one extra round in practice
        n = math.ceil(n * events_wanted / len(events) * 1.02)
        events = run_history(POLICY, n, seed)
    return events


async def prefill(bootstrap: str, topics: Topics, events: list[Any]) -> dict[str, Any]:
    """Publish every event on its topic as the stages do (tenant key; dispatches by request)."""
    from tests.factories import _TOPIC_OF

    codec = AvroCodec()
    t0 = time.perf_counter()
    encoded = []
    for e in events:
        kind = _TOPIC_OF[type(e).__name__]
        key = e.request_id if kind == "dispatch" else e.tenant_id
        encoded.append((getattr(topics, kind), key.encode(), codec.encode(e)))
    encode_s = time.perf_counter() - t0
    producer = new_producer(bootstrap, linger_ms=20)
    await start_client(producer, bootstrap)
    t1 = time.perf_counter()
    try:
        pending: list[asyncio.Future[Any]] = []
        for topic, key, value in encoded:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending = []
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    produce_s = time.perf_counter() - t1
    nbytes = sum(len(v) for _, _, v in encoded)
    per_topic = Counter(t.removeprefix(topics.namespace) for t, _, _ in encoded)
    return {
        "events": len(encoded),
        "mb": round(nbytes / 1e6, 1),
        "bytes_per_event": round(nbytes / len(encoded)),
        "encode_s": round(encode_s, 2),
        "produce_s": round(produce_s, 2),
        "produced_per_s": round(len(encoded) / produce_s),
        "per_topic": dict(per_topic),
        "per_type": dict(Counter(type(e).__name__ for e in events)),
    }


async def end_offsets(bootstrap: str, topics: Topics) -> dict[str, int]:
    """End offset of every partition of the namespace, keyed ``"topic|partition"`` (picklable)."""
    tps = await topic_partitions(bootstrap, topics.all)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {f"{tp.topic}|{tp.partition}": end for tp, end in ends.items()}


# --- in child processes ----------------------------------------------------------------------------


def baseline_consumer(bootstrap: str, namespace: str, ends: dict[str, int]) -> dict[str, Any]:
    """Child: the projector's consumer (same settings, same getmany), reading without processing."""
    c0 = own_cpu_s()
    out = asyncio.run(_read_everything(bootstrap, Topics(namespace=namespace), ends))
    out["cpu_s"] = round(own_cpu_s() - c0, 2)
    out["peak_rss_mb"] = round(own_rss_mb(), 1)
    return out


async def _read_everything(bootstrap: str, topics: Topics, ends: dict[str, int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    consumer = new_consumer(
        bootstrap, (), topics.group("bench-baseline"), max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await start_client(consumer, bootstrap)
    try:
        want = {TopicPartition(*partition_of(k)): v for k, v in ends.items()}
        consumer.assign(list(want))
        await consumer.seek_to_beginning(*want)
        remaining = {tp for tp, end in want.items() if end > 0}
        seen = nbytes = 0
        first = None
        while remaining:
            fetched = await consumer.getmany(timeout_ms=100, max_records=2_000)
            for tp, records in fetched.items():
                if records and first is None:
                    first = time.perf_counter()
                seen += len(records)
                nbytes += sum(len(r.value) for r in records)
                if records and records[-1].offset + 1 >= want[tp]:
                    remaining.discard(tp)
        t1 = time.perf_counter()
    finally:
        await consumer.stop()
    return {
        "messages": seen,
        "mb": round(nbytes / 1e6, 1),
        "seconds": round(t1 - t0, 3),
        "messages_per_s": round(seen / (t1 - t0)),
        "seconds_from_first_message": round(t1 - (first or t0), 3),
        "messages_per_s_from_first_message": round(seen / (t1 - (first or t0))),
    }


def projector_child(
    bootstrap: str,
    namespace: str,
    evidence_dir: str,
    regions: dict[str, str],
    ends: dict[str, int],
    flush_rows: int,
    flush_interval_s: float,
) -> dict[str, Any]:
    """Child: the real Projector from offset 0 until its manifest positions reach the end offsets."""
    import pyarrow as pa

    from nexuscore.projections import _projector

    # The stage's allocator (``use_system_allocator``), set directly: the child also runs on the
    # trees of earlier commits (``--projector-baseline``), which may lack the helper.
    pa.set_memory_pool(pa.system_memory_pool())
    projector = Projector(
        bootstrap,
        Path(evidence_dir),
        signing_key(),
        SystemClock(),
        regions=regions,
        topics=Topics(namespace=namespace),
        flush_rows=flush_rows,
        flush_interval_s=flush_interval_s,
    )
    want = {partition_of(k): v for k, v in ends.items() if v > 0}
    c0 = own_cpu_s()
    targets = {"flush (in a thread)": (_projector.Projector, "flush"), **sealing_targets()}
    with CallTimer(targets) as timer:
        out = asyncio.run(_project_to(projector, want))
    cpu = own_cpu_s() - c0
    out["flush_rows"], out["flush_interval_s"] = flush_rows, flush_interval_s
    out["cpu_s"] = round(cpu, 2)
    out["cpu_us_per_event"] = round(cpu / out["events_in_log"] * 1e6, 1)
    out["peak_rss_mb"] = round(own_rss_mb(), 1)
    out["timed_calls"] = timer.result()
    return out


async def _project_to(projector: Projector, want: dict[tuple[str, int], int]) -> dict[str, Any]:
    """Run ``projector`` until its manifest has every partition up to its end offset in ``want``."""
    total = sum(want.values())
    t0 = time.perf_counter()
    task = asyncio.create_task(projector.run())
    first = None
    while True:
        await asyncio.sleep(0.02)
        if task.done():
            task.result()
            raise BenchError("the projector stopped before reaching the end offsets")
        if first is None and projector.events:
            first = time.perf_counter()
        writer = projector.writer
        if writer is not None and all(
            writer.manifest.positions.get(tp, 0) >= end for tp, end in want.items()
        ):
            break
    t1 = time.perf_counter()
    projector.stopping.set()
    await task
    seconds = t1 - t0
    return {
        "events_in_log": total,
        "events": projector.events,
        "duplicates": projector.duplicates,
        "undecodable": projector.undecodable,
        "files": projector.writer.files if projector.writer else None,
        "seconds": round(seconds, 3),
        "events_per_s": round(total / seconds),
        "seconds_from_first_event": round(t1 - (first or t0), 3),
        "events_per_s_from_first_event": round(total / (t1 - (first or t0))),
    }


# --- the phase -------------------------------------------------------------------------------------


def _measure_projector(
    args: Params, bootstrap: str, topics: Topics, ends: dict[str, int], regions: dict[str, str], work: Path
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The projector's figures (in a child, py-spy on it unless --no-profile), and its profile."""
    child_args = (bootstrap, topics.namespace, str(work / "kafka-evidence"), regions, ends)
    child = Child("projector", projector_child, *child_args, args.flush_rows, args.flush_interval_s)
    with child:
        profiler = Profiler(child.pid, RESULTS_DIR / "evidence-projector.pyspy.txt") if args.profile else None
        try:
            p = child.receive(CHILD_TIMEOUT_S)
        finally:
            if profiler is not None:
                profiler.stop()
    profile = None if profiler is None else profiler.summary(keep_as="evidence-projector.pyspy.txt")
    return p, profile


def _measure_baseline_projector(
    args: Params, bootstrap: str, topics: Topics, ends: dict[str, int], regions: dict[str, str], work: Path
) -> dict[str, Any]:
    """The projector of commit ``args.projector_baseline`` on the same log (a child process that
    imports that commit's code, laid out by ``projector_offline.baseline_tree``; no profiler)."""
    import json
    import subprocess
    import sys

    from bench._evidence.projector_offline import baseline_tree

    assert args.projector_baseline is not None
    tree = baseline_tree(args.projector_baseline, work / "baseline-code")
    repo = Path(__file__).resolve().parents[2]
    call = (bootstrap, topics.namespace, str(work / "baseline-evidence"), regions, ends)
    code = (
        f"import sys; sys.path[:0] = {[str(tree), str(repo)]!r}; import json; "
        "from bench._evidence.projector import projector_child; "
        f"print(json.dumps(projector_child(*{call!r}, {args.flush_rows}, {args.flush_interval_s})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tree,
        timeout=CHILD_TIMEOUT_S,
    )
    shutil.rmtree(work / "baseline-evidence", ignore_errors=True)
    shutil.rmtree(work / "baseline-code", ignore_errors=True)
    result = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    result["commit"] = args.projector_baseline
    return result


def _verify_projection(evidence: Path, policy: RoutingPolicy) -> dict[str, Any]:
    """The projection itself must be sound: verify what the projector wrote."""
    report = verify(evidence, signing_key().public_key(), {policy.digest})
    print(
        f"    verify of the projection: ok={report.ok}, {report.rows:,} rows, {report.files} files, "
        f"{report.seconds:.1f} s",
        flush=True,
    )
    return {
        "ok": report.ok,
        "rows": report.rows,
        "files": report.files,
        "seconds": round(report.seconds, 2),
        "findings": [f"{f.kind} {f.where}: {f.detail}" for f in report.findings],
    }


def _measure(
    args: Params, bootstrap: str, broker_pid: int | None, topics: Topics, work: Path, results: dict[str, Any]
) -> None:
    """Baseline consumer, projector, offline projector and verify over the filled namespace."""
    policy = default_policy()
    ends = asyncio.run(end_offsets(bootstrap, topics))
    total = sum(ends.values())
    print(f"[kafka] baseline: a plain aiokafka consumer reads {total:,} messages", flush=True)
    b = results["baseline"] = run_child(
        "baseline consumer", 600, baseline_consumer, bootstrap, topics.namespace, ends
    )
    print(f"    {b['messages']:,} messages in {b['seconds']} s = {b['messages_per_s']:,}/s", flush=True)
    regions = {t.id: t.home_region for t in policy.tenants}
    print(
        f"[kafka] projector: {total:,} events from offset 0 (flush_rows {args.flush_rows:,}, "
        f"flush_interval_s {args.flush_interval_s:g})",
        flush=True,
    )
    if args.projector_baseline:
        print(f"[kafka] projector of {args.projector_baseline} first, on the same log", flush=True)
        cpu0 = cpu_seconds(broker_pid) if broker_pid else None
        old = results["projector_baseline"] = _measure_baseline_projector(
            args, bootstrap, topics, ends, regions, work
        )
        cpu1 = cpu_seconds(broker_pid) if broker_pid else None
        old["broker_cpu_s"] = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 2)
        print(
            f"    {old['events_per_s']:,}/s, {old['cpu_us_per_event']} µs CPU/event, {old['files']} files, "
            f"peak RSS {old['peak_rss_mb']} MB",
            flush=True,
        )
    broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else None
    p, profile = _measure_projector(args, bootstrap, topics, ends, regions, work)
    broker_cpu1 = cpu_seconds(broker_pid) if broker_pid else None
    p["broker_cpu_s"] = (
        None if broker_cpu0 is None or broker_cpu1 is None else round(broker_cpu1 - broker_cpu0, 2)
    )
    p["ratio_to_baseline"] = round(p["events_per_s"] / b["messages_per_s"], 4)
    results["projector"] = p
    print(
        f"    {p['events_in_log']:,} events in {p['seconds']} s = {p['events_per_s']:,}/s "
        f"({p['ratio_to_baseline']:.3f} of the baseline); {p['files']} files; peak RSS {p['peak_rss_mb']} MB",
        flush=True,
    )
    if profile is not None:
        results["profile"] = profile
    print("[kafka] the projector's own processing, records already in memory (no broker)", flush=True)
    offline_dir = work / "offline-evidence"
    o = results["projector_offline"] = run_child(
        "offline projector",
        CHILD_TIMEOUT_S,
        projector_offline,
        *(bootstrap, topics.namespace, ends, str(offline_dir), regions, args.flush_rows),
    )
    shutil.rmtree(offline_dir, ignore_errors=True)
    print(f"    {o['events']:,} events in {o['seconds']} s = {o['events_per_s']:,}/s", flush=True)
    results["projector_verify"] = _verify_projection(work / "kafka-evidence", policy)
    shutil.rmtree(work / "kafka-evidence", ignore_errors=True)


def run_kafka(args: Params, run_id: str, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    print(f"[kafka] building a recorded history of >= {args.kafka_events:,} events", flush=True)
    t0 = time.perf_counter()
    events = history(args.kafka_events, args.seed)
    results["history_s"] = round(time.perf_counter() - t0, 1)
    topics = Topics(namespace=f"bench-evidence-{run_id}.")
    with broker(topics.namespace) as (bootstrap, broker_pid):
        results["broker"] = {
            "bootstrap": bootstrap,
            "external": external_broker(),
            "pid": broker_pid,
            "kafka_version": kafka_version(),
        }
        asyncio.run(ensure_topics(bootstrap, topics))
        # Creation is asynchronous: without leaders everywhere, the end offsets can time out.
        asyncio.run(await_topics(bootstrap, topics.all, TOPICS_TIMEOUT_S))
        print(f"[kafka] publishing {len(events):,} events to {topics.namespace}*", flush=True)
        results["prefill"] = asyncio.run(prefill(bootstrap, topics, events))
        del events
        _measure(args, bootstrap, broker_pid, topics, work, results)
    return results
