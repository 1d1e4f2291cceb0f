"""The evidence-plane benchmark: projector throughput on Kafka, queries and verification at scale.

``python -m bench.evidence [--decisions N] [--reuse] [--kafka-events E] [--skip-kafka] [--skip-store]``:

1. **Projector** (real broker: ``$NEXUSCORE_BOOTSTRAP`` or ``nexuscore._broker.kafka_broker()``): a
   fresh topic namespace is pre-filled with E events (default 500,000) of a recorded history
   (``tests.factories.run_history``: requests, decisions, dispatches, outcomes, settlements), Avro
   encoded and keyed as the stages key them. **Baseline**: a plain aiokafka consumer (the projector's
   consumer settings, ``getmany``) reads them all with no processing. Then the real ``Projector``
   projects them from offset 0 until its manifest positions reach the end offsets. Each runs in its
   own child process (so its peak RSS is its own); the projector is profiled with py-spy.
2. **Store**: an evidence store of N decisions (default 10,000,000) written without Kafka but with the
   production sealing code (``SealedWriter``: Parquet, Merkle root, signed manifest, checkpoints) and
   the production ``FieldCipher`` for prompts and responses; columns generated vectorised (numpy,
   pyarrow) over the default policy's four tenants, 35 days, large files. ``--reuse`` keeps a store
   of the same size from an earlier run.
3. **Queries**, cold (a fresh ``EvidenceStore`` per measurement, as the CLI does; median of 5): who
   routed what for one tenant over 30 days, the lineage of one request, spend by day; baselines: the
   same answers with pyarrow.dataset / pyarrow.compute over the same committed files.
4. **verify** over the whole store; baseline: the I/O floor (sha256 of every file's bytes).

Results go to ``bench/results/evidence.json`` and ``bench/results/evidence.md`` (sections skipped
with ``--skip-*`` are carried over from the previous results file, marked with their date).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType, SimpleNamespace
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.partitioner import murmur2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.pipeline import (
    Profiler,
    _git_commit,
    _kafka_version,
    cpu_seconds,
    delete_topics_with_prefix,
    find_broker_pid,
    summarise_profile,
)
from nexuscore._broker import kafka_broker
from nexuscore._synthetic import CLASSES, RISKS, TASKS
from nexuscore.kernel.clock import SystemClock
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import RoutingPolicy, default_policy
from nexuscore.projections import (
    SCHEMAS,
    EvidenceStore,
    FieldCipher,
    LocalKeyStore,
    Projector,
    SealedWriter,
    committed_files,
    verify,
)
from nexuscore.schemas import AvroCodec
from nexuscore.transport import (
    DEFAULT_PARTITIONS,
    Topics,
    ensure_topics,
    new_consumer,
    new_producer,
    start_client,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ROOT = Path("/tmp/nexus-bench-evidence")
META = "bench-meta.json"  # beside the store's own files; verify and the views ignore it

# The targets of the issue.
TARGET_PROJECTOR_EPS = 50_000.0
TARGET_WHO_S = 1.0
TARGET_LINEAGE_S = 0.1
TARGET_VERIFY_EPS = 1_000_000.0
TARGET_RSS_MB = 250.0  # the pipeline's per-process target (README), for the projector

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(NexusError):
    """A benchmark step failed; the message says which."""


def _signing_key() -> Ed25519PrivateKey:
    """A fixed key: ``--reuse`` must verify a store written by an earlier run."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"nexuscore bench evidence").digest())


# --- measuring ---------------------------------------------------------------------------------------


def _own_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a spawned
    child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _own_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu_s() -> float:
    """CPU of reaped child processes (a process pool's workers, once it has shut down)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class CallTimer:
    """Wall time and call count of chosen module-level functions, patched in place for a while.

    Instruments the production code without editing it: each (module, name) is replaced by a wrapper
    and restored on exit. Calls from worker processes are not seen.
    """

    def __init__(self, targets: dict[str, tuple[Any, str]]) -> None:
        self.targets = targets
        self.seconds: dict[str, float] = dict.fromkeys(targets, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(targets, 0)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed

    def __enter__(self) -> CallTimer:
        for label, (owner, name) in self.targets.items():
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._wrap(label, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved = []

    def result(self) -> dict[str, dict[str, float]]:
        return {k: {"s": round(self.seconds[k], 3), "calls": self.calls[k]} for k in self.targets}


def _sealing_targets() -> dict[str, tuple[Any, str]]:
    from nexuscore.projections import _manifest, _merkle, _seal, _writer

    return {
        "leaf_hashes (DuckDB json_array + sha256, to Python)": (_seal, "leaf_hashes"),
        "merkle root (Python)": (_merkle, "root"),
        "write_table (Parquet zstd + bloom + fsync)": (_writer, "write_table"),
        "manifest commit + sign": (_manifest.Manifest, "commit"),
    }


def run_child(
    target: Callable[..., None],
    args: tuple[Any, ...],
    timeout_s: float,
    what: str,
    on_start: Callable[[int], None] | None = None,
) -> Any:
    """Run ``target(conn, *args)`` in a spawned child; return what it sends as ("done", x)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, *args), name=f"bench-{what}", daemon=False)
    proc.start()
    child.close()
    try:
        if on_start is not None:
            assert proc.pid is not None
            on_start(proc.pid)
        deadline = time.monotonic() + timeout_s
        while not parent.poll(0.5):
            if not proc.is_alive() and not parent.poll():
                raise BenchError(f"{what}: the child process exited with code {proc.exitcode}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: no answer within {timeout_s:.0f} s")
        kind, payload = parent.recv()
        if kind == "error":
            raise BenchError(f"{what} failed in the child process:\n{payload}")
        return payload
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.terminate()
            proc.join(10)


def _child_main(conn: Connection, fn: Callable[..., Any], *args: Any) -> None:
    try:
        conn.send(("done", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --- 1. the projector on a real broker ------------------------------------------------------------


def _history(events_wanted: int, seed: int) -> list[Any]:
    """At least ``events_wanted`` events of a recorded history (about 4.7 events per request)."""
    from tests.factories import POLICY, run_history

    n = max(1, math.ceil(events_wanted / 4.6))
    events = run_history(POLICY, n, seed)
    while len(events) < events_wanted:  # never more than one extra round in practice
        n = math.ceil(n * events_wanted / len(events) * 1.02)
        events = run_history(POLICY, n, seed)
    return events


async def _prefill(bootstrap: str, topics: Topics, events: list[Any]) -> dict[str, Any]:
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


async def _end_offsets(bootstrap: str, topics: Topics) -> dict[tuple[str, int], int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    try:
        tps = [TopicPartition(t, p) for t in topics.all for p in range(DEFAULT_PARTITIONS)]
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


def _baseline_consumer(bootstrap: str, namespace: str, ends: dict[str, int]) -> dict[str, Any]:
    """Child: the projector's consumer (same settings, same getmany), reading without processing."""

    async def read() -> dict[str, Any]:
        topics = Topics(namespace=namespace)
        t0 = time.perf_counter()
        consumer = new_consumer(
            bootstrap, (), topics.group("bench-baseline"), max_partition_fetch_bytes=4 * 1024 * 1024
        )
        await start_client(consumer, bootstrap)
        try:
            tps = [TopicPartition(t, p) for t in topics.all for p in range(DEFAULT_PARTITIONS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            want = {TopicPartition(k.split("|")[0], int(k.split("|")[1])): v for k, v in ends.items()}
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

    c0 = _own_cpu_s()
    out = asyncio.run(read())
    out["cpu_s"] = round(_own_cpu_s() - c0, 2)
    out["peak_rss_mb"] = round(_own_rss_mb(), 1)
    return out


def _projector_child(
    bootstrap: str,
    namespace: str,
    evidence_dir: str,
    regions: dict[str, str],
    ends: dict[str, int],
    flush_rows: int,
    flush_interval_s: float,
) -> dict[str, Any]:
    """Child: the real Projector from offset 0 until its manifest positions reach the end offsets."""
    from nexuscore.projections import _projector

    want = {(k.split("|")[0], int(k.split("|")[1])): v for k, v in ends.items() if v > 0}
    total = sum(want.values())

    async def project() -> dict[str, Any]:
        projector = Projector(
            bootstrap,
            Path(evidence_dir),
            _signing_key(),
            SystemClock(),
            regions=regions,
            topics=Topics(namespace=namespace),
            flush_rows=flush_rows,
            flush_interval_s=flush_interval_s,
        )
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
            "flush_rows": flush_rows,
            "flush_interval_s": flush_interval_s,
            "seconds": round(seconds, 3),
            "events_per_s": round(total / seconds),
            "seconds_from_first_event": round(t1 - (first or t0), 3),
            "events_per_s_from_first_event": round(total / (t1 - (first or t0))),
        }

    c0 = _own_cpu_s()
    targets = {"flush (in a thread)": (_projector.Projector, "flush"), **_sealing_targets()}
    with CallTimer(targets) as timer:
        out = asyncio.run(project())
    cpu = _own_cpu_s() - c0
    out["cpu_s"] = round(cpu, 2)
    out["cpu_us_per_event"] = round(cpu / out["events_in_log"] * 1e6, 1)
    out["peak_rss_mb"] = round(_own_rss_mb(), 1)
    out["timed_calls"] = timer.result()
    return out


def _projector_offline(
    bootstrap: str, namespace: str, evidence_dir: str, regions: dict[str, str], flush_rows: int
) -> dict[str, Any]:
    """Child: where the projector's time goes, without the broker in the loop.

    Every record is read into memory first (plain consumer); then ``Projector.add`` and
    ``Projector.flush`` run on them exactly as ``Projector._loop`` calls them (a flush every
    ``flush_rows`` events), with the main steps timed by wrappers (about 0.3 µs per wrapped call).
    """
    from nexuscore.projections import _projector, _tables

    topics = Topics(namespace=namespace)

    async def read_all() -> list[Any]:
        consumer = new_consumer(
            bootstrap, (), topics.group("bench-offline"), max_partition_fetch_bytes=4 * 1024 * 1024
        )
        await start_client(consumer, bootstrap)
        try:
            tps = [TopicPartition(t, p) for t in topics.all for p in range(DEFAULT_PARTITIONS)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            remaining = {tp for tp, end in ends.items() if end > 0}
            records: list[Any] = []
            while remaining:
                fetched = await consumer.getmany(timeout_ms=100, max_records=10_000)
                for tp, batch in fetched.items():
                    records.extend(batch)
                    if batch and batch[-1].offset + 1 >= ends[tp]:
                        remaining.discard(tp)
        finally:
            await consumer.stop()
        return records

    records = asyncio.run(read_all())
    projector = Projector(
        bootstrap,
        Path(evidence_dir),
        _signing_key(),
        SystemClock(),
        regions=regions,
        topics=topics,
        flush_rows=flush_rows,
    )
    projector.recover()
    targets = {
        "add: AvroCodec.decode_record (fastavro; all topics)": (AvroCodec, "decode_record"),
        "add: decode_tenant_event (requests: decode + msgspec validation)": (
            _projector,
            "decode_tenant_event",
        ),
        "add: msgspec.to_builtins (requests)": (_projector.msgspec, "to_builtins"),
        "add: _Recent.seen (dedup window)": (_projector._Recent, "seen"),
        "add: _protect (FieldCipher.encrypt)": (_projector.Projector, "_protect"),
        "flush": (_projector.Projector, "flush"),
        "flush: SealedWriter.write": (SealedWriter, "write"),
        **{f"flush: {k}": v for k, v in _sealing_targets().items()},
    }
    builders = dict(_tables.ROW_BUILDERS)
    built = [0.0]

    def timed_builder(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def call(r: dict[str, Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(r)
            finally:
                built[0] += time.perf_counter() - t0

        return call

    for cls, fn in builders.items():
        _tables.ROW_BUILDERS[cls] = timed_builder(fn)
    try:
        with CallTimer(targets) as timer:
            add, flush = projector.add, projector.flush
            c0, t0 = _own_cpu_s(), time.perf_counter()
            batches: dict[Any, Any] = {}
            pending = 0
            for record in records:
                add(batches, record)
                pending += 1
                if pending >= flush_rows:
                    flush(batches)
                    batches, pending = {}, 0
            if batches:
                flush(batches)
            seconds, cpu = time.perf_counter() - t0, _own_cpu_s() - c0
    finally:
        _tables.ROW_BUILDERS.update(builders)
    calls = timer.result()
    calls["add: ROW_BUILDERS (Avro record -> row dict)"] = {"s": round(built[0], 3), "calls": len(records)}
    flush_s = timer.seconds["flush"]
    write_s = timer.seconds["flush: SealedWriter.write"]
    commit_s = timer.seconds["flush: manifest commit + sign"]
    calls["flush: Table.from_pylist (= flush - write - commit)"] = {
        "s": round(flush_s - write_s - commit_s, 3),
        "calls": timer.calls["flush: SealedWriter.write"],
    }
    calls["add: everything (= total - flush)"] = {"s": round(seconds - flush_s, 3), "calls": len(records)}
    return {
        "events": len(records),
        "flush_rows": flush_rows,
        "seconds": round(seconds, 2),
        "events_per_s": round(len(records) / seconds),
        "cpu_s": round(cpu, 2),
        "us_per_event": round(seconds / len(records) * 1e6, 1),
        "timed_calls": {k: calls[k] for k in sorted(calls, key=lambda k: (k.split(":")[0], -calls[k]["s"]))},
        "files": projector.writer.files if projector.writer else None,
    }


def run_kafka(args: Params, run_id: str, work: Path) -> dict[str, Any]:
    policy = default_policy()
    results: dict[str, Any] = {}
    print(f"[kafka] building a recorded history of >= {args.kafka_events:,} events", flush=True)
    t0 = time.perf_counter()
    events = _history(args.kafka_events, args.seed)
    results["history_s"] = round(time.perf_counter() - t0, 1)
    with kafka_broker() as bootstrap:
        broker_pid = find_broker_pid(bootstrap)
        results["broker"] = {
            "bootstrap": bootstrap,
            "external": bool(os.environ.get("NEXUSCORE_BOOTSTRAP", "").strip()),
            "pid": broker_pid,
            "kafka_version": _kafka_version(),
        }
        topics = Topics(namespace=f"bench-evidence-{run_id}.")
        try:
            asyncio.run(ensure_topics(bootstrap, topics))
            print(f"[kafka] publishing {len(events):,} events to {topics.namespace}*", flush=True)
            results["prefill"] = asyncio.run(_prefill(bootstrap, topics, events))
            del events
            ends = asyncio.run(_end_offsets(bootstrap, topics))
            wire_ends = {f"{t}|{p}": e for (t, p), e in ends.items()}
            total = sum(ends.values())
            print(f"[kafka] baseline: a plain aiokafka consumer reads {total:,} messages", flush=True)
            results["baseline"] = run_child(
                _child_main,
                (_baseline_consumer, bootstrap, topics.namespace, wire_ends),
                600,
                "baseline consumer",
            )
            b = results["baseline"]
            print(
                f"    {b['messages']:,} messages in {b['seconds']} s = {b['messages_per_s']:,}/s", flush=True
            )
            evidence = work / "kafka-evidence"
            regions = {t.id: t.home_region for t in policy.tenants}
            profiler: list[Profiler] = []
            pyspy_out = RESULTS_DIR / "evidence-projector.pyspy.txt"

            def start_profiler(pid: int) -> None:
                if args.profile:
                    profiler.append(Profiler(pid, pyspy_out))

            broker_cpu0 = cpu_seconds(broker_pid) if broker_pid else None
            print(
                f"[kafka] projector: {total:,} events from offset 0 (flush_rows {args.flush_rows:,}, "
                f"flush_interval_s {args.flush_interval_s:g})",
                flush=True,
            )
            try:
                p = run_child(
                    _child_main,
                    (
                        _projector_child,
                        bootstrap,
                        topics.namespace,
                        str(evidence),
                        regions,
                        wire_ends,
                        args.flush_rows,
                        args.flush_interval_s,
                    ),
                    3600,
                    "projector",
                    on_start=start_profiler,
                )
            finally:
                for prof in profiler:
                    prof.stop()
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
            if profiler:
                prof = profiler[0]
                if prof.error:
                    results["profile"] = {"skipped": prof.error}
                else:
                    raw = pyspy_out
                    results["profile"] = summarise_profile(raw)
                    results["profile"]["raw"] = str(raw.relative_to(RESULTS_DIR.parent.parent))
            print("[kafka] the projector's own processing, records already in memory (no broker)", flush=True)
            o = run_child(
                _child_main,
                (
                    _projector_offline,
                    bootstrap,
                    topics.namespace,
                    str(work / "offline-evidence"),
                    regions,
                    args.flush_rows,
                ),
                3600,
                "offline projector",
            )
            results["projector_offline"] = o
            shutil.rmtree(work / "offline-evidence", ignore_errors=True)
            print(f"    {o['events']:,} events in {o['seconds']} s = {o['events_per_s']:,}/s", flush=True)
            # The projection itself must be sound: verify what the projector wrote.
            report = verify(evidence, _signing_key().public_key(), {policy.digest})
            results["projector_verify"] = {
                "ok": report.ok,
                "rows": report.rows,
                "files": report.files,
                "seconds": round(report.seconds, 2),
                "findings": [f"{f.kind} {f.where}: {f.detail}" for f in report.findings],
            }
            print(
                f"    verify of the projection: ok={report.ok}, {report.rows:,} rows, {report.files} files, "
                f"{report.seconds:.1f} s",
                flush=True,
            )
            shutil.rmtree(evidence, ignore_errors=True)
        finally:
            if results["broker"]["external"]:
                with contextlib.suppress(Exception):
                    asyncio.run(delete_topics_with_prefix(bootstrap, topics.namespace))
    return results


# --- 2. an evidence store of N decisions, vectorised ------------------------------------------------

_TS = pa.timestamp("us", tz="UTC")
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_WORDS = (
    *("account", "payment", "credit", "customer", "risk", "sanctions", "claim", "policy", "review"),
    *("transfer", "limit", "balance", "report", "the", "a", "of", "to", "and", "for", "with", "on"),
    *("is", "was", "please", "check", "whether", "this", "that", "our", "their", "summary"),
    *("decision", "invoice", "counterparty", "exposure", "rating", "memo", "screening", "match"),
    *("alert", "fraud", "chargeback", "merchant"),
)
RISK_W = (50, 30, 17, 3)  # weights of nexuscore._synthetic's RISKS and CLASSES, in their order
CLASS_W = (20, 40, 30, 10)
TIERS = ("small", "mid", "frontier")
TENANT_W = (0.4, 0.3, 0.1, 0.2)  # the default policy's four tenants, in its order
UNKNOWN_FEATURES = ("beta-assistant", "legacy-summariser")
MAX_OUT = (64, 128, 256, 512)
REJECT_SHARE = 0.005  # requests refused at admission, on top of the decisions
SUBJECT_SHARE = 0.02  # requests naming a data subject (a key of its own)
SUBJECTS_PER_TENANT = 50
# Which topic each table's events travel on.
TOPIC_OF_TABLE = {
    "requests": "requests",
    "decisions": "decisions",
    "rejections": "decisions",
    "settlements": "decisions",
    "dispatches": "dispatch",
    "attempts": "attempts",
    "outcomes": "outcomes",
}
WRITTEN_TABLES = tuple(TOPIC_OF_TABLE)
MS = 1000  # microseconds


@functools.cache
def _corpus(seed: int) -> str:
    """About 4 MB of words: prompts and responses are slices of it."""
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS)[rng.integers(0, len(_WORDS), 700_000)]
    return " ".join(words.tolist())


def hex_ids(rng: np.random.Generator, n: int) -> pa.StringArray:
    """``n`` random 32-hex-digit ids (as ``derive_id`` makes), built without a Python loop."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    out = np.empty((n, 32), dtype=np.uint8)
    out[:, 0::2] = _HEX[raw >> 4]
    out[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def _take(values: Sequence[Any] | pa.Array, idx: np.ndarray, type_: pa.DataType | None = None) -> pa.Array:
    arr = values if isinstance(values, pa.Array) else pa.array(list(values), type=type_)
    return arr.take(pa.array(idx, type=pa.int64()))


def _ts(us: np.ndarray) -> pa.Array:
    return pa.array(us.astype(np.int64), type=_TS)


def _const(value: Any, n: int, type_: pa.DataType | None = None) -> pa.Array:
    return pa.array([value], type=type_ or pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def _choice(rng: np.random.Generator, n: int, weights: Sequence[float]) -> np.ndarray:
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(p), size=n, p=p / p.sum())


def _grouped_cumsum(keys: np.ndarray, values: np.ndarray, carry: dict[int, int]) -> np.ndarray:
    """Inclusive running sum of ``values`` per key, in row order, continuing from ``carry``."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order].astype(np.int64)
    cs = np.cumsum(v)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(k)]))
    inclusive = cs - (cs[starts] - v[starts])[group]
    base = np.array([carry.get(int(u), 0) for u in k[starts]], dtype=np.int64)
    inclusive += base[group]
    for u, last in zip(k[starts], inclusive[np.r_[starts[1:], len(k)] - 1], strict=True):
        carry[int(u)] = int(last)
    out = np.empty_like(inclusive)
    out[order] = inclusive
    return out


class PolicyTables:
    """The default policy as small lookup arrays the generator indexes."""

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.tenants = [t.id for t in policy.tenants]
        assert len(self.tenants) == len(TENANT_W), "the generator's tenant weights fit the default policy"
        self.regions = list(policy.regions)
        self.home = np.array([self.regions.index(t.home_region) for t in policy.tenants])
        self.partition = np.array(
            [(murmur2(t.encode()) & 0x7FFFFFFF) % DEFAULT_PARTITIONS for t in self.tenants]
        )
        self.tenant_budget = np.array([int(t.daily_budget_usd * 1_000_000) for t in policy.tenants])
        feats = [(ti, f) for ti, t in enumerate(policy.tenants) for f in t.features]
        self.feature_names = [f.id for _, f in feats]
        self.feature_budget = np.array([int(f.daily_budget_usd * 1_000_000) for _, f in feats])
        self.feature_slo = np.array([f.latency_slo_ms for _, f in feats])
        self.feature_base = np.array([sum(len(t.features) for t in policy.tenants[:i]) for i in range(4)])
        self.feature_count = np.array([len(t.features) for t in policy.tenants])
        deps = list(policy.deployments)
        self.deps = deps
        self.dep_ids = [d.id for d in deps]
        self.dep_model = [d.model for d in deps]
        self.dep_provider = [d.provider for d in deps]
        self.dep_region = [d.region for d in deps]
        self.dep_tier = np.array([TIERS.index(d.tier) for d in deps])
        self.dep_in = np.array([d.input_micros_per_1k for d in deps], dtype=np.int64)
        self.dep_out = np.array([d.output_micros_per_1k for d in deps], dtype=np.int64)
        self.dep_version = [f"{d.model}-2026-09-{10 + i:02d}" for i, d in enumerate(deps)]
        self.dep_nstrat = np.array([len(d.decode) for d in deps])
        self.dep_ttft = np.array(
            [[s.ttft_ms for s in d.decode][:2] + [0] * (2 - len(d.decode)) for d in deps]
        )
        self.dep_mspt = np.array(
            [[s.ms_per_output_token for s in d.decode][:2] + [0.0] * (2 - len(d.decode)) for d in deps]
        )
        self.strategy_names = sorted({s.name for d in deps for s in d.decode})
        self.dep_strat = np.array(
            [
                [self.strategy_names.index(s.name) for s in d.decode][:2] + [0] * (2 - len(d.decode))
                for d in deps
            ]
        )
        self.verdict_reason_dispatch = [f"reserved on {d.id} ({d.tier}, {d.region})" for d in deps]
        # Residency per (classification, tenant).
        self.res_rule: list[str] = []
        self.res_basis: list[str] = []
        self.res_allowed: list[list[str]] = []
        self.res_detail: list[str] = []
        for c in CLASSES:
            rule = policy.residency_by_class[c]
            for t in policy.tenants:
                allowed = sorted({t.home_region if r == "home" else r for r in rule.allowed})
                self.res_rule.append(rule.id)
                self.res_basis.append(rule.transfer_basis)
                self.res_allowed.append(allowed)
                self.res_detail.append(
                    f"{c} data of a {t.home_region} tenant: allowed in {', '.join(allowed)}"
                )
        # Chosen deployment per (classification, tenant, tier, needs tools): the cheapest that fits.
        self.chosen = np.full((len(CLASSES) * 4, len(TIERS), 2), -1)
        self.eligible: list[list[str]] = []
        for combo, allowed in enumerate(self.res_allowed):
            for tools in (0, 1):
                ok = [
                    i
                    for i, d in enumerate(deps)
                    if d.region in allowed and (not tools or "tools" in d.capabilities)
                ]
                if tools == 0:
                    self.eligible.append([deps[i].id for i in ok])
                for tier in range(len(TIERS)):
                    fits = [i for i in ok if self.dep_tier[i] == tier]
                    if fits:
                        self.chosen[combo, tier, tools] = min(
                            fits, key=lambda i: (self.dep_in[i] + self.dep_out[i], deps[i].id)
                        )
        # Eligible lists with tools required, appended after the 16 without.
        for allowed in self.res_allowed:
            self.eligible.append([d.id for d in deps if d.region in allowed and "tools" in d.capabilities])
        # An alternative each decision names as rejected, per (classification, tenant, tier).
        self.alt: list[tuple[str, str, str, str]] = []
        for allowed in self.res_allowed:
            outside = [d for d in deps if d.region not in allowed]
            for tier in range(len(TIERS)):
                if outside:
                    d = outside[tier % len(outside)]
                    self.alt.append(
                        (
                            "residency",
                            "rejected_alternative",
                            d.id,
                            f"region {d.region} is outside {', '.join(allowed)}",
                        )
                    )
                else:
                    above = [d for d in deps if TIERS.index(d.tier) > tier] or deps
                    d = above[0]
                    self.alt.append(
                        (
                            "routing",
                            "rejected_alternative",
                            d.id,
                            f"tier {d.tier} is above {TIERS[tier]}, the smallest adequate tier",
                        )
                    )
        self.escalation = {e.id: e for e in policy.escalation}
        self.rules = list(policy.routing.rules)


@dataclass
class EncryptJob:
    """What a worker needs to encrypt one content column of one chunk with ``FieldCipher``."""

    keys_dir: str
    column: str
    tenants: list[str]
    tenant_idx: np.ndarray
    subjects: list[str]
    event_ids: pa.Array
    starts: np.ndarray
    lengths: np.ndarray
    corpus_seed: int
    now: datetime


@functools.cache
def _cipher(keys_dir: str) -> FieldCipher:
    return FieldCipher(LocalKeyStore(Path(keys_dir)))


def encrypt_column(job: EncryptJob) -> tuple[pa.Array, pa.Array, float, float]:
    """(key ids, ciphertexts, seconds, CPU seconds): the projector's encryption, one call per row."""
    t0, c0 = time.perf_counter(), _own_cpu_s()
    cipher = _cipher(job.keys_dir)
    corpus = _corpus(job.corpus_seed)
    encrypt = cipher.encrypt
    tenants, column, now = job.tenants, job.column, job.now
    keys: list[str] = []
    blobs: list[bytes] = []
    add_key, add_blob = keys.append, blobs.append
    for t, s, e, o, n in zip(
        job.tenant_idx.tolist(),
        job.subjects,
        job.event_ids.to_pylist(),
        job.starts.tolist(),
        job.lengths.tolist(),
        strict=True,
    ):
        k, b = encrypt(tenants[t], s or None, e, column, corpus[o : o + n], now)
        add_key(k)
        add_blob(b)
    out = pa.array(keys, type=pa.string()), pa.array(blobs, type=pa.binary())
    return (*out, time.perf_counter() - t0, _own_cpu_s() - c0)


@dataclass
class Chunk:
    """One flush of generated evidence: every column but the encrypted ones, and where rows go."""

    columns: dict[str, dict[str, pa.Array]]
    partition: dict[str, np.ndarray]
    region: dict[str, np.ndarray]
    offset: dict[str, np.ndarray]
    checkpoint: list[dict[str, Any]]
    ranges: dict[tuple[str, int], tuple[int, int]]
    jobs: dict[str, EncryptJob]
    rows: dict[str, int]
    sample_requests: list[str] = field(default_factory=list)


class StoreGenerator:
    """Deterministic (per seed) evidence of ``total`` decisions, one chunk at a time."""

    def __init__(
        self, policy: RoutingPolicy, total: int, chunk: int, seed: int, days: int, start: datetime, keys: Path
    ) -> None:
        self.p = PolicyTables(policy)
        self.digest = policy.digest
        self.version = policy.version
        self.total = total
        self.chunk = chunk
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.start_us = int(start.timestamp() * 1_000_000)
        self.days = days
        span = days * 86_400 * 1_000_000
        self.step_us = span / (total * (1 + REJECT_SHARE))
        self.keys = keys
        self.done = 0  # decisions so far
        self.requests = 0  # requests so far (decisions + rejections)
        self.next_offset: dict[tuple[str, int], int] = defaultdict(int)
        self.carry: dict[str, dict[int, int]] = defaultdict(dict)
        self.day_names = [(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days + 2)]
        self.subjects = [
            [f"{t}:customer-{k:05d}" for k in range(SUBJECTS_PER_TENANT)] for t in self.p.tenants
        ]
        self.now = datetime.now(UTC)

    def __iter__(self) -> Iterator[Chunk]:
        while self.done < self.total:
            n = min(self.chunk, self.total - self.done)
            yield self._chunk(n)
            self.done += n

    # The heart of it: one chunk's columns.
    def _chunk(self, n_dec: int) -> Chunk:
        rng, p = self.rng, self.p
        n_rej = int(round(n_dec * REJECT_SHARE))
        m = n_dec + n_rej
        g = self.requests + np.arange(m)
        t_req = self.start_us + ((g + rng.random(m)) * self.step_us).astype(np.int64)
        self.requests += m
        tenant = _choice(rng, m, TENANT_W)
        rejected = np.zeros(m, dtype=bool)
        rejected[rng.choice(m, size=n_rej, replace=False)] = True
        local_f = (rng.random(m) * p.feature_count[tenant]).astype(np.int64)
        feat = p.feature_base[tenant] + local_f
        task = rng.integers(0, len(TASKS), m)
        risk = _choice(rng, m, RISK_W)
        cls = _choice(rng, m, CLASS_W)
        prompt_chars = np.clip(rng.lognormal(math.log(300), 0.8, m), 20, 12_000).astype(np.int64)
        max_out = np.array(MAX_OUT)[rng.integers(0, len(MAX_OUT), m)]
        tools = rng.random(m) < 0.1
        has_complexity = rng.random(m) < 0.5
        complexity = np.round(rng.random(m), 3)
        slo_choice = rng.integers(0, 4, m)  # None, None, 3000, 8000
        req_slo = np.where(slo_choice == 2, 3000, 8000)
        req_slo_null = slo_choice < 2
        subj = rng.random(m) < SUBJECT_SHARE
        subj_k = rng.integers(0, SUBJECTS_PER_TENANT, m)
        subjects = [
            self.subjects[t][k] if s else ""
            for t, k, s in zip(tenant.tolist(), subj_k.tolist(), subj.tolist(), strict=True)
        ]
        subject_arr = pa.array(subjects, type=pa.string())
        req_id = hex_ids(rng, m)
        trace = hex_ids(rng, m)
        tenant_arr = _take(p.tenants, tenant)
        corpus_len = len(_corpus(self.seed))
        feature_arr = _take(p.feature_names, feat)
        unknown = rng.integers(0, len(UNKNOWN_FEATURES), m)
        feature_req = pc.if_else(
            pa.array(rejected), _take(UNKNOWN_FEATURES, unknown), feature_arr
        )  # a rejected request names a feature its tenant does not have
        cols: dict[str, dict[str, pa.Array]] = {}
        parts: dict[str, np.ndarray] = {}
        regs: dict[str, np.ndarray] = {}
        times: dict[str, np.ndarray] = {}
        tenant_of: dict[str, np.ndarray] = {}
        cols["requests"] = {
            "event_id": req_id,
            "request_id": req_id,
            "tenant_id": tenant_arr,
            "occurred_at": _ts(t_req),
            "producer": _const("api-gateway", m),
            "causation_id": _const("", m),
            "trace_id": trace,
            "policy_digest": _const("", m),
            "feature": feature_req,
            "task_type": _take(TASKS, task),
            "risk_class": _take(RISKS, risk),
            "data_classification": _take(CLASSES, cls),
            "prompt_chars": pa.array(prompt_chars),
            "max_output_tokens": pa.array(max_out.astype(np.int64)),
            "required_capabilities": pa.ListArray.from_arrays(
                pa.array(np.r_[0, np.cumsum(tools)].astype(np.int32)), _const("tools", int(tools.sum()))
            ),
            "complexity": pa.array(complexity, mask=~has_complexity),
            "latency_slo_ms": pa.array(req_slo.astype(np.int64), mask=req_slo_null),
            "data_subject": subject_arr,
        }
        times["requests"], tenant_of["requests"] = t_req, tenant
        jobs = {
            "requests": EncryptJob(
                str(self.keys),
                "prompt",
                p.tenants,
                tenant,
                subjects,
                req_id,
                rng.integers(0, corpus_len - 12_001, m),
                prompt_chars,
                self.seed,
                self.now,
            )
        }

        # --- rejections -------------------------------------------------------------------------
        r = np.flatnonzero(rejected)
        t_rej = t_req[r] + 1 * MS
        rej_feature = _take(UNKNOWN_FEATURES, unknown[r])
        cols["rejections"] = {
            "event_id": hex_ids(rng, n_rej),
            "request_id": _take(req_id, r),
            "tenant_id": _take(tenant_arr, r),
            "occurred_at": _ts(t_rej),
            "producer": _const("nexuscore.decider", n_rej),
            "causation_id": _take(req_id, r),
            "trace_id": _take(trace, r),
            "policy_digest": _const(self.digest, n_rej),
            "reason_code": _const("unknown_feature", n_rej),
            "reason": pc.binary_join_element_wise(
                "feature '", rej_feature, "' is not configured for tenant '", _take(tenant_arr, r), "'", ""
            ),
            "policy_version": _const(self.version, n_rej),
        }
        times["rejections"], tenant_of["rejections"] = t_rej, tenant[r]

        # --- decisions --------------------------------------------------------------------------
        d = np.flatnonzero(~rejected)
        dt, dcls = tenant[d], cls[d]
        combo = dcls * 4 + dt
        d_complexity = np.where(has_complexity[d], complexity[d], np.round(rng.random(n_dec), 3))
        floor = np.zeros(n_dec, dtype=np.int64)
        fired = np.full(n_dec, -1)
        for i, rule in enumerate(p.rules):
            w = rule.when
            hit = np.ones(n_dec, dtype=bool)
            if w.task_types:
                hit &= np.isin(task[d], [TASKS.index(x) for x in w.task_types])
            if w.risk_classes:
                hit &= np.isin(risk[d], [RISKS.index(x) for x in w.risk_classes])
            if w.capabilities:
                hit &= tools[d] if "tools" in w.capabilities else False
            if w.min_complexity is not None:
                hit &= d_complexity >= w.min_complexity
            rank = TIERS.index(rule.min_tier)
            better = hit & (rank > floor)
            floor[better], fired[better] = rank, i
        preferred = np.maximum(floor, (d_complexity >= p.policy.routing.mid_complexity).astype(np.int64))
        chosen = p.chosen[combo, preferred, tools[d].astype(np.int64)]
        escalated = np.zeros(n_dec, dtype=bool)
        esc_rule = np.full(n_dec, -1)
        esc_ids = list(p.escalation)
        for i, e in enumerate(p.escalation.values()):
            w = e.when
            hit = np.ones(n_dec, dtype=bool)
            if w.task_types:
                hit &= np.isin(task[d], [TASKS.index(x) for x in w.task_types])
            if w.risk_classes:
                hit &= np.isin(risk[d], [RISKS.index(x) for x in w.risk_classes])
            if w.min_complexity is not None:
                hit &= d_complexity >= w.min_complexity
            new = hit & ~escalated
            escalated |= hit
            esc_rule[new] = i
        denied = chosen < 0
        escalated &= ~denied
        dispatch = ~denied & ~escalated
        verdict = np.where(dispatch, 0, np.where(denied, 1, 2))
        dep = np.where(denied, 0, chosen)
        tokens_in = np.maximum(1, prompt_chars[d] // 4)
        estimate = -(-(tokens_in * p.dep_in[dep] + max_out[d] * p.dep_out[dep]) // 1000)
        estimate = np.where(denied, 0, estimate)
        t_dec = t_req[d] + 1 * MS
        day = (t_dec - self.start_us) // (86_400 * 1_000_000)
        tday = dt.astype(np.int64) * 1000 + day
        fday = feat[d].astype(np.int64) * 1000 + day
        committed_t = _grouped_cumsum(tday, estimate * dispatch, self.carry["tenant_committed"])
        committed_f = _grouped_cumsum(fday, estimate * dispatch, self.carry["feature_committed"])
        committed_t -= estimate * dispatch
        committed_f -= estimate * dispatch
        version = _grouped_cumsum(dt.astype(np.int64), dispatch.astype(np.int64), self.carry["version"]) * 2
        # Decode: the first strategy whose prediction fits the SLO, else the fastest.
        slo = np.where(req_slo_null[d], p.feature_slo[feat[d]], req_slo[d])
        pred = np.ceil(p.dep_ttft[dep] + p.dep_mspt[dep] * max_out[d][:, None]).astype(np.int64)
        two = p.dep_nstrat[dep] > 1
        fit0 = pred[:, 0] <= slo
        fit1 = two & (pred[:, 1] <= slo)
        pick = np.where(fit0, 0, np.where(fit1, 1, np.where(two & (pred[:, 1] < pred[:, 0]), 1, 0)))
        predicted = pred[np.arange(n_dec), pick]
        strategy = p.dep_strat[dep, pick]
        nd = ~dispatch
        # Reasons: 2-4 per decision.
        k = np.where(dispatch, rng.integers(2, 5, n_dec), rng.integers(2, 4, n_dec))
        offsets = np.r_[0, np.cumsum(k)].astype(np.int32)
        slots: list[tuple[np.ndarray, list[pa.Array]]] = []
        rows0 = np.arange(n_dec)
        slots.append(
            (
                rows0,
                [
                    _const("residency", n_dec),
                    _const("rule_fired", n_dec),
                    _take(p.res_rule, combo),
                    _take(p.res_detail, combo),
                ],
            )
        )
        # slot 1: an escalation rule, else the routing rule that set the floor, else a complexity note
        cstr = pc.cast(pa.array(d_complexity), pa.string())
        suggests = _take(
            [
                f" < {p.policy.routing.mid_complexity} suggests small",
                f" >= {p.policy.routing.mid_complexity} suggests mid",
            ],
            (d_complexity >= p.policy.routing.mid_complexity).astype(np.int64),
        )
        note = pc.binary_join_element_wise("complexity ", cstr, suggests, "")
        rule_ids = [r_.id for r_ in p.rules] or ["-"]
        rule_reason = [r_.reason or r_.min_tier for r_ in p.rules] or ["-"]
        esc_reason = [e.reason for e in p.escalation.values()] or ["-"]
        is_esc, is_rule = esc_rule >= 0, fired >= 0
        kind1 = np.where(escalated, 0, np.where(is_rule, 1, 2))
        slots.append(
            (
                rows0,
                [
                    _take(["escalation", "routing", "routing"], kind1),
                    _take(["rule_fired", "rule_fired", "note"], kind1),
                    pc.if_else(
                        pa.array(escalated),
                        _take(esc_ids or ["-"], np.maximum(esc_rule, 0)),
                        pc.if_else(
                            pa.array(is_rule),
                            _take(rule_ids, np.maximum(fired, 0)),
                            _const("complexity", n_dec),
                        ),
                    ),
                    pc.if_else(
                        pa.array(escalated & is_esc),
                        _take(esc_reason, np.maximum(esc_rule, 0)),
                        pc.if_else(pa.array(is_rule), _take(rule_reason, np.maximum(fired, 0)), note),
                    ),
                ],
            )
        )
        rows2 = np.flatnonzero(k >= 3)
        alt = np.array(combo * len(TIERS) + preferred)[rows2]
        slots.append((rows2, [_take([a[i] for a in p.alt], alt) for i in range(4)]))
        rows3 = np.flatnonzero(k >= 4)
        slots.append(
            (
                rows3,
                [
                    _const("decode", len(rows3)),
                    _const("note", len(rows3)),
                    _take(p.strategy_names, strategy[rows3]),
                    pc.binary_join_element_wise(
                        "predicts ",
                        pc.cast(pa.array(predicted[rows3]), pa.string()),
                        " ms against an SLO of ",
                        pc.cast(pa.array(slo[rows3]), pa.string()),
                        " ms",
                        "",
                    ),
                ],
            )
        )
        dest = np.concatenate([offsets[rows] + s for s, (rows, _) in enumerate(slots)])
        perm = np.empty(len(dest), dtype=np.int64)
        perm[dest] = np.arange(len(dest))
        seq = np.concatenate([np.full(len(rows), s, dtype=np.int32) for s, (rows, _) in enumerate(slots)])
        children = [pa.array(seq[perm], type=pa.int32())] + [
            pa.concat_arrays([arrs[i] for _, arrs in slots]).take(pa.array(perm)) for i in range(4)
        ]
        reasons = pa.ListArray.from_arrays(
            pa.array(offsets),
            pa.StructArray.from_arrays(
                children, fields=list(SCHEMAS["decisions"].field("reasons").type.value_type)
            ),
        )
        dec_id = hex_ids(rng, n_dec)
        d_req = _take(req_id, d)
        verdict_reason = pc.if_else(
            pa.array(dispatch),
            _take(p.verdict_reason_dispatch, dep),
            pc.if_else(
                pa.array(escalated),
                pc.binary_join_element_wise(
                    _take(esc_ids or ["-"], np.maximum(esc_rule, 0)),
                    _take(esc_reason, np.maximum(esc_rule, 0)),
                    ": ",
                ),
                pc.binary_join_element_wise(
                    "no_eligible_deployment: no deployment in ",
                    _take([", ".join(a) for a in p.res_allowed], combo),
                    " meets tier ",
                    _take(TIERS, preferred),
                    " and the request's needs",
                    "",
                ),
            ),
        )
        dep_str = _take(p.dep_ids, dep)
        null_str = pa.nulls(n_dec, pa.string())
        cols["decisions"] = {
            "event_id": dec_id,
            "request_id": d_req,
            "tenant_id": _take(tenant_arr, d),
            "occurred_at": _ts(t_dec),
            "producer": _const("nexuscore.decider", n_dec),
            "causation_id": d_req,
            "trace_id": _take(trace, d),
            "policy_digest": _const(self.digest, n_dec),
            "feature": _take(feature_arr, d),
            "verdict": _take(["dispatch", "denied", "escalated"], verdict),
            "verdict_reason": verdict_reason,
            "policy_version": _const(self.version, n_dec),
            "home_region": _take(p.regions, p.home[dt]),
            "allowed_regions": _take(pa.array(p.res_allowed, type=pa.list_(pa.string())), combo),
            "residency_rule": _take(p.res_rule, combo),
            "transfer_basis": _take(p.res_basis, combo),
            "complexity": pa.array(d_complexity),
            "floor_tier": _take(TIERS, floor),
            "preferred_tier": _take(TIERS, preferred),
            "tier": pc.if_else(pa.array(denied), null_str, _take(TIERS, p.dep_tier[dep])),
            "deployment_id": pc.if_else(pa.array(denied), null_str, dep_str),
            "eligible": _take(
                pa.array(p.eligible, type=pa.list_(pa.string())), combo + 16 * tools[d].astype(np.int64)
            ),
            "budget_action": _take(["reserved", "not_applicable"], nd.astype(np.int64)),
            "budget_window": _take(self.day_names, day),
            "estimated_cost_micros": pa.array(estimate.astype(np.int64)),
            "tenant_budget_micros": pa.array(p.tenant_budget[dt].astype(np.int64)),
            "tenant_committed_micros": pa.array(committed_t),
            "feature_budget_micros": pa.array(p.feature_budget[feat[d]].astype(np.int64)),
            "feature_committed_micros": pa.array(committed_f),
            "decode_strategy": pa.array(
                np.array(p.strategy_names, dtype=object)[strategy], mask=nd, type=pa.string()
            ),
            "latency_slo_ms": pa.array(slo.astype(np.int64), mask=nd),
            "predicted_latency_ms": pa.array(predicted, mask=nd),
            "fits_slo": pa.array(fit0 | fit1, mask=nd),
            "state_version": pa.array(version),
            "reasons": reasons,
        }
        times["decisions"], tenant_of["decisions"] = t_dec, dt

        # --- dispatches, attempts, outcomes, settlements -----------------------------------------
        x = np.flatnonzero(dispatch)  # index into decisions
        n_x = len(x)
        xr = d[x]  # index into requests
        xdep = dep[x]
        t_disp = t_dec[x] + 200  # 0.2 ms after the decision
        disp_id = hex_ids(rng, n_x)
        cols["dispatches"] = {
            "event_id": disp_id,
            "request_id": _take(req_id, xr),
            "tenant_id": _take(tenant_arr, xr),
            "occurred_at": _ts(t_disp),
            "producer": _const("nexuscore.decider", n_x),
            "causation_id": _take(dec_id, x),
            "trace_id": _take(trace, xr),
            "policy_digest": _const(self.digest, n_x),
            "feature": _take(feature_arr, xr),
            "deployment_id": _take(p.dep_ids, xdep),
            "provider": _take(p.dep_provider, xdep),
            "model": _take(p.dep_model, xdep),
            "region": _take(p.dep_region, xdep),
            "allowed_regions": _take(cols["decisions"]["allowed_regions"], x),
            "decode_strategy": _take(p.strategy_names, strategy[x]),
            "max_output_tokens": pa.array(max_out[xr].astype(np.int64)),
            "estimated_cost_micros": pa.array(estimate[x].astype(np.int64)),
            "requested_at": _ts(t_req[xr]),
            "data_subject": _take(subject_arr, xr),
        }
        times["dispatches"], tenant_of["dispatches"] = t_disp, tenant[xr]
        disp_part = rng.integers(0, DEFAULT_PARTITIONS, n_x)  # keyed by request id: spread evenly

        # Attempts: most calls succeed at once; some retry; a few fail for good.
        n_att = np.where(rng.random(n_x) < 0.96, 1, np.where(rng.random(n_x) < 0.875, 2, 3))
        failed = (n_att == 3) & (rng.random(n_x) < 0.5)
        att_of = np.repeat(np.arange(n_x), n_att)
        first_of = np.r_[0, np.cumsum(n_att)[:-1]]
        att_no = np.arange(len(att_of)) - first_of[att_of] + 1
        last = att_no == n_att[att_of]
        ok = last & ~failed[att_of]
        n_a = len(att_of)
        out_tokens = np.maximum(1, (max_out[xr] * rng.beta(2.0, 3.0, n_x)).astype(np.int64))
        out_tokens = np.where(failed, 0, out_tokens)
        ok_latency = predicted[x] * rng.uniform(0.5, 1.3, n_x) * np.maximum(out_tokens, 1) / max_out[xr]
        att_latency = np.where(ok, ok_latency[att_of], rng.uniform(40, 2000, n_a)).round(3)
        att_end = (
            t_disp[att_of]
            + (np.cumsum(att_latency) - (np.cumsum(att_latency)[first_of] - att_latency[first_of])[att_of])
            * MS
        )
        att_end = att_end.astype(np.int64)
        http = np.where(ok, 200, np.where(rng.random(n_a) < 0.7, 503, 429))
        err_text = _take(
            ["", "HTTP 503: upstream overloaded", "HTTP 429: rate limited"],
            np.where(ok, 0, np.where(http == 503, 1, 2)),
        )
        att_req = xr[att_of]
        cols["attempts"] = {
            "event_id": hex_ids(rng, n_a),
            "request_id": _take(req_id, att_req),
            "tenant_id": _take(tenant_arr, att_req),
            "occurred_at": _ts(att_end),
            "producer": _const("nexuscore.worker", n_a),
            "causation_id": _take(disp_id, att_of),
            "trace_id": _take(trace, att_req),
            "policy_digest": _const(self.digest, n_a),
            "attempt": pa.array(att_no.astype(np.int32)),
            "deployment_id": _take(p.dep_ids, xdep[att_of]),
            "region": _take(p.dep_region, xdep[att_of]),
            "status": _take(["error", "ok"], ok.astype(np.int64)),
            "http_status": pa.array(http.astype(np.int32)),
            "latency_ms": pa.array(att_latency),
            "retryable": pa.array(~ok),
            "error": err_text,
        }
        times["attempts"], tenant_of["attempts"] = att_end, tenant[att_req]
        t_out = att_end[np.cumsum(n_att) - 1] + 100
        in_tokens = np.where(failed, 0, tokens_in[x])
        cost = -(-(in_tokens * p.dep_in[xdep] + out_tokens * p.dep_out[xdep]) // 1000)
        total_latency = (t_out - t_disp) / MS
        out_id = hex_ids(rng, n_x)
        cols["outcomes"] = {
            "event_id": out_id,
            "request_id": _take(req_id, xr),
            "tenant_id": _take(tenant_arr, xr),
            "occurred_at": _ts(t_out),
            "producer": _const("nexuscore.worker", n_x),
            "causation_id": disp_id,
            "trace_id": _take(trace, xr),
            "policy_digest": _const(self.digest, n_x),
            "status": _take(["answered", "failed"], failed.astype(np.int64)),
            "feature": _take(feature_arr, xr),
            "deployment_id": _take(p.dep_ids, xdep),
            "model": _take(p.dep_model, xdep),
            "model_version": pc.if_else(pa.array(failed), _const("", n_x), _take(p.dep_version, xdep)),
            "region": _take(p.dep_region, xdep),
            "attempts": pa.array(n_att.astype(np.int32)),
            "input_tokens": pa.array(in_tokens.astype(np.int64)),
            "output_tokens": pa.array(out_tokens.astype(np.int64)),
            "cost_micros": pa.array(cost.astype(np.int64)),
            "latency_ms": pa.array(total_latency.round(3)),
            "finish_reason": _take(
                ["stop", "length", "error"],
                np.where(failed, 2, np.where(out_tokens >= max_out[xr], 1, 0)),
            ),
            "error": pc.if_else(
                pa.array(failed),
                _const("3 attempts failed; last: HTTP 503: upstream overloaded", n_x),
                _const("", n_x),
            ),
            "data_subject": _take(subject_arr, xr),
        }
        times["outcomes"], tenant_of["outcomes"] = t_out, tenant[xr]
        resp_chars = np.where(failed, 0, out_tokens * 4)
        jobs["outcomes"] = EncryptJob(
            str(self.keys),
            "response",
            p.tenants,
            tenant[xr],
            [subjects[i] for i in xr.tolist()],
            out_id,
            rng.integers(0, corpus_len - 12_001, n_x),
            resp_chars,
            self.seed,
            self.now,
        )
        t_set = t_out + 300
        xt = tenant[xr].astype(np.int64)
        spent_t = _grouped_cumsum(xt * 1000 + day[x], cost, self.carry["tenant_spent"])
        spent_f = _grouped_cumsum(
            feat[xr].astype(np.int64) * 1000 + day[x], cost, self.carry["feature_spent"]
        )
        cols["settlements"] = {
            "event_id": hex_ids(rng, n_x),
            "request_id": _take(req_id, xr),
            "tenant_id": _take(tenant_arr, xr),
            "occurred_at": _ts(t_set),
            "producer": _const("nexuscore.decider", n_x),
            "causation_id": out_id,
            "trace_id": _take(trace, xr),
            "policy_digest": _const(self.digest, n_x),
            "feature": _take(feature_arr, xr),
            "budget_window": _take(self.day_names, day[x]),
            "reserved_micros": pa.array(estimate[x].astype(np.int64)),
            "actual_micros": pa.array(cost.astype(np.int64)),
            "tenant_spent_micros": pa.array(spent_t),
            "feature_spent_micros": pa.array(spent_f),
            "state_version": pa.array(version[x] + 1),
        }
        times["settlements"], tenant_of["settlements"] = t_set, tenant[xr]

        # --- where every row goes: topic, partition (by key), offset (by time within the chunk) ----
        for table, t in tenant_of.items():
            parts[table] = disp_part if table == "dispatches" else p.partition[t]
            regs[table] = p.home[t]
        offsets_of: dict[str, np.ndarray] = {}
        checkpoint: list[dict[str, Any]] = []
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        topics = Topics()
        for kind in dict.fromkeys(TOPIC_OF_TABLE.values()):
            tables = [tb for tb, k_ in TOPIC_OF_TABLE.items() if k_ == kind]
            tt = np.concatenate([times[tb] for tb in tables])
            pp = np.concatenate([parts[tb] for tb in tables])
            order = np.lexsort((tt, pp))
            sp = pp[order]
            counts = np.bincount(pp, minlength=DEFAULT_PARTITIONS)
            first_index = np.r_[0, np.cumsum(counts)[:-1]]
            topic = getattr(topics, kind)
            base = np.array([self.next_offset[(topic, q)] for q in range(DEFAULT_PARTITIONS)], dtype=np.int64)
            sorted_offsets = np.arange(len(sp)) - first_index[sp] + base[sp]
            off = np.empty(len(tt), dtype=np.int64)
            off[order] = sorted_offsets
            at = 0
            for tb in tables:
                offsets_of[tb] = off[at : at + len(times[tb])]
                at += len(times[tb])
            for q in range(DEFAULT_PARTITIONS):
                if counts[q]:
                    start = self.next_offset[(topic, q)]
                    end = start + int(counts[q])
                    ranges[(topic, q)] = (start, end)
                    checkpoint.append(
                        {
                            "topic": topic,
                            "partition": q,
                            "start": start,
                            "end": end,
                            "events": int(counts[q]),
                            "duplicates": 0,
                            "undecodable": 0,
                        }
                    )
                    self.next_offset[(topic, q)] = end
        for table in WRITTEN_TABLES:
            c = cols[table]
            n_rows = len(offsets_of[table])
            c["data_region"] = _take(p.regions, regs[table])
            c["src_topic"] = _const(getattr(topics, TOPIC_OF_TABLE[table]), n_rows)
            c["src_partition"] = pa.array(parts[table].astype(np.int32))
            c["src_offset"] = pa.array(offsets_of[table])
        sample = [req_id[int(i)].as_py() for i in xr[rng.choice(n_x, size=min(n_x, 20), replace=False)]]
        return Chunk(
            columns=cols,
            partition=parts,
            region=regs,
            offset=offsets_of,
            checkpoint=sorted(checkpoint, key=lambda e: (e["topic"], e["partition"])),
            ranges=ranges,
            jobs=jobs,
            rows={tb: len(offsets_of[tb]) for tb in WRITTEN_TABLES},
            sample_requests=sample,
        )


# Columns of the current schemas the generator does not know, and what it wrote in them.
FILLED: dict[str, str] = {}


def write_chunk(
    writer: SealedWriter, gen: StoreGenerator, chunk: Chunk, encrypted: dict[str, tuple[pa.Array, pa.Array]]
) -> int:
    """Seal and write every file of a chunk, then commit it: one flush. Returns the files written."""
    files = 0
    content = {"requests": ("prompt", "prompt_key"), "outcomes": ("response", "response_key")}
    for table in WRITTEN_TABLES:
        cols = chunk.columns.pop(table)
        if table in content:
            keys, blobs = encrypted[table]
            cols[content[table][0]] = blobs
            cols[content[table][1]] = keys
        schema = SCHEMAS[table]
        n_rows = chunk.rows[table]
        for f in schema:
            if f.name not in cols:  # a column added to the schema after this generator was written
                cols[f.name] = (
                    _const("active", n_rows) if f.name == "policy_stage" else pa.nulls(n_rows, f.type)
                )
                FILLED[f"{table}.{f.name}"] = "active" if f.name == "policy_stage" else "null"
        data = pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)
        del cols
        part, reg, off = chunk.partition[table], chunk.region[table], chunk.offset[table]
        topic = getattr(Topics(), TOPIC_OF_TABLE[table])
        for q in np.unique(part).tolist():
            for r in np.unique(reg[part == q]).tolist():
                idx = np.flatnonzero((part == q) & (reg == r))
                idx = idx[np.argsort(off[idx], kind="stable")]
                start, end = chunk.ranges[(topic, q)]
                writer.write(
                    data.take(pa.array(idx)),
                    table=table,
                    region=gen.p.regions[r],
                    topic=topic,
                    partition=q,
                    first_offset=start,
                    last_offset=end - 1,
                )
                files += 1
        del data
    writer.commit(chunk.checkpoint, datetime.now(UTC))
    return files


def _generate(
    root: str, decisions: int, chunk_size: int, seed: int, days: int, start_iso: str
) -> dict[str, Any]:
    """Child: write the store; encryption of chunk k+1 overlaps with sealing chunk k (two cores)."""
    rootp = Path(root)
    gen = StoreGenerator(
        default_policy(),
        decisions,
        chunk_size,
        seed,
        days,
        datetime.fromisoformat(start_iso),
        rootp / "_keys",
    )
    writer = SealedWriter(rootp, _signing_key())
    c0 = _own_cpu_s()
    t0 = time.perf_counter()
    rows: Counter[str] = Counter()
    samples: list[str] = []
    gen_s = enc_wait_s = write_s = 0.0
    enc_s = enc_cpu = 0.0
    encrypted_fields = 0
    files = 0
    flushes = 0
    pending: tuple[Chunk, dict[str, Future[Any]]] | None = None
    # The encryption runs in one worker process while this one seals and writes.
    with (
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool,
        CallTimer(_sealing_targets()) as timer,
    ):

        def finish(item: tuple[Chunk, dict[str, Future[Any]]]) -> None:
            nonlocal enc_wait_s, write_s, enc_s, enc_cpu, encrypted_fields, files, flushes
            chunk, futures = item
            w0 = time.perf_counter()
            encrypted = {}
            for table, fut in futures.items():
                keys, blobs, secs, cpu = fut.result()
                encrypted[table] = (keys, blobs)
                enc_s += secs
                enc_cpu += cpu
                encrypted_fields += len(blobs)
            w1 = time.perf_counter()
            enc_wait_s += w1 - w0
            files += write_chunk(writer, gen, chunk, encrypted)
            write_s += time.perf_counter() - w1
            flushes += 1
            rows.update(chunk.rows)
            print(
                f"    flush {flushes}: {sum(rows.values()):,} rows, {files} files, {time.perf_counter() - t0:.0f} s",
                flush=True,
            )

        chunks = iter(gen)
        while True:
            g0 = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                break
            futures = {table: pool.submit(encrypt_column, job) for table, job in chunk.jobs.items()}
            chunk.jobs = {}
            samples.extend(chunk.sample_requests)
            gen_s += time.perf_counter() - g0
            if pending is not None:
                finish(pending)
            pending = (chunk, futures)
        if pending is not None:
            finish(pending)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in rootp.rglob("*") if f.is_file())
    parquet = sum(f.stat().st_size for f in rootp.glob("region=*/*/*.parquet"))
    return {
        "decisions": decisions,
        "chunk_decisions": chunk_size,
        "days": days,
        "start": start_iso,
        "seconds": round(seconds, 1),
        "cpu_s_main": round(_own_cpu_s() - c0, 1),
        "generate_s": round(gen_s, 1),
        "wait_for_encryption_s": round(enc_wait_s, 1),
        "seal_and_write_s": round(write_s, 1),
        "encryption": {
            "fields": encrypted_fields,
            "seconds_in_worker": round(enc_s, 1),
            "cpu_s_in_worker": round(enc_cpu, 1),
            "us_per_field": round(enc_s / max(encrypted_fields, 1) * 1e6, 2),
            "note": "FieldCipher.encrypt, one call per prompt/response, in one worker process overlapping the sealing",
        },
        "timed_calls": timer.result(),
        "flushes": flushes,
        "files": files,
        "rows": dict(rows),
        "rows_total": sum(rows.values()),
        "store_bytes": size,
        "store_gb": round(size / 1e9, 2),
        "parquet_gb": round(parquet / 1e9, 2),
        "peak_rss_mb_writer": round(_own_rss_mb(), 1),
        "sample_requests": samples,
        "tenant_shares": dict(zip(gen.p.tenants, TENANT_W, strict=True)),
        "columns_filled": dict(FILLED),
        "file_rows": _file_rows(rootp),
    }


def _file_rows(root: Path) -> dict[str, Any]:
    rows = sorted(e["rows"] for e in committed_files(root))
    if not rows:
        return {}
    return {"min": rows[0], "median": rows[len(rows) // 2], "max": rows[-1], "files": len(rows)}


def _looks_like_ours(root: Path) -> bool:
    """Only an evidence store (or nothing) may be deleted to make room for a new one."""
    if not root.exists():
        return True
    names = {p.name for p in root.iterdir()}
    return not names or bool(names & {META, "manifest.jsonl", "manifest.head.json"})


def build_store(args: Params) -> dict[str, Any]:
    root = args.root
    meta_path = root / META
    if args.reuse and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("complete") and meta["generation"]["decisions"] == args.decisions:
            print(
                f"[store] reusing {root} ({args.decisions:,} decisions, generated {meta['generated_at']})",
                flush=True,
            )
            return {**meta["generation"], "reused": True, "generated_at": meta["generated_at"]}
        print(f"[store] {root} holds another store; generating anew", flush=True)
    if not _looks_like_ours(root):
        raise BenchError(f"{root} exists and is not a benchmark store: refusing to delete it")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = datetime(2026, 10, 21, tzinfo=UTC)
    print(
        f"[store] generating {args.decisions:,} decisions in chunks of {args.chunk:,} under {root}",
        flush=True,
    )
    gen = run_child(
        _child_main,
        (_generate, str(root), args.decisions, args.chunk, args.seed, args.days, start.isoformat()),
        6 * 3600,
        "store generation",
    )
    meta = {
        "complete": True,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "generation": gen,
    }
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return {**gen, "reused": False, "generated_at": meta["generated_at"]}


# --- 3. queries, cold, against pyarrow baselines ------------------------------------------------------


def _paths(root: Path) -> dict[str, list[str]]:
    by_table: dict[str, list[str]] = defaultdict(list)
    for e in committed_files(root):
        by_table[e["table"]].append(str(root / e["path"]))
    return by_table


def baseline_who_routed_what(root: Path, tenant: str, since: datetime, until: datetime) -> pa.Table:
    """who_routed_what with pyarrow.dataset/compute only: the simplest correct code."""
    paths = _paths(root)
    dec = ds.dataset(paths["decisions"], format="parquet").to_table(
        columns=[
            "request_id",
            "tenant_id",
            "feature",
            "verdict",
            "tier",
            "deployment_id",
            "policy_version",
            "estimated_cost_micros",
        ],
        filter=(pc.field("tenant_id") == tenant)
        & (pc.field("occurred_at") >= pa.scalar(since, _TS))
        & (pc.field("occurred_at") < pa.scalar(until, _TS)),
    )
    out = ds.dataset(paths["outcomes"], format="parquet").to_table(
        columns=["request_id", "model", "region", "status", "cost_micros"]
    )
    j = dec.join(out, keys="request_id", join_type="left outer")
    j = j.append_column(
        "answered", pc.cast(pc.fill_null(pc.equal(j["status"], "answered"), False), pa.int64())
    )
    j = j.append_column(
        "est_dispatch", pc.if_else(pc.equal(j["verdict"], "dispatch"), j["estimated_cost_micros"], None)
    )
    keys = ["tenant_id", "feature", "verdict", "tier", "deployment_id", "policy_version"]
    g = j.group_by(keys, use_threads=True).aggregate(
        [
            ("model", "min"),
            ("region", "min"),
            ("request_id", "count", pc.CountOptions(mode="all")),
            ("answered", "sum"),
            ("est_dispatch", "sum"),
            ("cost_micros", "sum"),
        ]
    )
    names = {
        "model_min": "model",
        "region_min": "region",
        "request_id_count": "requests",
        "answered_sum": "answered",
        "est_dispatch_sum": "est",
        "cost_micros_sum": "cost",
    }
    g = g.rename_columns([names.get(c, c) for c in g.column_names])
    return g.sort_by([("tenant_id", "ascending"), ("feature", "ascending"), ("requests", "descending")])


def baseline_spend(root: Path) -> pa.Table:
    paths = _paths(root)
    out = ds.dataset(paths["outcomes"], format="parquet").to_table(
        columns=[
            "tenant_id",
            "feature",
            "occurred_at",
            "model",
            "input_tokens",
            "output_tokens",
            "cost_micros",
        ]
    )
    out = out.append_column("day", pc.cast(out["occurred_at"], pa.date32()))
    spend = out.group_by(["tenant_id", "feature", "day", "model"]).aggregate(
        [
            ("cost_micros", "count", pc.CountOptions(mode="all")),
            ("input_tokens", "sum"),
            ("output_tokens", "sum"),
            ("cost_micros", "sum"),
        ]
    )
    spend = spend.append_column("window", pc.strftime(pc.cast(spend["day"], _TS), "%Y-%m-%d"))
    st = ds.dataset(paths["settlements"], format="parquet").to_table(
        columns=["tenant_id", "budget_window", "tenant_spent_micros"]
    )
    budget = st.group_by(["tenant_id", "budget_window"]).aggregate([("tenant_spent_micros", "max")])
    dec = ds.dataset(paths["decisions"], format="parquet").to_table(
        columns=["tenant_id", "budget_window", "tenant_budget_micros"]
    )
    limits = dec.group_by(["tenant_id", "budget_window"]).aggregate([("tenant_budget_micros", "max")])
    j = spend.join(budget, keys=["tenant_id", "window"], right_keys=["tenant_id", "budget_window"]).join(
        limits, keys=["tenant_id", "window"], right_keys=["tenant_id", "budget_window"]
    )
    return j.sort_by(
        [("day", "ascending"), ("tenant_id", "ascending"), ("feature", "ascending"), ("model", "ascending")]
    )


def baseline_lineage(root: Path, request_id: str) -> list[dict[str, Any]]:
    """The lineage rows with pyarrow.dataset filters (no bloom filters, no DuckDB), same details."""
    from nexuscore.projections import _lineage

    paths = _paths(root)
    keystore = LocalKeyStore(root / "_keys")
    cipher = FieldCipher(keystore)
    holder = SimpleNamespace(keystore=keystore)
    rows = []
    for table in _lineage._ORDER:
        if not paths.get(table):
            continue
        found = (
            ds.dataset(paths[table], format="parquet")
            .to_table(filter=pc.field("request_id") == request_id)
            .sort_by("src_offset")
            .to_pylist()
        )
        for r in found:
            rows.append(
                {
                    "occurred_at": r["occurred_at"],
                    "event": table,
                    "event_id": r["event_id"],
                    "detail": _lineage._detail(holder, cipher, table, r),  # type: ignore[arg-type]
                }
            )
    rows.sort(key=lambda x: (x["occurred_at"], _lineage._ORDER.index(x["event"])))
    return rows


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _cold(root: Path, call: Callable[[EvidenceStore], Any]) -> tuple[float, float, Any]:
    t0 = time.perf_counter()
    store = EvidenceStore(root)
    t1 = time.perf_counter()
    try:
        out = call(store)
    finally:
        store.close()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def _stats(xs: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(_median(xs), 4),
        "min_s": round(min(xs), 4),
        "max_s": round(max(xs), 4),
        "runs_s": [round(x, 4) for x in xs],
    }


def run_queries(args: Params, store_info: dict[str, Any]) -> dict[str, Any]:
    root = args.root
    policy = default_policy()
    tenant = policy.tenants[0].id  # acme-bank: the largest share
    start = datetime.fromisoformat(store_info["start"])
    until = start + timedelta(days=store_info["days"])
    since = until - timedelta(days=30)
    results: dict[str, Any] = {
        "repeat": args.repeat,
        "cache": "process-cold (fresh EvidenceStore, i.e. a new DuckDB connection, per run); OS page cache warm",
    }
    # Opening alone.
    opens = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        EvidenceStore(root).close()
        opens.append(time.perf_counter() - t0)
    results["open"] = _stats(opens)
    results["files_committed"] = len(committed_files(root))

    # who routed what
    print(f"[queries] who_routed_what({tenant}, last 30 days) x{args.repeat}, cold", flush=True)
    totals, opens_w, answer = [], [], None
    for _ in range(args.repeat):
        o, q, answer = _cold(root, lambda s: s.who_routed_what(tenant, since, until))
        opens_w.append(o)
        totals.append(o + q)
    base_t, base_answer = [], None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        base_answer = baseline_who_routed_what(root, tenant, since, until)
        base_t.append(time.perf_counter() - t0)
    assert answer is not None and base_answer is not None
    same = _same_who(answer, base_answer)
    results["who_routed_what"] = {
        "tenant": tenant,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "groups": answer.num_rows,
        "decisions_counted": int(pc.sum(answer["requests"]).as_py()),
        "total_s": _stats(totals),
        "open_s": _stats(opens_w),
        "baseline_s": _stats(base_t),
        "baseline": "pyarrow.dataset scan (tenant/time filter pushed down) + Table.join + group_by",
        "answers_match": same,
        "ratio_to_baseline": round(_median(totals) / _median(base_t), 3),
    }
    print(
        f"    {_median(totals):.3f} s (baseline {_median(base_t):.3f} s); answers match: {same}", flush=True
    )

    # lineage
    samples = store_info["sample_requests"]
    rng = np.random.default_rng(args.seed)
    picks = [samples[i] for i in rng.choice(len(samples), size=min(args.repeat, len(samples)), replace=False)]
    print(f"[queries] lineage of {len(picks)} different requests, cold", flush=True)
    totals, opens_l, base_t = [], [], []
    matches = []
    events = []
    for rid in picks:
        o, q, lin = _cold(root, lambda s, rid=rid: s.lineage(rid))
        opens_l.append(o)
        totals.append(o + q)
        t0 = time.perf_counter()
        base = baseline_lineage(root, rid)
        base_t.append(time.perf_counter() - t0)
        mine = [(r["event"], r["event_id"], r["detail"]) for r in lin.to_pylist()]
        matches.append(sorted(mine) == sorted((r["event"], r["event_id"], r["detail"]) for r in base))
        events.append(len(mine))
    results["lineage"] = {
        "requests": picks,
        "events_per_lineage": events,
        "total_s": _stats(totals),
        "open_s": _stats(opens_l),
        "baseline_s": _stats(base_t),
        "baseline": "pyarrow.dataset scan per table with request_id == X (statistics only, no bloom filters) + the same decryption and formatting",
        "answers_match": all(matches),
        "ratio_to_baseline": round(_median(totals) / _median(base_t), 3),
    }
    print(
        f"    {_median(totals) * 1000:.0f} ms (baseline {_median(base_t) * 1000:.0f} ms); match {all(matches)}",
        flush=True,
    )
    # A breakdown of one lineage call: where its time goes.
    results["lineage"]["breakdown"] = _lineage_breakdown(root, picks[0])

    # spend
    print(f"[queries] spend() x{args.repeat}, cold", flush=True)
    totals, opens_s, base_t = [], [], []
    for _ in range(args.repeat):
        o, q, answer = _cold(root, lambda s: s.spend())
        opens_s.append(o)
        totals.append(o + q)
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        base_answer = baseline_spend(root)
        base_t.append(time.perf_counter() - t0)
    same = (
        answer.num_rows == base_answer.num_rows
        and pc.sum(answer["calls"]).as_py() == pc.sum(base_answer["cost_micros_count"]).as_py()
        and abs(pc.sum(answer["cost_usd"]).as_py() - pc.sum(base_answer["cost_micros_sum"]).as_py() / 1e6)
        < 1e-3
    )
    results["spend"] = {
        "rows": answer.num_rows,
        "total_s": _stats(totals),
        "open_s": _stats(opens_s),
        "baseline_s": _stats(base_t),
        "baseline": "pyarrow.dataset scans of outcomes, settlements, decisions + group_by + joins",
        "answers_match": same,
        "ratio_to_baseline": round(_median(totals) / _median(base_t), 3),
    }
    print(f"    {_median(totals):.3f} s (baseline {_median(base_t):.3f} s); match {same}", flush=True)
    return results


def _same_who(answer: pa.Table, base: pa.Table) -> bool:
    def key(
        t: pa.Table, requests: str, answered: str, est: str, cost: str, scale: float
    ) -> list[tuple[Any, ...]]:
        d = t.to_pydict()
        return sorted(
            (
                d["tenant_id"][i],
                d["feature"][i],
                d["verdict"][i],
                d["tier"][i],
                d["deployment_id"][i],
                d["model"][i],
                d["region"][i],
                d[requests][i],
                d[answered][i] or 0,
                round((d[est][i] or 0) * scale, 6),
                round((d[cost][i] or 0) * scale, 6),
            )
            for i in range(t.num_rows)
        )

    mine = key(answer, "requests", "answered", "estimated_usd", "actual_usd", 1.0)
    theirs = key(base, "requests", "answered", "est", "cost", 1e-6)
    return mine == theirs


def _lineage_breakdown(root: Path, request_id: str) -> dict[str, Any]:
    """Where a cold lineage lookup goes: the statements ``lineage`` issues, and per table the same
    lookup reading only ``event_id`` (bloom filters + the request_id column of the matching row group)
    against reading every column (the whole row group: prompts and responses included)."""
    from nexuscore.projections import _lineage

    store = EvidenceStore(root)
    per: list[float] = []
    original = store.query

    def timed(sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        t0 = time.perf_counter()
        try:
            return original(sql, params)
        finally:
            per.append(time.perf_counter() - t0)

    store.query = timed  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        store.lineage(request_id)
        total = time.perf_counter() - t0
    finally:
        store.close()
    tables: dict[str, dict[str, float]] = {}
    for table in _lineage._ORDER:
        row = {}
        for label, cols in (("event_id_only_s", "event_id"), ("all_columns_s", "*")):
            with EvidenceStore(root) as s:
                t0 = time.perf_counter()
                s.con.execute(
                    f"SELECT {cols} FROM {table} WHERE request_id = $id",  # noqa: S608
                    {"id": request_id},
                ).fetchall()
                row[label] = round(time.perf_counter() - t0, 4)
        tables[table] = row
    return {
        "total_s": round(total, 4),
        "statements": len(per),
        "statement_s": [round(x, 4) for x in per],
        "per_table_lookup": tables,
    }


# --- 4. verify, against the I/O floor ------------------------------------------------------------------


def _sha_file(path: Path) -> int:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n


def run_verify(args: Params, store_info: dict[str, Any]) -> dict[str, Any]:
    from nexuscore.projections import _verify

    root = args.root
    files = [root / e["path"] for e in committed_files(root)]
    print(f"[verify] I/O floor: sha256 of {len(files)} files", flush=True)
    t0 = time.perf_counter()
    nbytes = sum(map(_sha_file, files))
    single = time.perf_counter() - t0
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        sum(pool.map(_sha_file, files))
    parallel = time.perf_counter() - t0
    rows = store_info["rows_total"]
    floor = {
        "bytes": nbytes,
        "gb": round(nbytes / 1e9, 2),
        "seconds_one_thread": round(single, 2),
        "seconds_all_cores": round(parallel, 2),
        "threads": workers,
        "gb_per_s_all_cores": round(nbytes / 1e9 / parallel, 2),
        "events_per_s_all_cores": round(rows / parallel),
    }
    print(
        f"    {nbytes / 1e9:.2f} GB in {parallel:.1f} s ({workers} threads; one thread {single:.1f} s)",
        flush=True,
    )
    print(f"[verify] verify() over {rows:,} events", flush=True)
    targets = {
        "1 manifest chain + head": (_verify, "_check_manifest"),
        "2 files: sha256 + Merkle roots (process pool)": (_verify, "_check_files"),
        "2a of which sha256 of files (main process, sequential)": (_verify, "_sha256_file"),
        "3 placement (DuckDB min/max per file)": (_verify, "_check_placement"),
        "4 offset coverage": (_verify, "_check_coverage"),
        "5 events (DuckDB anti-joins, duplicates)": (_verify, "_check_events"),
    }
    c0, k0 = _own_cpu_s(), _children_cpu_s()
    load0 = os.getloadavg()[0]
    with CallTimer(targets) as timer:
        report = verify(root, _signing_key().public_key(), {default_policy().digest})
    cpu_main, cpu_workers = _own_cpu_s() - c0, _children_cpu_s() - k0
    findings = [
        {"kind": f.kind, "where": f.where, "detail": f.detail, "fatal": f.fatal} for f in report.findings
    ]
    for f in report.findings:
        print(f"    finding: {f.kind} {f.where}: {f.detail}", flush=True)
    eps = report.rows / report.seconds
    out = {
        "ok": report.ok,
        "findings": findings,
        "rows": report.rows,
        "files": report.files,
        "entries": report.entries,
        "requests": report.requests,
        "partitions": report.partitions,
        "seconds": round(report.seconds, 2),
        "events_per_s": round(eps),
        "cpu_s_main_process": round(cpu_main, 1),
        "cpu_s_worker_processes": round(cpu_workers, 1),
        "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "phases": timer.result(),
        "floor": floor,
        "ratio_to_floor": round(eps / floor["events_per_s_all_cores"], 4),
    }
    print(
        f"    ok={report.ok}, {report.rows:,} rows in {report.seconds:.1f} s = {eps:,.0f} events/s "
        f"(floor {floor['events_per_s_all_cores']:,}/s)",
        flush=True,
    )
    return out


# --- reporting ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    mem = 0
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyarrow": pa.__version__,
        "duckdb": duckdb.__version__,
        "numpy": np.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def headline(r: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(metric, target, measured, baseline, ratio, met) rows for the console and the markdown."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    k = r.get("kafka") or {}
    p, b = k.get("projector"), k.get("baseline")
    if p and b:
        rows.append(
            (
                "Projector throughput, events/s (real broker, from offset 0)",
                f"≥ {TARGET_PROJECTOR_EPS:,.0f}",
                _fmt(p["events_per_s"]),
                f"{b['messages_per_s']:,} msgs/s (plain aiokafka consumer)",
                f"{p['ratio_to_baseline']:.3f}",
                _met(p["events_per_s"] >= TARGET_PROJECTOR_EPS),
            )
        )
        rows.append(
            (
                "Projector peak RSS, MB",
                f"< {TARGET_RSS_MB:.0f} (pipeline target)",
                _fmt(p["peak_rss_mb"]),
                f"{b['peak_rss_mb']:.0f} MB (baseline consumer)",
                f"{p['peak_rss_mb'] / b['peak_rss_mb']:.1f}",
                _met(p["peak_rss_mb"] < TARGET_RSS_MB),
            )
        )
    q = r.get("queries") or {}
    for key, label, target, fmt in (
        ("who_routed_what", "who_routed_what, 1 tenant, 30 days, cold (s)", TARGET_WHO_S, ".3f"),
        ("lineage", "lineage of 1 request, cold (ms)", TARGET_LINEAGE_S, ".0f"),
        ("spend", "spend by day, all tenants, cold (s)", None, ".3f"),
    ):
        x = q.get(key)
        if not x:
            continue
        scale = 1000 if key == "lineage" else 1
        measured = x["total_s"]["median_s"]
        rows.append(
            (
                label,
                "—" if target is None else f"< {target * scale:g}",
                format(measured * scale, fmt),
                f"{format(x['baseline_s']['median_s'] * scale, fmt)} (pyarrow.dataset)",
                f"{x['ratio_to_baseline']:.3f}",
                "n/a" if target is None else _met(measured < target),
            )
        )
    if q.get("open"):
        rows.append(
            (
                "EvidenceStore(root) open alone, cold (ms)",
                "—",
                format(q["open"]["median_s"] * 1000, ".0f"),
                "",
                "",
                "n/a",
            )
        )
    v = r.get("verify")
    if v:
        rows.append(
            (
                "verify, events/s (whole store)",
                f"≥ {TARGET_VERIFY_EPS:,.0f}",
                _fmt(v["events_per_s"]),
                f"{v['floor']['events_per_s_all_cores']:,} (sha256 of all bytes, {v['floor']['threads']} threads)",
                f"{v['ratio_to_floor']:.4f}",
                _met(v["events_per_s"] >= TARGET_VERIFY_EPS),
            )
        )
        rows.append(
            (
                "verify ok, findings",
                "ok, none",
                f"{v['ok']}, {len(v['findings'])}",
                "",
                "",
                _met(v["ok"] and not v["findings"]),
            )
        )
    return rows


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Evidence-plane benchmark",
        "",
        f"`{r['command']}` at {r['timestamp_utc']}, commit `{r['git_commit']}`; {m['cores']} cores ({m['cpu']}), "
        f"{m['ram_gb']} GiB RAM, Python {m['python']}, pyarrow {m['pyarrow']}, DuckDB {m['duckdb']}. "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')} (the machine is shared: "
        "other work running at the same time shows as noise in wall times).",
        "",
        "Ratio = measured / baseline (for times, < 1 means faster than the baseline).",
        "",
        "| Metric | Target | Measured | Baseline | Ratio | Met |",
        "| --- | --- | --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} | {e} | {f} |" for a, b, c, d, e, f in headline(r)),
        "",
    ]
    for section in ("kafka", "store", "queries", "verify"):
        if r.get(section, {}).get("carried_over_from"):
            lines.append(
                f"The `{section}` figures are carried over from the run of {r[section]['carried_over_from']}."
            )
    k = r.get("kafka")
    if k and k.get("projector"):
        p, b, pf = k["projector"], k["baseline"], k["prefill"]
        lines += [
            "",
            "## 1. Projector on Kafka",
            "",
            f"Broker {k['broker']['bootstrap']} (Kafka {k['broker']['kafka_version']}"
            f"{', external' if k['broker']['external'] else ''}), same 2 cores. Log: {pf['events']:,} events "
            f"({pf['mb']} MB, {pf['bytes_per_event']} B/event) of `tests.factories.run_history`: "
            + ", ".join(f"{t} {n:,}" for t, n in pf["per_type"].items())
            + f"; published at {pf['produced_per_s']:,}/s.",
            "",
            "| | events | seconds | events/s | from first event | CPU s | peak RSS MB |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| plain aiokafka consumer | {b['messages']:,} | {b['seconds']} | {b['messages_per_s']:,} | "
            f"{b['messages_per_s_from_first_message']:,}/s | {b['cpu_s']} | {b['peak_rss_mb']:.0f} |",
            f"| Projector (flush_rows {p['flush_rows']:,}, interval {p['flush_interval_s']:g} s) | {p['events_in_log']:,} | "
            f"{p['seconds']} | {p['events_per_s']:,} | {p['events_per_s_from_first_event']:,}/s | {p['cpu_s']} | "
            f"{p['peak_rss_mb']:.0f} |",
            "",
            f"Projector CPU per event: {p['cpu_us_per_event']} µs; files written: {p['files']}; broker CPU during "
            f"the projection: {p.get('broker_cpu_s')} s. The projection verifies: ok={k['projector_verify']['ok']}, "
            f"{k['projector_verify']['rows']:,} rows.",
            "",
            "Time inside the projector's flushes (wall, summed over calls):",
            "",
            "| Call | Seconds | Calls |",
            "| --- | --- | --- |",
            *(f"| {name} | {v['s']} | {v['calls']:,} |" for name, v in p["timed_calls"].items()),
            "",
        ]
        o = k.get("projector_offline")
        if o:
            lines += [
                f"The projector's own processing without the broker (records read into memory first, then "
                f"`Projector.add`/`flush` as `_loop` calls them, a flush every {o['flush_rows']:,} events): "
                f"{o['events']:,} events in {o['seconds']} s = **{o['events_per_s']:,} events/s** "
                f"({o['us_per_event']} µs per event). Where that time goes (wall, summed; wrappers add ~0.3 µs per call):",
                "",
                "| Step | Seconds | Calls | µs per event |",
                "| --- | --- | --- | --- |",
                *(
                    f"| {name} | {v['s']} | {v['calls']:,} | {v['s'] / o['events'] * 1e6:.1f} |"
                    for name, v in o["timed_calls"].items()
                ),
                "",
            ]
        prof = k.get("profile") or {}
        if prof.get("top_own"):
            lines += [
                f"py-spy profile of the projector process ({prof['samples']} samples), top functions by own time:",
                "",
                "| # | Function | Where | Own % | Incl. % |",
                "| --- | --- | --- | --- | --- |",
                *(
                    f"| {i} | `{f['function']}` | {f['where']} | {f['own_pct']} | {f['inclusive_pct']} |"
                    for i, f in enumerate(prof["top_own"], 1)
                ),
                "",
                "Own time by package: "
                + ", ".join(f"{x['package']} {x['own_pct']}%" for x in prof["own_by_package"]),
                "",
            ]
    s = r.get("store")
    if s:
        lines += [
            "## 2. The store",
            "",
            f"{s['decisions']:,} decisions ({'reused, generated ' + s['generated_at'] if s.get('reused') else 'generated in this run'}): "
            f"{s['rows_total']:,} rows in {s['files']} files, {s['flushes']} flushes (checkpoints), "
            f"{s['store_gb']} GB on disk ({s['parquet_gb']} GB Parquet), {s['days']} days from {s['start'][:10]}, "
            "tenants " + ", ".join(f"{t} {w:.0%}" for t, w in s["tenant_shares"].items()) + ".",
            "",
            "| Table | Rows |",
            "| --- | --- |",
            *(f"| {t} | {n:,} |" for t, n in s["rows"].items()),
            "",
            f"Generation: {s['seconds']:,} s wall ({s['seconds'] / 60:.1f} min), peak RSS of the writer "
            f"{s['peak_rss_mb_writer']:.0f} MB; sealing and writing {s['seal_and_write_s']:,} s, waiting for "
            f"encryption {s['wait_for_encryption_s']} s. Encryption: {s['encryption']['fields']:,} fields with "
            f"`FieldCipher.encrypt`, {s['encryption']['us_per_field']} µs each, {s['encryption']['seconds_in_worker']:,} s "
            "in one worker process overlapping the sealing.",
            "",
            "Time inside the production sealing code (main process):",
            "",
            "| Call | Seconds | Calls |",
            "| --- | --- | --- |",
            *(f"| {name} | {v['s']:,} | {v['calls']:,} |" for name, v in s["timed_calls"].items()),
            "",
            f"Rows per file: min {s['file_rows'].get('min', 0):,}, median {s['file_rows'].get('median', 0):,}, "
            f"max {s['file_rows'].get('max', 0):,}. "
            + (
                "Columns of the current schemas the generator does not model, written as: "
                + ", ".join(f"`{c}` = {v}" for c, v in s["columns_filled"].items())
                + ". "
                if s.get("columns_filled")
                else ""
            )
            + "Budgets are not enforced by the generator: at this volume (about "
            f"{s['decisions'] / s['days']:,.0f} decisions a day) the default policy's daily budgets would deny most "
            "requests, so committed and spent amounts exceed the budgets; the verdict mix is fixed instead.",
            "",
        ]
    q = r.get("queries")
    if q:
        lines += ["## 3. Queries", "", f"{q['cache']}; {q['repeat']} runs each, median.", ""]
        lines += [
            "| Query | median s | min | max | open s (median) | baseline median s | answers match |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for key in ("who_routed_what", "lineage", "spend"):
            x = q.get(key)
            if x:
                lines.append(
                    f"| {key} | {x['total_s']['median_s']} | {x['total_s']['min_s']} | {x['total_s']['max_s']} | "
                    f"{x['open_s']['median_s']} | {x['baseline_s']['median_s']} | {x['answers_match']} |"
                )
        lines += [
            "",
            f"Store open alone: median {q['open']['median_s']} s over {q['files_committed']} committed files.",
            "",
        ]
        bd = q.get("lineage", {}).get("breakdown")
        if bd:
            lines += [
                f"One more cold lineage call: {bd['total_s']} s in {bd['statements']} statement(s) "
                f"({', '.join(f'{x:.3f}' for x in bd['statement_s'])} s). The same lookup per table, each on "
                "a fresh store, reading only `event_id` (bloom filters, then the matching row group's "
                "request_id column) and reading every column (the whole matching row group):",
                "",
                "| Table | event_id only, ms | all columns, ms |",
                "| --- | --- | --- |",
                *(
                    f"| {t} | {x['event_id_only_s'] * 1000:.0f} | {x['all_columns_s'] * 1000:.0f} |"
                    for t, x in bd["per_table_lookup"].items()
                ),
                "",
            ]
    v = r.get("verify")
    if v:
        lines += [
            "## 4. verify",
            "",
            f"ok={v['ok']}, {len(v['findings'])} findings; {v['rows']:,} rows, {v['files']} files, {v['entries']} "
            f"manifest entries, {v['requests']:,} requests in {v['seconds']} s = {v['events_per_s']:,} events/s. "
            f"I/O floor: {v['floor']['gb']} GB hashed in {v['floor']['seconds_all_cores']} s with "
            f"{v['floor']['threads']} threads ({v['floor']['seconds_one_thread']} s with one). CPU: main process "
            f"{v['cpu_s_main_process']} s, worker processes {v['cpu_s_worker_processes']} s; load average "
            f"(1 min) before/after {v['loadavg_1min_before_after']}.",
            "",
            "| Phase | Seconds | Calls |",
            "| --- | --- | --- |",
            *(f"| {name} | {x['s']} | {x['calls']:,} |" for name, x in v["phases"].items()),
            "",
        ]
        for f in v["findings"]:
            lines.append(f"- finding `{f['kind']}` {f['where']}: {f['detail']}")
    lines += ["", "All figures: `bench/results/evidence.json`.", ""]
    return "\n".join(lines)


def print_summary(r: dict[str, Any]) -> None:
    print("\n=== NexusCore evidence-plane benchmark ===")
    print(f"  {'metric':<62} {'measured':>12}  {'target':<24} {'ratio':>7}  met   baseline")
    for metric, target, measured, baseline, ratio, met in headline(r):
        print(f"  {metric:<62} {measured:>12}  {target:<24} {ratio:>7}  {met.strip('*'):<5} {baseline}")
    s = r.get("store")
    if s:
        print(
            f"  store: {s['decisions']:,} decisions, {s['rows_total']:,} rows, {s['files']} files, {s['store_gb']} GB; "
            f"generated in {s['seconds']:,} s{' (reused)' if s.get('reused') else ''}"
        )


# --- command line ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    decisions: int
    chunk: int
    root: Path
    reuse: bool
    kafka_events: int
    flush_rows: int
    flush_interval_s: float
    skip_kafka: bool
    skip_store: bool
    repeat: int
    seed: int
    days: int
    profile: bool


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--decisions", type=int, default=10_000_000, help="Decisions in the store (default 10,000,000)."
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=500_000,
        help="Decisions per flush of the generator (default 500,000: about 5 GB of memory at peak).",
    )
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help=f"Where the store goes (default {DEFAULT_ROOT})."
    )
    parser.add_argument(
        "--reuse", action="store_true", help="Keep a store of the same size from an earlier run."
    )
    parser.add_argument(
        "--kafka-events", type=int, default=500_000, help="Events in the projector's log (default 500,000)."
    )
    parser.add_argument(
        "--flush-rows",
        type=int,
        default=10_000,
        help="Projector flush_rows (default: the production 10,000).",
    )
    parser.add_argument(
        "--flush-interval", type=float, default=1.0, help="Projector flush_interval_s (default 1.0)."
    )
    parser.add_argument(
        "--skip-kafka", action="store_true", help="Skip the projector phase (figures carried over)."
    )
    parser.add_argument("--skip-store", action="store_true", help="Skip the store, queries and verify.")
    parser.add_argument(
        "--repeat", type=int, default=5, help="Runs per query (default 5; the median is reported)."
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--days", type=int, default=35, help="Days the store spans (default 35).")
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="Do not run py-spy on the projector."
    )
    ns = parser.parse_args(argv)
    if ns.decisions < 1000 or ns.chunk < 1000 or ns.kafka_events < 1000 or ns.repeat < 1 or ns.days < 31:
        parser.error("--decisions, --chunk, --kafka-events >= 1000; --repeat >= 1; --days >= 31")
    return Params(
        ns.decisions,
        min(ns.chunk, ns.decisions),
        ns.root.resolve(),
        ns.reuse,
        ns.kafka_events,
        ns.flush_rows,
        ns.flush_interval,
        ns.skip_kafka,
        ns.skip_store,
        ns.repeat,
        ns.seed,
        ns.days,
        ns.profile,
    )


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(args: Params, argv: Sequence[str]) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    previous: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads((RESULTS_DIR / "evidence.json").read_text())
    results: dict[str, Any] = {
        "benchmark": "evidence",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.evidence", *argv]),
        "git_commit": _git_commit(),
        "machine": machine(),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in args.__dict__.items()},
        "targets": {
            "projector_events_per_s": TARGET_PROJECTOR_EPS,
            "who_routed_what_s": TARGET_WHO_S,
            "lineage_s": TARGET_LINEAGE_S,
            "verify_events_per_s": TARGET_VERIFY_EPS,
        },
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"nexuscore-bench-evidence-{run_id}-"))
    try:
        if args.skip_kafka:
            if previous.get("kafka"):
                results["kafka"] = {
                    **previous["kafka"],
                    "carried_over_from": previous["kafka"].get("carried_over_from")
                    or previous.get("timestamp_utc"),
                }
        else:
            results["kafka"] = run_kafka(args, run_id, work)
        if args.skip_store:
            for section in ("store", "queries", "verify"):
                if previous.get(section):
                    results[section] = {
                        **previous[section],
                        "carried_over_from": previous[section].get("carried_over_from")
                        or previous.get("timestamp_utc"),
                    }
        else:
            results["store"] = build_store(args)
            print(
                f"    {results['store']['rows_total']:,} rows, {results['store']['files']} files, "
                f"{results['store']['store_gb']} GB, {results['store']['seconds']:,} s",
                flush=True,
            )
            results["queries"] = run_queries(args, results["store"])
            results["verify"] = run_verify(args, results["store"])
        results["bench_peak_rss_mb"] = round(_own_rss_mb(), 1)
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def write_results(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "evidence.json").write_text(
        json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8"
    )
    (RESULTS_DIR / "evidence.md").write_text(render_markdown(results), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = run(args, argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(results)
    print_summary(results)
    print(f"\nwrote {RESULTS_DIR / 'evidence.json'} and {RESULTS_DIR / 'evidence.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
