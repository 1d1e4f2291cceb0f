"""The four stages as child processes, and waiting until requests reach the evidence.

``running_pipeline`` creates a namespace's topics, starts provider, decider, worker and projector with
the demo's command lines and stops them on any exit; ``warm_up`` sends a first batch through so every
consumer group has joined before anything is timed; ``wait_for_terminal`` polls the Parquet evidence
until a number of requests have a terminal state.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq

from bench._harness import BenchError, await_topics
from bench._pipeline.params import (
    FULL_CHECK_EVERY_S,
    JOIN_TIMEOUT_S,
    POLL_S,
    PROGRESS_EVERY_S,
    WARMUP_TIMEOUT_S,
)
from bench._pipeline.topics import encode_requests, send_all
from nexuscore._demo import ReviewDesk, decider_args, projector_args
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Service, Services
from nexuscore._synthetic import synthetic_requests
from nexuscore.policy import RoutingPolicy
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics, ensure_topics


def start_pipeline(
    services: Services, bootstrap: str, topics: Topics, keys: DevKeys, evidence_dir: Path, workers: int
) -> dict[str, Service]:
    """The stages with ``nexuscore._demo.Pipeline``'s command lines, minus ``--error-rate 0.03``, and
    ``workers`` worker processes (a worker is one event loop: one per core is how a node runs them).

    Pipeline offers no way to change the error rate; the benchmark measures the gateway, so the
    simulated provider must answer at once and never fail (no retries, no backoff sleeps).
    """
    provider = services.start("provider", "run", "provider", "--port", "0")
    url = provider.wait_for_line("simulated provider listening on", 30)
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    stages = {
        "provider": provider,
        "decider": services.start("decider", *decider_args(common, keys)),
        "projector": services.start("projector", *projector_args(common, keys, evidence_dir)),
    }
    for name in worker_names(workers):  # one consumer group: the dispatch partitions are shared out
        stages[name] = services.start(name, "run", "worker", *common, "--simulated-url", url)
    return stages


def worker_names(workers: int) -> list[str]:
    """``worker``, then ``worker-2``, ``worker-3``...: the first keeps the name of a one-worker run."""
    return ["worker", *(f"worker-{i}" for i in range(2, workers + 1))]


def stage_pids(stages: dict[str, Service], me: str, broker_pid: int | None) -> dict[str, int]:
    """The processes whose CPU a phase measures: the stages, this process (as ``me``), the broker."""
    pids = {name: s.proc.pid for name, s in stages.items()}
    pids[me] = os.getpid()
    if broker_pid is not None:
        pids["broker"] = broker_pid
    return pids


def peak_rss(stages: dict[str, Service]) -> dict[str, float | None]:
    """Peak RSS of every stage so far, MB."""
    rss = {name: s.peak_rss_mb() for name, s in stages.items()}
    return {k: None if v is None else round(v, 1) for k, v in rss.items()}


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
    seconds = time.monotonic() - started
    print(f"    warm-up: {n} requests through the pipeline in {seconds:.1f} s", flush=True)
    return seconds


@contextlib.contextmanager
def running_pipeline(
    bootstrap: str, topics: Topics, policy_path: Path, root: Path, workers: int
) -> Iterator[tuple[Services, dict[str, Service], EvidenceWatch]]:
    asyncio.run(ensure_topics(bootstrap, topics))
    asyncio.run(await_topics(bootstrap, topics.all, JOIN_TIMEOUT_S))
    evidence = root / "evidence"
    evidence.mkdir(parents=True, exist_ok=True)
    # Services stops every stage (SIGTERM, grace, SIGKILL) on any exit, Ctrl-C included.
    with Services(root / "logs") as services:
        keys = dev_keys(root / "keys", policy_path)
        stages = start_pipeline(services, bootstrap, topics, keys, evidence, workers)
        yield services, stages, EvidenceWatch(evidence, keys)
