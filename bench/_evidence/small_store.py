"""Phase 6: ``evidence residency`` on a small store of many small files, as a client's store is.

A store of about 46,000 events is projected with the production projector code
(``tests.factories.project``: decode, dedup, encrypt, seal, commit), flushing every 500 events so
that it holds the thousands of small files the issue describes. The CLI command is timed end to end
(a subprocess: start-up included, output to a pipe), before and after ``evidence compact``, beside
the same command listing every call (``--calls``: the report as it was). The store must verify
clean first.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nexuscore.projections import committed_files, compact, verify
from tests.factories import POLICY, project, run_history, signing_key

FLUSH_EVERY = 500


def _cli(root: Path, *extra: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one ``nexuscore evidence residency`` run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(  # noqa: S603  # our own CLI, fixed arguments
        [sys.executable, "-m", "nexuscore", "evidence", "residency", "-e", str(root), *extra],
        capture_output=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"evidence residency failed: {done.stderr.decode()[-500:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _median_of(root: Path, repeat: int, *extra: str) -> dict[str, float]:
    runs = [_cli(root, *extra) for _ in range(repeat)]
    return {
        "wall_s": round(statistics.median(w for w, _ in runs), 3),
        "cpu_s": round(statistics.median(c for _, c in runs), 3),
    }


def run_small_store(work: Path, requests: int, repeat: int) -> dict[str, Any]:
    root = work / "small-evidence"
    events = run_history(POLICY, requests, seed=3)
    print(f"[small] projecting {len(events):,} events, a flush every {FLUSH_EVERY}", flush=True)
    project(root, events, flush_every=FLUSH_EVERY)
    report = verify(root, signing_key().public_key(), {POLICY.digest})
    files = len(committed_files(root))
    print(f"    {files} files; verify ok={report.ok}, {len(report.findings)} findings", flush=True)
    summary_small = _median_of(root, repeat)
    calls_small = _median_of(root, repeat, "--calls")
    compacted = compact(root, signing_key(), datetime.now(UTC))
    summary_compact = _median_of(root, repeat)
    after = verify(root, signing_key().public_key(), {POLICY.digest})
    print(
        f"    residency: {summary_small['wall_s']} s on {files} files, {summary_compact['wall_s']} s compacted "
        f"({compacted.files_after} files); every call listed: {calls_small['wall_s']} s",
        flush=True,
    )
    return {
        "events": len(events),
        "files": files,
        "files_compacted": compacted.files_after,
        "verified_clean": report.ok and not report.findings,
        "verified_clean_after_compaction": after.ok and not after.findings,
        "residency_summary_small_files": summary_small,
        "residency_summary_compacted": summary_compact,
        "baseline_residency_calls_small_files": calls_small,
        "ratio_to_baseline": round(summary_small["wall_s"] / calls_small["wall_s"], 3),
        "repeat": repeat,
    }
