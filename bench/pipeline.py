"""The pipeline benchmark: throughput, gateway-added latency, memory and CPU of NexusCore on real Kafka.

``python -m bench.pipeline [--requests N] [--rate R] [--duration S] [--quick]`` runs, on one broker
(``nexuscore._broker.kafka_broker()``: ``$NEXUSCORE_BOOTSTRAP``, Docker, or a local KRaft broker):

1. **Baseline**: N messages of exactly the encoded synthetic requests' bytes and keys through plain
   aiokafka with no processing (an idempotent acks=all producer here, a consumer-group member in a
   child process) into a fresh 4-partition topic: the transport's own limit on this machine.
2. **Throughput**: the four stages as child processes (the demo's command lines, but a provider that
   answers at once and never fails) in a fresh namespace; after a warm-up batch has reached the
   evidence (so every consumer group has joined), N requests are published as fast as possible and
   timed until every one has a terminal state in the Parquet evidence. The decider is profiled with
   py-spy meanwhile.
3. **Latency**: a fresh pipeline in another namespace; requests paced at R/s for S s, each stamped
   with the wall clock right before it is sent; added latency = dispatch.occurred_at - requested_at,
   and Kafka's record timestamp of the dispatch - requested_at.
4. Peak RSS (VmHWM) of every process and CPU seconds (utime + stime) per process and phase.

Results go to ``bench/results/pipeline.json`` and ``bench/results/pipeline.md`` (overwritten), and the
decider's collapsed py-spy stacks to ``bench/results/pipeline-decider.pyspy.txt``.

Needs ``py-spy`` in the virtualenv for the profile (``pip install py-spy``); without it the profile is
skipped with a note and everything else still runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

import msgspec
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from nexuscore._broker import REPO_ROOT, kafka_broker, kafka_libs_dir
from nexuscore._demo import ReviewDesk, decider_args, projector_args
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Service, Services, peak_rss_mb
from nexuscore._synthetic import synthetic_requests
from nexuscore.core import derive_id
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH, RoutingPolicy, load_policy
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import AvroCodec, DispatchRequested, InferenceRequested
from nexuscore.transport import (
    DEFAULT_PARTITIONS,
    Topics,
    ensure_topics,
    new_consumer,
    new_producer,
    start_client,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# The targets the headline figures are compared with (from the project brief).
TARGET_RPS = 2500.0
TARGET_P50_MS = 3.0
TARGET_P99_MS = 15.0
TARGET_RSS_MB = 250.0

PIPELINE_STAGES = ("provider", "decider", "worker", "projector")
# Evidence is polled this often while a run drains; each poll reads only the footers of new files,
# so it costs little CPU, and the completion time itself comes from file mtimes, not the poll.
POLL_S = 0.25
# After a full DuckDB check that came up short, wait this long before the next one (it reads every
# file, which is the expensive part on a 2-core machine that also runs the pipeline).
FULL_CHECK_EVERY_S = 1.0
PROGRESS_EVERY_S = 5.0
# Waits. The pipeline's own rate is unknown (that is what is measured), so drain timeouts assume a
# pessimistic floor of 25 requests/s on a loaded machine.
JOIN_TIMEOUT_S = 60.0
WARMUP_TIMEOUT_S = 180.0
FLOOR_RPS = 25.0
PROFILER_STOP_TIMEOUT_S = 30.0
PROFILE_RATE_HZ = 100
TOP_FUNCTIONS = 15
# Latency requests late by more than this against their schedule are counted as pacing misses.
LATE_MS = 5.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(NexusError):
    """A benchmark step failed or timed out; the message says which and where the logs are."""


# --- /proc: CPU seconds, peak memory, the broker's process ---------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def _kafka_properties(pid: int) -> dict[str, str] | None:
    """The server.properties of a ``kafka.Kafka`` JVM, or None if ``pid`` is not one."""
    proc = Path(f"/proc/{pid}")
    try:
        args = [a.decode("utf-8", "replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        if "kafka.Kafka" not in args:
            return None
        props = Path(args[-1])
        if not props.is_absolute():
            props = Path(os.readlink(proc / "cwd")) / props
        text = props.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    pairs = (line.partition("=") for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


def find_broker_pid(bootstrap: str) -> int | None:
    """The pid of a Kafka JVM on this machine whose PLAINTEXT listener has ``bootstrap``'s port.

    ``kafka_broker()`` yields only an address, so the JVM is found by its command line (``kafka.Kafka
    <server.properties>``) and the listener port in that properties file. None for a broker in Docker
    or on another machine.
    """
    port = bootstrap.split(",")[0].rsplit(":", 1)[-1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        props = _kafka_properties(int(proc.name))
        if props is not None and any(
            item.strip().startswith("PLAINTEXT://") and item.strip().endswith(f":{port}")
            for item in props.get("listeners", "").split(",")
        ):
            return int(proc.name)
    return None


def broker_topic_bytes(broker_pid: int | None, prefix: str) -> dict[str, int]:
    """Bytes in the log segments of every topic starting with ``prefix`` (local broker only).

    What the stages wrote, read straight from the broker's log.dirs: the admin API aiokafka offers has
    no DescribeLogDirs.
    """
    props = _kafka_properties(broker_pid) if broker_pid is not None else None
    if props is None:
        return {}
    sizes: Counter[str] = Counter()
    for log_dir in (props.get("log.dirs") or props.get("log.dir", "")).split(","):
        if not log_dir.strip():
            continue
        for part in Path(log_dir.strip()).glob(f"{prefix}*-*"):
            topic = part.name.rpartition("-")[0]
            with contextlib.suppress(OSError):
                sizes[topic] += sum(f.stat().st_size for f in part.glob("*.log"))
    return dict(sizes)


async def topic_messages(bootstrap: str, prefix: str) -> dict[str, int]:
    """Messages (end offsets summed over partitions) of every topic starting with ``prefix``."""
    admin = await _admin(bootstrap)
    try:
        described = await admin.describe_topics(
            [t for t in await admin.list_topics() if t.startswith(prefix)]
        )
    finally:
        await admin.close()
    tps = [TopicPartition(t["topic"], p["partition"]) for t in described for p in t.get("partitions", [])]
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    counts: Counter[str] = Counter()
    for tp, end in ends.items():
        counts[tp.topic] += end
    return dict(counts)


def topic_stats(bootstrap: str, prefix: str, broker_pid: int | None) -> dict[str, Any]:
    """Per topic of a namespace: messages, bytes on the broker and bytes per message."""
    messages = asyncio.run(topic_messages(bootstrap, prefix))
    sizes = broker_topic_bytes(broker_pid, prefix)
    out: dict[str, Any] = {}
    for topic in sorted(messages, key=lambda t: -sizes.get(t, 0)):
        n, b = messages[topic], sizes.get(topic)
        out[topic.removeprefix(prefix)] = {
            "messages": n,
            "mb": None if b is None else round(b / 1e6, 2),
            "bytes_per_message": None if b is None or not n else round(b / n),
        }
    return out


class CpuMeter:
    """CPU seconds used by a set of named processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.before: dict[str, float | None] = {}
        self.after: dict[str, float | None] = {}
        self.t0 = self.t1 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.t1 = time.monotonic()
        self.after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def result(self) -> dict[str, Any]:
        wall = self.t1 - self.t0
        per: dict[str, Any] = {}
        for name in self.pids:
            b, a = self.before.get(name), self.after.get(name)
            if b is None or a is None:
                per[name] = None
            else:
                per[name] = {
                    "cpu_s": round(a - b, 2),
                    "cpu_pct": round(100 * (a - b) / wall, 1) if wall else None,
                }
        total = sum(v["cpu_s"] for v in per.values() if v is not None)
        return {"wall_s": round(wall, 2), "processes": per, "total_cpu_s": round(total, 2)}


# --- Kafka helpers ---------------------------------------------------------------------------------


async def _admin(bootstrap: str) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await asyncio.wait_for(admin.start(), JOIN_TIMEOUT_S)
    except BaseException:
        await admin.close()
        raise
    return admin


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = await _admin(bootstrap)
    try:
        await admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def await_topics(bootstrap: str, names: Sequence[str], partitions: int, timeout_s: float) -> None:
    """Wait until every topic has all its partitions with a leader.

    Topic creation is asynchronous: a consumer that subscribes before the metadata has propagated can
    sit without partitions until its next metadata refresh, which would be timed as pipeline time.
    """
    admin = await _admin(bootstrap)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(list(names))
            ready = {
                t["topic"]
                for t in described
                if t.get("error_code", 0) == 0
                and len(t.get("partitions", [])) == partitions
                and all(p.get("leader", -1) >= 0 for p in t["partitions"])
            }
            if ready >= set(names):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"topics {sorted(set(names) - ready)} had no leaders within {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def delete_topics_with_prefix(bootstrap: str, prefix: str) -> int:
    """Remove what the benchmark created on a shared (external) broker."""
    admin = await _admin(bootstrap)
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()


@dataclass(frozen=True)
class Sent:
    """One publish: how much, and when it started (both clocks) and was fully acknowledged."""

    count: int
    nbytes: int
    first_mono: float
    first_wall: float
    acked_mono: float


async def send_all(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> Sent:
    """Publish pre-encoded (key, value) pairs as fast as the producer takes them, like
    ``nexuscore._synthetic.publish`` (same producer, same send-then-await-all pattern)."""
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        # The clock starts at the first send, after the producer has connected and fetched metadata.
        first_mono, first_wall = time.monotonic(), time.time()
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
        acked = time.monotonic()
    finally:
        await producer.stop()
    return Sent(len(messages), sum(len(v) for _, v in messages), first_mono, first_wall, acked)


def encode_requests(codec: AvroCodec, requests: Sequence[InferenceRequested]) -> list[tuple[bytes, bytes]]:
    """(key, value) exactly as the demo publishes them: Avro single-object encoding, keyed by tenant."""
    return [(r.tenant_id.encode(), codec.encode(r)) for r in requests]


# --- 1. baseline: the transport alone ---------------------------------------------------------------


def _baseline_reader(
    bootstrap: str, topic: str, group: str, expected: int, timeout_s: float, conn: Connection
) -> None:
    """Child process of the baseline: one consumer-group member reading the topic back.

    A separate process, like every pipeline stage, so the producer and the consumer do not share one
    event loop and one core.
    """
    try:
        conn.send(("done", asyncio.run(_read_back(bootstrap, topic, group, expected, timeout_s, conn))))
    except BaseException as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _read_back(
    bootstrap: str, topic: str, group: str, expected: int, timeout_s: float, conn: Connection
) -> dict[str, Any]:
    consumer = new_consumer(bootstrap, [topic], group)
    await start_client(consumer, bootstrap)
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the baseline consumer got no partitions of {topic} within {JOIN_TIMEOUT_S:.0f} s"
                )
            await consumer.getmany(timeout_ms=100)
        conn.send(("ready", None))
        deadline = time.monotonic() + timeout_s
        seen = nbytes = 0
        while seen < expected:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the baseline consumer read {seen} of {expected} messages within {timeout_s:.0f} s"
                )
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batches.values():
                seen += len(records)
                nbytes += sum(len(r.value) for r in records)
        # CLOCK_MONOTONIC is system-wide on Linux: comparable with the parent's first send.
        return {"count": seen, "bytes": nbytes, "last_mono": time.monotonic()}
    finally:
        await consumer.stop()


def _receive(
    conn: Connection, child: multiprocessing.process.BaseProcess, timeout_s: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout_s
    while not conn.poll(0.5):
        if not child.is_alive() and not conn.poll():
            raise BenchError(f"{what}: the baseline consumer exited with code {child.exitcode}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: no answer from the baseline consumer within {timeout_s:.0f} s")
    kind, payload = conn.recv()
    if kind == "error":
        raise BenchError(f"{what}: the baseline consumer failed: {payload}")
    return payload


def run_baseline(
    bootstrap: str, messages: Sequence[tuple[bytes, bytes]], run: str, broker_pid: int | None
) -> dict[str, Any]:
    n = len(messages)
    topic = f"bench-{run}.baseline"
    timeout_s = 60 + n / 500
    asyncio.run(create_topic(bootstrap, topic, DEFAULT_PARTITIONS))
    asyncio.run(await_topics(bootstrap, [topic], DEFAULT_PARTITIONS, JOIN_TIMEOUT_S))
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe()
    reader = ctx.Process(
        target=_baseline_reader,
        args=(bootstrap, topic, f"bench-{run}.baseline-readers", n, timeout_s, child_conn),
        name="bench-baseline-reader",
        daemon=True,
    )
    reader.start()
    try:
        _receive(parent_conn, reader, JOIN_TIMEOUT_S + 30, "baseline consumer join")
        assert reader.pid is not None
        pids = {"bench (producer)": os.getpid(), "baseline consumer": reader.pid}
        if broker_pid is not None:
            pids["broker"] = broker_pid
        cpu = CpuMeter(pids)
        cpu.start()
        sent = asyncio.run(send_all(bootstrap, topic, messages))
        done = _receive(parent_conn, reader, timeout_s, "baseline read-back")
        cpu.stop()
    finally:
        if reader.is_alive():
            reader.terminate()
        reader.join(10)
    produce_s = sent.acked_mono - sent.first_mono
    e2e_s = done["last_mono"] - sent.first_mono
    return {
        "topic_partitions": DEFAULT_PARTITIONS,
        "messages": n,
        "message_bytes_mean": round(sent.nbytes / n, 1),
        "total_mb": round(sent.nbytes / 1e6, 2),
        "produce_s": round(produce_s, 3),
        "produced_msgs_per_s": round(n / produce_s, 1),
        "end_to_end_s": round(e2e_s, 3),
        "end_to_end_msgs_per_s": round(n / e2e_s, 1),
        "end_to_end_mb_per_s": round(sent.nbytes / 1e6 / e2e_s, 2),
        "consumed": done["count"],
        "cpu": cpu.result(),
    }


# --- the pipeline as child processes -----------------------------------------------------------------


def start_pipeline(
    services: Services, bootstrap: str, topics: Topics, keys: DevKeys, evidence_dir: Path
) -> dict[str, Service]:
    """The four stages with ``nexuscore._demo.Pipeline``'s command lines, minus ``--error-rate 0.03``.

    Pipeline offers no way to change the error rate; the benchmark measures the gateway, so the
    simulated provider must answer at once and never fail (no retries, no backoff sleeps).
    """
    provider = services.start("provider", "run", "provider", "--port", "0")
    url = provider.wait_for_line("simulated provider listening on", 30)
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    return {
        "provider": provider,
        "decider": services.start("decider", *decider_args(common, keys)),
        "worker": services.start("worker", "run", "worker", *common, "--simulated-url", url),
        "projector": services.start("projector", *projector_args(common, keys, evidence_dir)),
    }


class EvidenceWatch:
    """Row counts of the evidence tables from Parquet footers, reading each (immutable) file once.

    A cheap gate before the authoritative DuckDB check: the projector writes many small files and
    re-reading all of them on every poll would compete with the pipeline for the CPU.
    """

    TABLES = ("requests", "decisions", "rejections", "dispatches", "outcomes")
    # Tables whose last file completes the terminal states (dispatches only gate).
    TERMINAL = frozenset({"requests", "decisions", "rejections", "outcomes"})

    def __init__(self, root: Path, keys: DevKeys) -> None:
        self.root = root
        self.keys = keys  # the review desk signs its reviews with the reviewer key among them
        self.rows: dict[str, dict[str, int]] = {t: {} for t in self.TABLES}
        self.latest_mtime = 0.0

    def refresh(self) -> dict[str, int]:
        for table in self.TABLES:
            known = self.rows[table]
            # Files are renamed into place whole (``write_table``), so a listed *.parquet is complete.
            for path in self.root.glob(f"region=*/{table}/*.parquet"):
                name = str(path)
                if name in known:
                    continue
                try:
                    known[name] = pq.read_metadata(path).num_rows
                    mtime = path.stat().st_mtime
                except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError
                    continue
                if table in self.TERMINAL:
                    self.latest_mtime = max(self.latest_mtime, mtime)
        return {t: sum(v.values()) for t, v in self.rows.items()}

    def files(self) -> int:
        return sum(1 for p in self.root.glob("region=*/*/*.parquet"))


def wait_for_terminal(
    watch: EvidenceWatch,
    services: Services,
    expected: int,
    timeout_s: float,
    what: str,
    desk: ReviewDesk | None = None,
) -> tuple[dict[str, int], float, float]:
    """Poll until ``expected`` requests have a terminal state in the evidence; return the DuckDB
    summary, the monotonic time it was seen and how long that DuckDB check took. Raises BenchError
    on timeout or a dead stage."""
    started = time.monotonic()
    deadline = started + timeout_s
    next_progress = started + PROGRESS_EVERY_S
    next_full = started
    summary: dict[str, int] = {}
    counts: dict[str, int] = {}
    while True:
        services.check()
        counts = watch.refresh()
        now = time.monotonic()
        gate = (
            counts["requests"] >= expected
            and counts["decisions"] + counts["rejections"] >= expected
            and counts["outcomes"] >= counts["dispatches"]
        )
        if gate and now >= next_full:
            with EvidenceStore(watch.root) as store:
                summary = store.terminal_summary()
                if desk is not None:
                    desk.poll(store)  # escalations end once a person (here, the desk) reviews them
            seen = time.monotonic()
            if summary["terminal"] >= expected:
                return summary, seen, seen - now
            next_full = time.monotonic() + FULL_CHECK_EVERY_S
        if now >= deadline:
            raise BenchError(
                f"{what}: {counts.get('decisions', 0) + counts.get('rejections', 0)} of {expected} requests decided, "
                f"{counts.get('outcomes', 0)} of {counts.get('dispatches', 0)} dispatches answered, last full check "
                f"{summary or 'never'}, within {timeout_s:.0f} s (logs in {services.log_dir})"
            )
        if now >= next_progress:
            print(
                f"    {what}: {counts['decisions'] + counts['rejections']}/{expected} decided, "
                f"{counts['outcomes']}/{counts['dispatches']} dispatches answered ({now - started:.0f} s)",
                flush=True,
            )
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(POLL_S)


def warm_up(
    bootstrap: str,
    topics: Topics,
    policy: RoutingPolicy,
    services: Services,
    watch: EvidenceWatch,
    n: int,
    run: str,
) -> float:
    """Publish ``n`` requests and wait for their terminal states: proves every stage has joined its
    group and warmed up (imports, connections, the decider's table) before anything is timed."""
    codec = AvroCodec()
    started = time.monotonic()
    requests = synthetic_requests(policy, n, seed=3, start=datetime.now(UTC), run=f"{run}-warmup")
    asyncio.run(send_all(bootstrap, topics.requests, encode_requests(codec, requests)))
    wait_for_terminal(
        watch, services, n, WARMUP_TIMEOUT_S, "warm-up", ReviewDesk(bootstrap, topics, watch.keys)
    )
    return time.monotonic() - started


@contextlib.contextmanager
def running_pipeline(
    bootstrap: str, topics: Topics, policy_path: Path, root: Path
) -> Iterator[tuple[Services, dict[str, Service], EvidenceWatch]]:
    asyncio.run(ensure_topics(bootstrap, topics))
    asyncio.run(await_topics(bootstrap, topics.all, DEFAULT_PARTITIONS, JOIN_TIMEOUT_S))
    evidence = root / "evidence"
    evidence.mkdir(parents=True, exist_ok=True)
    # Services stops every stage (SIGTERM, grace, SIGKILL) on any exit, Ctrl-C included.
    with Services(root / "logs") as services:
        keys = dev_keys(root / "keys", policy_path)
        stages = start_pipeline(services, bootstrap, topics, keys, evidence)
        yield services, stages, EvidenceWatch(evidence, keys)


# --- the profiler ----------------------------------------------------------------------------------


class Profiler:
    """py-spy recording one process until ``stop()``; ``error`` says why there is no profile."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.error: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")
        venv_spy = Path(sys.executable).parent / "py-spy"
        exe = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
        if exe is None:
            self.error = "py-spy is not installed (pip install py-spy into the virtualenv)"
            return
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    exe,
                    "record",
                    "--pid",
                    str(pid),
                    "--rate",
                    str(PROFILE_RATE_HZ),
                    # Sampling without pausing the decider: the profile must not slow what is timed.
                    "--nonblocking",
                    # One entry per function (its first line), so own time is summed per function.
                    "--function",
                    "--full-filenames",
                    "--format",
                    "raw",
                    "--output",
                    str(out),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal must not end it before stop() asks it to write.
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            # py-spy writes its output when interrupted.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(PROFILER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.error = f"py-spy did not stop within {PROFILER_STOP_TIMEOUT_S:.0f} s"
                return
        if not self.out.is_file():
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
            self.error = f"py-spy wrote no profile (exit {proc.returncode}): {tail}"


def _classify(path: str) -> tuple[str, str]:
    """(package, short path) of a source file in a py-spy frame."""
    if path.startswith("<"):
        return "builtin", path
    p = Path(path)
    for key in ("purelib", "platlib"):
        base = Path(sysconfig.get_paths()[key])
        if p.is_relative_to(base):
            rel = p.relative_to(base)
            return rel.parts[0].removesuffix(".py"), str(rel)
    if p.is_relative_to(REPO_ROOT):
        rel = p.relative_to(REPO_ROOT)
        return f"nexuscore.{rel.parts[0]}" if rel.parts[0] != "nexuscore" else "nexuscore", str(rel)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if p.is_relative_to(stdlib):
        rel = p.relative_to(stdlib)
        return f"stdlib {rel.parts[0].removesuffix('.py')}", str(rel)
    return "other", path


def _frame(raw: str) -> tuple[str, str, str]:
    """'func (/path/file.py:12)' -> (display name, package, short location)."""
    name, _, rest = raw.partition(" (")
    location = rest.removesuffix(")")
    path, _, line = location.rpartition(":")
    package, short = _classify(path or location)
    where = f"{short}:{line}" if line else short
    return name, package, where


def summarise_profile(raw: Path, top: int = TOP_FUNCTIONS) -> dict[str, Any]:
    """Top functions by own (self) samples, with their inclusive share, and own time per package."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    by_package: Counter[str] = Counter()
    for f, n in own.items():
        by_package[_frame(f)[1]] += n
    functions = []
    for f, n in own.most_common(top):
        name, package, where = _frame(f)
        functions.append(
            {
                "function": name,
                "where": where,
                "package": package,
                "own_samples": n,
                "own_pct": round(100 * n / total, 1),
                "inclusive_pct": round(100 * inclusive[f] / total, 1),
            }
        )
    return {
        "samples": total,
        "rate_hz": PROFILE_RATE_HZ,
        # Samples of a thread py-spy saw running or runnable: on an oversubscribed machine this
        # includes time spent waiting for a core, so it can exceed the process's CPU seconds.
        "active_s": round(total / PROFILE_RATE_HZ, 1),
        "top_own": functions,
        "own_by_package": [
            {"package": p, "own_pct": round(100 * n / total, 1)} for p, n in by_package.most_common(12)
        ],
    }


# --- 2. throughput ---------------------------------------------------------------------------------


def run_throughput(
    bootstrap: str,
    policy: RoutingPolicy,
    policy_path: Path,
    args: Params,
    run: str,
    work: Path,
    broker_pid: int | None,
) -> dict[str, Any]:
    codec = AvroCodec()
    topics = Topics(namespace=f"bench-{run}-throughput.")
    # Encoded before the clock starts, as in the baseline: the producer's cost is the same in both.
    requests = synthetic_requests(
        policy, args.requests, seed=7, start=datetime.now(UTC), run=f"{run}-throughput"
    )
    messages = encode_requests(codec, requests)
    root = work / "throughput"
    profile_raw = root / "decider.pyspy.txt"
    with running_pipeline(bootstrap, topics, policy_path, root) as (services, stages, watch):
        warmup_s = warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        print(f"    warm-up: {args.warmup} requests through the pipeline in {warmup_s:.1f} s", flush=True)
        profiler = Profiler(stages["decider"].proc.pid, profile_raw) if args.profile else None
        pids = {name: s.proc.pid for name, s in stages.items()}
        pids["bench (publisher, evidence poll)"] = os.getpid()
        if broker_pid is not None:
            pids["broker"] = broker_pid
        if profiler is not None and profiler.pid is not None:
            pids["py-spy"] = profiler.pid
        cpu = CpuMeter(pids)
        try:
            cpu.start()
            sent = asyncio.run(send_all(bootstrap, topics.requests, messages))
            print(
                f"    published {sent.count} requests in {sent.acked_mono - sent.first_mono:.2f} s; waiting for the evidence",
                flush=True,
            )
            summary, seen_mono, check_s = wait_for_terminal(
                watch,
                services,
                args.warmup + args.requests,
                120 + args.requests / FLOOR_RPS,
                "throughput",
                ReviewDesk(bootstrap, topics, watch.keys),
            )
            cpu.stop()
        finally:
            if profiler is not None:
                profiler.stop()
        rss = {name: s.peak_rss_mb() for name, s in stages.items()}
        files = watch.files()
    topics_written = topic_stats(bootstrap, topics.namespace, broker_pid)
    # The last terminal state landed when its Parquet file was renamed into place; the poll only
    # notices it up to POLL_S (or a DuckDB check) later.
    evidence_s = watch.latest_mtime - sent.first_wall
    polled_s = seen_mono - sent.first_mono
    profile: dict[str, Any]
    if profiler is None:
        profile = {"skipped": "--no-profile"}
    elif profiler.error is not None:
        profile = {"skipped": profiler.error}
    else:
        profile = summarise_profile(profile_raw)
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(profile_raw, RESULTS_DIR / "pipeline-decider.pyspy.txt")
        profile["raw"] = "bench/results/pipeline-decider.pyspy.txt"
    return {
        "namespace": topics.namespace,
        "requests": args.requests,
        "warmup_requests": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "publish_s": round(sent.acked_mono - sent.first_mono, 3),
        "published_per_s": round(sent.count / (sent.acked_mono - sent.first_mono), 1),
        "end_to_end_s": round(evidence_s, 3),
        "requests_per_s": round(args.requests / evidence_s, 1),
        "end_to_end_polled_s": round(polled_s, 3),
        "requests_per_s_polled": round(args.requests / polled_s, 1),
        "evidence_summary": summary,
        "evidence_files": files,
        # One EvidenceStore + terminal_summary() over all those files, as the demo and CLI do it.
        "evidence_check_s": round(check_s, 3),
        "topics": topics_written,
        "peak_rss_mb": {k: None if v is None else round(v, 1) for k, v in rss.items()},
        "cpu": cpu.result(),
        "profile_decider": profile,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


# --- 3. gateway-added latency ----------------------------------------------------------------------


async def publish_paced(
    bootstrap: str, topic: str, requests: Sequence[InferenceRequested], rate: float
) -> dict[str, Any]:
    """Send ``requests`` at ``rate`` per second, each stamped with the wall clock just before sending."""
    codec = AvroCodec()
    # No linger: the client batching on purpose would be counted as gateway latency.
    producer = new_producer(bootstrap, linger_ms=0)
    await start_client(producer, bootstrap)
    futures = []
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
            futures.append(await producer.send(topic, codec.encode(stamped), key=stamped.tenant_id.encode()))
            if i == 0:
                first = loop.time()
            last = loop.time()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    span = last - first
    return {
        "offered_per_s": rate,
        "sent": len(requests),
        "send_span_s": round(span, 3),
        "achieved_per_s": round((len(requests) - 1) / span, 1) if span > 0 else None,
        "late_sends": late,
        "late_threshold_ms": LATE_MS,
        "worst_lag_ms": round(worst_lag * 1000, 1),
    }


@dataclass(frozen=True)
class Dispatch:
    """When one request was sent (requested_at) and dispatched (event time, Kafka record time), in s."""

    requested_s: float
    occurred_s: float
    record_s: float

    @property
    def added_ms(self) -> float:
        return (self.occurred_s - self.requested_s) * 1000

    @property
    def added_record_ms(self) -> float:
        return (self.record_s - self.requested_s) * 1000


async def read_dispatches(bootstrap: str, topic: str, wanted: set[str], timeout_s: float) -> list[Dispatch]:
    """Every dispatch of ``wanted`` requests, read from the start of the topic to its current end
    (no consumer group)."""
    codec = AvroCodec()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await start_client(consumer, bootstrap)
    out: list[Dispatch] = []
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
                    d = codec.decode(r.value, (DispatchRequested,))
                    assert isinstance(d, DispatchRequested)
                    if d.request_id in wanted:
                        # Kafka's record timestamp has ms resolution (CreateTime, set by the producer).
                        out.append(
                            Dispatch(
                                d.requested_at.timestamp(), d.occurred_at.timestamp(), r.timestamp / 1000
                            )
                        )
                if records and records[-1].offset + 1 >= end[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return out


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
    base = synthetic_requests(policy, total, seed=13, start=datetime.now(UTC), run=f"{run}-latency")
    # Fresh ids for every run, so nothing can be mistaken for an earlier request (or deduplicated).
    requests = []
    for i, r in enumerate(base):
        rid = derive_id(run, "latency-request", i)
        requests.append(msgspec.structs.replace(r, event_id=rid, request_id=rid))
    wanted = {r.request_id for r in requests}
    with running_pipeline(bootstrap, topics, policy_path, work / "latency") as (services, stages, watch):
        warmup_s = warm_up(bootstrap, topics, policy, services, watch, args.warmup, run)
        print(f"    warm-up: {args.warmup} requests through the pipeline in {warmup_s:.1f} s", flush=True)
        pids = {name: s.proc.pid for name, s in stages.items()}
        pids["bench (paced publisher)"] = os.getpid()
        if broker_pid is not None:
            pids["broker"] = broker_pid
        cpu = CpuMeter(pids)
        cpu.start()
        pacing = asyncio.run(publish_paced(bootstrap, topics.requests, requests, args.rate))
        cpu.stop()
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
        rss = {name: s.peak_rss_mb() for name, s in stages.items()}
    # Read after the run so that the reader does not compete with the decider for the CPU: every
    # figure comes from the dispatch messages themselves.
    dispatches = asyncio.run(read_dispatches(bootstrap, topics.dispatch, wanted, 60 + total / 1000))
    # Whether the decider kept up with the offered load: if it dispatched more slowly than the
    # requests behind those dispatches were sent, a queue built up and the latency figures measure
    # that queue rather than the gateway's own cost.
    first_s = min((d.requested_s for d in dispatches), default=0.0)
    sent_span = max((d.requested_s for d in dispatches), default=0.0) - first_s
    dispatch_span = max((d.occurred_s for d in dispatches), default=0.0) - min(
        (d.occurred_s for d in dispatches), default=0.0
    )
    offered_dispatch_rate = len(dispatches) / sent_span if sent_span > 0 else None
    dispatch_rate = len(dispatches) / dispatch_span if dispatch_span > 0 else None
    keeps_up = (
        None
        if offered_dispatch_rate is None or dispatch_rate is None
        else dispatch_rate >= 0.95 * offered_dispatch_rate
    )
    # Requests of the first second met at most a second's worth of queue: the closest this run gets
    # to the unloaded cost when the decider does not keep up.
    early = [d for d in dispatches if d.requested_s - first_s < 1.0]
    return {
        "namespace": topics.namespace,
        "pipeline": "fresh (own namespace, own four processes, empty budget state)",
        "warmup_requests": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "duration_s": args.duration,
        "pacing": pacing,
        "dispatched": len(dispatches),
        "not_dispatched": total - len(dispatches),
        "offered_dispatches_per_s": None
        if offered_dispatch_rate is None
        else round(offered_dispatch_rate, 1),
        "decider_dispatches_per_s": None if dispatch_rate is None else round(dispatch_rate, 1),
        "decider_kept_up": keeps_up,
        "added_ms_event_time": latency_stats([d.added_ms for d in dispatches]),
        "added_ms_record_timestamp": latency_stats([d.added_record_ms for d in dispatches]),
        "added_ms_first_second": latency_stats([d.added_ms for d in early]),
        "evidence_summary": summary,
        "peak_rss_mb": {k: None if v is None else round(v, 1) for k, v in rss.items()},
        "cpu_during_sends": cpu.result(),
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }


# --- reporting ---------------------------------------------------------------------------------------


def _git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # Others edit the tree while benchmarks run: say when the figures are not of HEAD exactly.
    return f"{head}-dirty" if dirty else head


def _kafka_version() -> str:
    jars = sorted(kafka_libs_dir().glob("kafka_2.13-*.jar"))
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"


def machine_info(bootstrap: str, broker_pid: int | None) -> dict[str, Any]:
    external = bool(os.environ.get("NEXUSCORE_BOOTSTRAP", "").strip())
    return {
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kafka_version": _kafka_version() + (" (local jars; the broker is external)" if external else ""),
        "broker": ("external " if external else "")
        + (f"local JVM pid {broker_pid}" if broker_pid else "not on this machine"),
        "bootstrap": bootstrap,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def headline(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, target, measured, met) rows shared by the console summary and the markdown."""
    tp, lat = results.get("throughput"), results.get("latency")
    rows: list[tuple[str, str, str, str]] = []
    rps = tp["requests_per_s"] if tp else None
    rows.append(
        (
            "End-to-end throughput (requests/s)",
            f"≥ {TARGET_RPS:,.0f}",
            _fmt(rps),
            _met(None if rps is None else rps >= TARGET_RPS),
        )
    )
    ev = lat["added_ms_event_time"] if lat else {}
    p50, p99 = ev.get("p50_ms"), ev.get("p99_ms")
    rate = f"{results['parameters']['rate']:g}"
    rows.append(
        (
            f"Added latency p50 at {rate} req/s offered (ms)",
            f"≤ {TARGET_P50_MS:g}",
            _fmt(p50, ".2f"),
            _met(None if p50 is None else p50 <= TARGET_P50_MS),
        )
    )
    rows.append(
        (
            f"Added latency p99 at {rate} req/s offered (ms)",
            f"≤ {TARGET_P99_MS:g}",
            _fmt(p99, ".2f"),
            _met(None if p99 is None else p99 <= TARGET_P99_MS),
        )
    )
    peaks = results.get("memory", {}).get("pipeline_peak_rss_mb", {})
    worst = max(((v, k) for k, v in peaks.items() if v is not None), default=None)
    rows.append(
        (
            "Peak RSS per pipeline process (MB)",
            f"< {TARGET_RSS_MB:g}",
            "n/a" if worst is None else f"{worst[0]:.0f} ({worst[1]})",
            _met(None if worst is None else worst[0] < TARGET_RSS_MB),
        )
    )
    return rows


def render_markdown(results: dict[str, Any]) -> str:
    p, m = results["parameters"], results["machine"]
    lines = [
        "# Pipeline benchmark",
        "",
        f"`{results['command']}` at {results['timestamp_utc']}, commit `{results['git_commit']}`; "
        f"{m['nproc']} cores, Python {m['python']}, Kafka {m['kafka_version']} ({m['broker']}); "
        f"N={p['requests']}, R={p['rate']:g}/s, S={p['duration']:g} s, warm-up {p['warmup']}. "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
        "",
        "| Metric | Target | Measured | Met |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in headline(results)),
        "",
    ]
    b, tp, lat = results.get("baseline"), results.get("throughput"), results.get("latency")
    note = ""
    if b and tp:
        lines += [
            "| Context | Value |",
            "| --- | --- |",
            f"| Baseline (plain aiokafka, same messages) produced msgs/s | {b['produced_msgs_per_s']:,.0f} |",
            f"| Baseline end-to-end msgs/s | {b['end_to_end_msgs_per_s']:,.0f} |",
            f"| Pipeline / baseline end to end | {results['ratio_to_baseline']:.3f} |",
            f"| Pipeline end to end, as polled (requests/s) | {tp['requests_per_s_polled']:,.0f} |",
        ]
        if lat:
            ev, rec = lat["added_ms_event_time"], lat["added_ms_record_timestamp"]
            lines += [
                f"| Latency run: achieved send rate (requests/s) | {lat['pacing']['achieved_per_s']} |",
                f"| Added latency p90 / max (ms) | {ev.get('p90_ms')} / {ev.get('max_ms')} |",
                f"| Added latency by record timestamp p50 / p99 (ms) | {rec.get('p50_ms')} / {rec.get('p99_ms')} |",
                f"| Dispatches measured | {ev.get('count')} |",
                f"| Decider dispatches/s vs offered dispatches/s | {lat['decider_dispatches_per_s']} / {lat['offered_dispatches_per_s']} |",
                f"| Added latency, requests of the first second only, p50 / p99 (ms) | {lat['added_ms_first_second'].get('p50_ms')} / {lat['added_ms_first_second'].get('p99_ms')} |",
            ]
            if lat.get("decider_kept_up") is False:
                note = (
                    "The decider fell behind the offered load in the latency run, so its latency figures are "
                    "mostly queueing delay, not the gateway's own cost."
                )
        broker_rss = results.get("memory", {}).get("broker_peak_rss_mb")
        if broker_rss is not None:
            lines.append(f"| Broker JVM peak RSS (MB) | {broker_rss:.0f} |")
        lines.append("")
        if note:
            lines += [note, ""]
    if tp and tp.get("topics"):
        lines += [
            "Written during the throughput run (messages, MB in the broker's log segments):",
            "",
            "| Topic | Messages | MB | Bytes/message |",
            "| --- | --- | --- | --- |",
            *(
                f"| {name} | {t['messages']:,} | {_fmt(t['mb'], '.1f')} | {_fmt(t['bytes_per_message'], ',.0f')} |"
                for name, t in tp["topics"].items()
            ),
            "",
        ]
    prof = (tp or {}).get("profile_decider", {})
    if prof.get("top_own"):
        lines += [
            f"Decider profile during the throughput run (py-spy, {prof['samples']} samples at {prof['rate_hz']} Hz), "
            "top functions by own time:",
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
    elif prof.get("skipped"):
        lines += [f"Decider profile skipped: {prof['skipped']}", ""]
    lines += ["All figures: `bench/results/pipeline.json`.", ""]
    return "\n".join(lines)


def print_summary(results: dict[str, Any]) -> None:
    print("\n=== NexusCore pipeline benchmark ===")
    for metric, target, measured, met in headline(results):
        print(f"  {metric:<48} {measured:>18}   target {target:<8} met: {met.strip('*')}")
    b, tp, lat = results.get("baseline"), results.get("throughput"), results.get("latency")
    if b:
        print(
            f"\n  baseline: {b['messages']} msgs of {b['message_bytes_mean']:.0f} B mean: produced {b['produced_msgs_per_s']:,.0f}/s, "
            f"end to end {b['end_to_end_msgs_per_s']:,.0f}/s ({b['end_to_end_mb_per_s']} MB/s)"
        )
    if tp:
        print(
            f"  pipeline: {tp['requests']} requests in {tp['end_to_end_s']:.2f} s = {tp['requests_per_s']:,.0f}/s "
            f"(polled {tp['requests_per_s_polled']:,.0f}/s); {results['ratio_to_baseline']:.3f} of the baseline; "
            f"evidence {tp['evidence_summary']}, {tp['evidence_files']} Parquet files "
            f"(one terminal_summary() over them: {tp['evidence_check_s']} s)"
        )
        print("  topics of the throughput namespace (messages, MB on the broker, bytes/message):")
        for name, t in tp["topics"].items():
            print(
                f"    {name:<44} {t['messages']:>8} {_fmt(t['mb'], '>9.1f')} MB {_fmt(t['bytes_per_message'], '>8,.0f')} B"
            )
        print("  CPU during the throughput run (s, % of one core):")
        for name, v in tp["cpu"]["processes"].items():
            shown = "gone" if v is None else f"{v['cpu_s']:>7.1f} s {v['cpu_pct']:>6.1f} %"
            print(f"    {name:<34} {shown}")
    if lat:
        ev, rec, pace = lat["added_ms_event_time"], lat["added_ms_record_timestamp"], lat["pacing"]
        print(
            f"  latency: offered {pace['offered_per_s']:g}/s, achieved {pace['achieved_per_s']}/s "
            f"({pace['late_sends']} sends > {LATE_MS:g} ms late, worst {pace['worst_lag_ms']} ms); "
            f"{lat['dispatched']} dispatches"
        )
        if lat.get("decider_kept_up") is False:
            print(
                f"    the decider fell behind: {lat['decider_dispatches_per_s']} dispatches/s against "
                f"{lat['offered_dispatches_per_s']}/s offered, so these figures are mostly queueing delay"
            )
        for label, s in (
            ("event time", ev),
            ("record ts", rec),
            ("first second", lat["added_ms_first_second"]),
        ):
            print(
                f"    added ({label}): p50 {s.get('p50_ms')} p90 {s.get('p90_ms')} p99 {s.get('p99_ms')} "
                f"max {s.get('max_ms')} ms (n={s.get('count')})"
            )
    mem = results.get("memory", {})
    if mem:
        print(
            "  peak RSS (MB): "
            + ", ".join(f"{k} {_fmt(v, '.0f')}" for k, v in mem.get("pipeline_peak_rss_mb", {}).items())
            + f"; broker {_fmt(mem.get('broker_peak_rss_mb'), '.0f')}; bench {_fmt(mem.get('bench_peak_rss_mb'), '.0f')}"
        )
    prof = (tp or {}).get("profile_decider", {})
    if prof.get("top_own"):
        print(f"  decider profile ({prof['samples']} samples), top by own time:")
        for f in prof["top_own"]:
            print(
                f"    {f['own_pct']:>5.1f}% own {f['inclusive_pct']:>5.1f}% incl  {f['function']}  ({f['where']})"
            )
        print(
            "    by package: " + ", ".join(f"{x['package']} {x['own_pct']}%" for x in prof["own_by_package"])
        )
    elif prof.get("skipped"):
        print(f"  decider profile skipped: {prof['skipped']}")


def write_results(results: dict[str, Any]) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "pipeline.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (RESULTS_DIR / "pipeline.md").write_text(render_markdown(results), encoding="utf-8")


# --- command line ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    requests: int
    rate: float
    duration: float
    warmup: int
    quick: bool
    profile: bool
    keep_work: bool


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__.split("\n\n")[0])
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
    parser.add_argument("--quick", action="store_true", help="Tiny sizes for a smoke check.")
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="Do not run py-spy on the decider."
    )
    parser.add_argument(
        "--keep-work", action="store_true", help="Keep evidence and logs (kept anyway on failure)."
    )
    ns = parser.parse_args(argv)
    requests = ns.requests if ns.requests is not None else (2000 if ns.quick else 20_000)
    duration = ns.duration if ns.duration is not None else (5.0 if ns.quick else 20.0)
    if requests < 1 or ns.rate <= 0 or duration <= 0 or ns.warmup < 1:
        parser.error("--requests, --rate, --duration and --warmup must be positive")
    return Params(requests, ns.rate, duration, ns.warmup, ns.quick, ns.profile, ns.keep_work)


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every `with` block stops what it started.
    raise KeyboardInterrupt


def run(args: Params) -> dict[str, Any]:
    policy_path = DEFAULT_POLICY_PATH
    policy = load_policy(policy_path)
    run_id = uuid.uuid4().hex[:8]
    results: dict[str, Any] = {
        "benchmark": "pipeline",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m bench.pipeline", *sys.argv[1:]]),
        "git_commit": _git_commit(),
        "parameters": {
            "requests": args.requests,
            "rate": args.rate,
            "duration": args.duration,
            "warmup": args.warmup,
            "quick": args.quick,
            "profile": args.profile,
        },
        "policy": {"version": policy.version, "digest": policy.digest},
    }
    work = Path(tempfile.mkdtemp(prefix=f"nexuscore-bench-{run_id}-"))
    ok = False
    try:
        with kafka_broker() as bootstrap:
            broker_pid = find_broker_pid(bootstrap)
            results["machine"] = machine_info(bootstrap, broker_pid)
            print(
                f"bench run {run_id}: broker {bootstrap} ({results['machine']['broker']}); work dir {work}",
                flush=True,
            )
            try:
                codec = AvroCodec()
                # The same requests (seed and size) as the throughput run, so the bytes match exactly.
                sample = synthetic_requests(
                    policy, args.requests, seed=7, start=datetime.now(UTC), run=f"{run_id}-baseline"
                )
                print(f"[1/3] baseline: {args.requests} messages through plain aiokafka", flush=True)
                results["baseline"] = run_baseline(
                    bootstrap, encode_requests(codec, sample), run_id, broker_pid
                )
                del sample
                print(f"[2/3] throughput: {args.requests} requests through the pipeline", flush=True)
                results["throughput"] = run_throughput(
                    bootstrap, policy, policy_path, args, run_id, work, broker_pid
                )
                results["ratio_to_baseline"] = round(
                    results["throughput"]["requests_per_s"] / results["baseline"]["end_to_end_msgs_per_s"], 4
                )
                print(
                    f"[3/3] latency: {args.rate:g} requests/s for {args.duration:g} s through a fresh pipeline",
                    flush=True,
                )
                results["latency"] = run_latency(
                    bootstrap, policy, policy_path, args, run_id, work, broker_pid
                )
                pipeline_peaks = {
                    stage: max(
                        (
                            v
                            for v in (results[p]["peak_rss_mb"].get(stage) for p in ("throughput", "latency"))
                            if v is not None
                        ),
                        default=None,
                    )
                    for stage in PIPELINE_STAGES
                }
                broker_rss = peak_rss_mb(broker_pid) if broker_pid is not None else None
                results["memory"] = {
                    "pipeline_peak_rss_mb": pipeline_peaks,
                    "broker_peak_rss_mb": None if broker_rss is None else round(broker_rss, 1),
                    "broker_note": None if broker_pid else "the broker is not a local process: not measured",
                    "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                }
            finally:
                if os.environ.get("NEXUSCORE_BOOTSTRAP", "").strip():
                    # A shared broker keeps what it is given: remove this run's topics.
                    with contextlib.suppress(Exception):
                        asyncio.run(delete_topics_with_prefix(bootstrap, f"bench-{run_id}"))
        results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        ok = True
    finally:
        if ok and not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"evidence and logs kept in {work}", file=sys.stderr)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted; everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(results)
    print_summary(results)
    print(f"\nwrote {RESULTS_DIR / 'pipeline.json'} and {RESULTS_DIR / 'pipeline.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
