"""Phase 4: ``verify`` over the whole store, against the I/O floor (sha256 of every file's bytes)."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench._evidence.common import Params, signing_key
from bench._harness import CallTimer, children_cpu_s, own_cpu_s
from nexuscore.policy import default_policy
from nexuscore.projections import committed_files, verify


def _sha_file(path: Path) -> int:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return n


def io_floor(files: list[Path], rows: int) -> dict[str, Any]:
    """sha256 of every file, on one thread and on all cores: what reading the store costs at least."""

    print(f"[verify] I/O floor: sha256 of {len(files)} files", flush=True)
    t0 = time.perf_counter()
    nbytes = sum(map(_sha_file, files))
    single = time.perf_counter() - t0
    workers = os.cpu_count() or 1
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        sum(pool.map(_sha_file, files))
    parallel = time.perf_counter() - t0
    print(
        f"    {nbytes / 1e9:.2f} GB in {parallel:.1f} s ({workers} threads; one thread {single:.1f} s)",
        flush=True,
    )
    return {
        "bytes": nbytes,
        "gb": round(nbytes / 1e9, 2),
        "seconds_one_thread": round(single, 2),
        "seconds_all_cores": round(parallel, 2),
        "threads": workers,
        "gb_per_s_all_cores": round(nbytes / 1e9 / parallel, 2),
        "events_per_s_all_cores": round(rows / parallel),
    }


def _phases() -> dict[str, tuple[Any, str]]:
    """verify's steps, for ``CallTimer``."""
    from nexuscore.projections import _verify, _verify_files

    return {
        "1 manifest chain + head": (_verify, "_check_manifest"),
        "2 files: sha256 (threads) + footer row counts": (_verify, "check_files"),
        "2d of which deep: leaves + Merkle roots (threads)": (_verify_files, "_check_roots"),
        "3 placement (footer statistics; DuckDB min/max where absent, deep)": (_verify, "_check_placement"),
        "4 offset coverage": (_verify, "_check_coverage"),
        "5 events (one aggregation per request, anti-join, duplicates)": (_verify, "_check_events"),
        "6 content keys (one sample per key)": (_verify, "_check_keys"),
    }


def run_verify(args: Params, store_info: dict[str, Any], *, deep: bool = False) -> dict[str, Any]:
    """``verify`` over the whole store (``deep``: every leaf and Merkle root too), beside the I/O
    floor measured in the same run."""
    root = args.root
    files = [root / e["path"] for e in committed_files(root)]
    rows = store_info["rows_total"]
    floor = io_floor(files, rows)
    print(f"[verify] verify({'deep' if deep else 'default'}) over {rows:,} events", flush=True)
    c0, k0 = own_cpu_s(), children_cpu_s()
    load0 = os.getloadavg()[0]
    with CallTimer(_phases()) as timer:
        report = verify(root, signing_key().public_key(), {default_policy().digest}, deep=deep)
    cpu_main, cpu_workers = own_cpu_s() - c0, children_cpu_s() - k0
    findings = [
        {"kind": f.kind, "where": f.where, "detail": f.detail, "fatal": f.fatal} for f in report.findings
    ]
    for f in report.findings:
        print(f"    finding: {f.kind} {f.where}: {f.detail}", flush=True)
    eps = report.rows / report.seconds
    print(
        f"    ok={report.ok}, {report.rows:,} rows in {report.seconds:.1f} s = {eps:,.0f} events/s "
        f"(floor {floor['events_per_s_all_cores']:,}/s)",
        flush=True,
    )
    return {
        "mode": "deep" if deep else "default",
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
        "cpu_us_per_event": round((cpu_main + cpu_workers) / max(report.rows, 1) * 1e6, 2),
        "cpu_s_worker_processes": round(cpu_workers, 1),
        "loadavg_1min_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "phases": timer.result(),
        "floor": floor,
        "ratio_to_floor": round(eps / floor["events_per_s_all_cores"], 4),
    }
