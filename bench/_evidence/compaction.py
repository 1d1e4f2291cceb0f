"""Phase 3: ``evidence compact`` over the whole store, then the proof that it kept every row.

Compaction runs as the CLI runs it (``nexuscore.projections.compact``: one process per core merges
and seals the groups). Its figures: files before and after, rows per second, CPU per row (this
process and its workers). The row count of every table is compared before and after.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from bench._evidence.common import Params, signing_key
from bench._harness import children_cpu_s, own_cpu_s
from nexuscore.projections import EvidenceStore, committed_files, compact


def _counts(args: Params) -> dict[str, int]:
    with EvidenceStore(args.root) as store:
        tables = [e["table"] for e in committed_files(args.root)]
        return {
            t: int(store.con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0])  # noqa: S608
            for t in sorted(set(tables))
        }


def run_compaction(args: Params) -> dict[str, Any]:
    before = _counts(args)
    files = committed_files(args.root)
    print(f"[compact] {len(files)} files, {sum(before.values()):,} rows", flush=True)
    t0, c0, k0 = time.perf_counter(), own_cpu_s(), children_cpu_s()
    report = compact(args.root, signing_key(), datetime.now(UTC))
    seconds = time.perf_counter() - t0
    cpu = own_cpu_s() - c0 + children_cpu_s() - k0
    after = _counts(args)
    sizes = sorted(e["rows"] for e in committed_files(args.root))
    print(
        f"    {report.replaced} files into {report.written} ({report.rows:,} rows) in {seconds:.1f} s; "
        f"{report.files_before} files before, {report.files_after} after; rows kept: {before == after}",
        flush=True,
    )
    return {
        "files_before": report.files_before,
        "files_after": report.files_after,
        "replaced": report.replaced,
        "written": report.written,
        "rows_rewritten": report.rows,
        "seconds": round(seconds, 1),
        "rows_per_s": round(report.rows / seconds) if seconds and report.rows else 0,
        "cpu_s": round(cpu, 1),
        "cpu_us_per_row": round(cpu / max(report.rows, 1) * 1e6, 2),
        "rows_per_table_before": before,
        "rows_per_table_after": after,
        "rows_kept": before == after,
        "file_rows_after": {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]}
        if sizes
        else {},
        "already_compact": not report.groups,
    }
