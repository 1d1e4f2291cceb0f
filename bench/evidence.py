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
3. **verify** of the store as generated (it must be clean: every benchmark below says so), then
   **queries**, cold (a fresh ``EvidenceStore`` per measurement, as the CLI does; median of 5): who
   routed what for one tenant over 30 days, the lineage of one request, spend by day, the residency
   summary; baselines: the same answers with pyarrow.dataset / pyarrow.compute over the same
   committed files (residency: the per-call audit counted in Python).
4. **compaction** (``evidence compact``), the same queries again on the compacted store, and
   **verify** in both modes; baseline: the I/O floor (sha256 of every file's bytes).
5. **residency on a small store** of about 46,000 events in thousands of small files (the CLI end to
   end, before and after compaction; ``--small-requests 0`` skips it).

Results go to ``bench/results/evidence.json`` and ``bench/results/evidence.md`` (sections skipped
with ``--skip-*`` are carried over from the previous results file, marked with their date).

This module is the command line and the run from start to end; its parts are in ``bench._evidence``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._evidence.common import (
    DEFAULT_ROOT,
    TARGET_DEEP_EPS,
    TARGET_LINEAGE_S,
    TARGET_PROJECTOR_EPS,
    TARGET_RESIDENCY_S,
    TARGET_RESIDENCY_SMALL_S,
    TARGET_VERIFY_EPS,
    TARGET_WHO_S,
    Params,
)
from bench._evidence.compaction import run_compaction
from bench._evidence.projector import run_kafka
from bench._evidence.queries import run_queries
from bench._evidence.report import machine, print_summary, render_markdown
from bench._evidence.small_store import run_small_store
from bench._evidence.store import build_store
from bench._evidence.verify import run_verify
from bench._harness import git_commit, loadavg, own_rss_mb, previous_results, run_main

DESCRIPTION = (__doc__ or "").split("\n\n")[0]


def parse_args(argv: Sequence[str] | None) -> Params:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence", description=DESCRIPTION)
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
    parser.add_argument(
        "--small-requests",
        type=int,
        default=10_500,
        help="Requests of the small store of phase 5 (default 10,500: about 46,000 events; 0 skips it).",
    )
    parser.add_argument("--days", type=int, default=35, help="Days the store spans (default 35).")
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="Do not run py-spy on the projector."
    )
    parser.add_argument(
        "--projector-baseline",
        metavar="REV",
        help="Also run the projector of commit REV on the same log, before this one (before/after).",
    )
    ns = parser.parse_args(argv)
    if ns.decisions < 1000 or ns.chunk < 1000 or ns.kafka_events < 1000 or ns.repeat < 1 or ns.days < 31:
        parser.error("--decisions, --chunk, --kafka-events >= 1000; --repeat >= 1; --days >= 31")
    if ns.small_requests < 0:
        parser.error("--small-requests >= 0")
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
        ns.small_requests,
        ns.projector_baseline,
    )


def carry_over(results: dict[str, Any], previous: dict[str, Any], sections: Sequence[str]) -> None:
    """Copy skipped sections from the previous results, marked with the date they were measured."""
    for section in sections:
        if previous.get(section):
            results[section] = {
                **previous[section],
                "carried_over_from": previous[section].get("carried_over_from")
                or previous.get("timestamp_utc"),
            }


STORE_SECTIONS = (
    "store",
    "verify_before_compaction",
    "queries_before_compaction",
    "compaction",
    "queries",
    "verify",
    "verify_deep",
    "small_store",
)


def run_store(args: Params, results: dict[str, Any], work: Path) -> None:
    """Phases 2 to 5: the store, verify, queries, compaction, queries and verify again."""
    store = results["store"] = build_store(args)
    print(
        f"    {store['rows_total']:,} rows, {store['files']} files, {store['store_gb']} GB, {store['seconds']:,} s",
        flush=True,
    )
    results["verify_before_compaction"] = run_verify(args, store)
    results["queries_before_compaction"] = run_queries(args, store)
    results["compaction"] = run_compaction(args)
    results["queries"] = run_queries(args, store)
    results["verify"] = run_verify(args, store)
    results["verify_deep"] = run_verify(args, store, deep=True)
    if args.small_requests:
        results["small_store"] = run_small_store(work, args.small_requests, args.repeat)


def run(args: Params, argv: Sequence[str]) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    previous = previous_results("evidence")
    results: dict[str, Any] = {
        "benchmark": "evidence",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.evidence", *argv]),
        "git_commit": git_commit(),
        "machine": machine(),
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in args.__dict__.items()},
        "targets": {
            "projector_events_per_s": TARGET_PROJECTOR_EPS,
            "who_routed_what_s": TARGET_WHO_S,
            "lineage_s": TARGET_LINEAGE_S,
            "verify_events_per_s": TARGET_VERIFY_EPS,
            "verify_deep_events_per_s": TARGET_DEEP_EPS,
            "residency_s": TARGET_RESIDENCY_S,
            "residency_small_store_s": TARGET_RESIDENCY_SMALL_S,
        },
    }
    work = Path(tempfile.mkdtemp(prefix=f"nexuscore-bench-evidence-{run_id}-"))
    try:
        if args.skip_kafka:
            carry_over(results, previous, ("kafka",))
        else:
            results["kafka"] = run_kafka(args, run_id, work)
        if args.skip_store:
            carry_over(results, previous, STORE_SECTIONS)
        else:
            run_store(args, results, work)
        results["bench_peak_rss_mb"] = round(own_rss_mb(), 1)
        results["machine"]["loadavg_end"] = loadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_main("evidence", lambda: run(args, argv), render_markdown, print_summary)


if __name__ == "__main__":
    sys.exit(main())
