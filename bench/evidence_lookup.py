"""Cold ``lineage`` and default ``verify`` on an existing store, each beside its baselines in one run.

``python -m bench.evidence_lookup --root STORE [--repeat 9] [--label NAME]`` (a store that
``python -m bench.evidence`` or ``bench._evidence.store`` generated and compacted; it must verify
clean, and the results say so):

- **lineage** of ``--repeat`` different requests, cold: the direct path ``evidence lineage`` runs
  (``projections.lineage_at``: the manifest, then one DuckDB statement over the nine lineage tables'
  files); the path before it (a fresh ``EvidenceStore``, i.e. views over every table, then the same
  lookup through the views); the pyarrow.dataset baseline of ``bench._evidence.query_baselines``.
  Every answer is compared with ``EvidenceStore.lineage``'s and with the baseline's.
- **verify** (default mode), ``--repeat`` times: as it runs now (placement from the footers'
  statistics) and with placement read from the rows (as before), beside the I/O floor (sha256 of
  every committed file on every core).

Results go to ``bench/results/evidence-lookup[-LABEL].json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

from bench._evidence.common import signing_key
from bench._evidence.query_baselines import baseline_lineage
from bench._evidence.verify import io_floor
from bench._harness import RESULTS_DIR, git_commit, loadavg
from nexuscore.policy import default_policy
from nexuscore.projections import EvidenceStore, committed_files, lineage_at, verify

_VIEWS_LOOKUP = " UNION ALL BY NAME ".join(
    f"SELECT '{t}' AS _table, * FROM {t} WHERE request_id = $id"  # noqa: S608  # names are ours
    for t in (
        "requests",
        "rejections",
        "decisions",
        "dispatches",
        "attempts",
        "outcomes",
        "settlements",
        "reviews",
        "resolutions",
    )
)


def _ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "min_ms": round(min(xs) * 1000, 1)}


def _timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process's threads, answer)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _views_path(root: Path, request_id: str) -> int:
    with EvidenceStore(root) as store:
        return store.query(_VIEWS_LOOKUP, {"id": request_id}).num_rows


def _key(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((r["event"], r["event_id"], r["detail"]) for r in rows)


def run_lineage(root: Path, picks: list[str]) -> dict[str, Any]:
    walls: dict[str, list[float]] = {"direct": [], "views (before)": [], "pyarrow baseline": []}
    cpus: dict[str, list[float]] = {k: [] for k in walls}
    same = True
    for rid in picks:
        for label, call in (
            ("direct", functools.partial(lineage_at, root, rid)),
            ("views (before)", functools.partial(_views_path, root, rid)),
            ("pyarrow baseline", functools.partial(baseline_lineage, root, rid)),
        ):
            wall, cpu, out = _timed(call)
            walls[label].append(wall)
            cpus[label].append(cpu)
            if label == "direct":
                direct = out.to_pylist()
            elif label == "pyarrow baseline":
                same &= _key(direct) == _key(out)
        with EvidenceStore(root) as store:
            same &= store.lineage(rid).to_pylist() == direct
    out = {k: {"wall": _ms(walls[k]), "cpu": _ms(cpus[k])} for k in walls}
    base = statistics.median(walls["pyarrow baseline"])
    return {
        "requests": len(picks),
        "answers_match": same,
        "paths": out,
        "ratio_direct_to_baseline": round(statistics.median(walls["direct"]) / base, 3),
        "ratio_direct_to_views": round(
            statistics.median(walls["direct"]) / statistics.median(walls["views (before)"]), 3
        ),
    }


def _verify_once(root: Path, *, rows_placement: bool) -> tuple[float, float, Any]:
    call = functools.partial(verify, root, signing_key().public_key(), {default_policy().digest})
    if not rows_placement:
        return _timed(call)
    from nexuscore.projections import _verify_files

    with mock.patch.object(_verify_files, "_placement", lambda metadata: None):
        return _timed(call)


def run_verify(root: Path, repeat: int) -> dict[str, Any]:
    files = [root / e["path"] for e in committed_files(root)]
    rows = 0
    results: dict[str, Any] = {}
    for label, rows_placement in (("now (placement from footers)", False), ("before (placement from rows)", True)):
        walls, cpus, ok = [], [], True
        for _ in range(repeat):
            wall, cpu, report = _verify_once(root, rows_placement=rows_placement)
            walls.append(wall)
            cpus.append(cpu)
            ok &= report.ok
            rows = report.rows
        results[label] = {
            "ok": ok,
            "events_per_s_median": round(rows / statistics.median(walls)),
            "events_per_s_best": round(rows / min(walls)),
            "cpu_us_per_event_median": round(statistics.median(cpus) / rows * 1e6, 3),
            "wall": _ms(walls),
        }
    return {"rows": rows, "files": len(files), "modes": results, "io_floor": io_floor(files, rows)}


def _sample(root: Path, n: int) -> list[str]:
    with EvidenceStore(root) as store:
        found = store.query(
            f"SELECT request_id FROM requests USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE (7)"  # noqa: S608
        )
    return [str(r) for r in found.column("request_id").to_pylist()]


def render(results: dict[str, Any]) -> str:
    lin, ver = results["lineage"], results["verify"]
    lines = [
        f"# Evidence lookups: cold lineage and default verify ({results['timestamp_utc']})",
        "",
        f"`{results['command']}` at {results['git_commit']}; store {results['root']}: "
        f"{ver['rows']:,} events in {ver['files']} committed files; load average "
        f"{results['loadavg_start']} at start, {results['loadavg_end']} at end (2 cores, shared).",
        "",
        f"## lineage, cold, {lin['requests']} different requests (answers match: {lin['answers_match']})",
        "",
        "| path | wall median | wall min | CPU median |",
        "|---|---|---|---|",
    ]
    for k, v in lin["paths"].items():
        lines.append(f"| {k} | {v['wall']['median_ms']} ms | {v['wall']['min_ms']} ms | {v['cpu']['median_ms']} ms |")
    lines += [
        "",
        f"direct / pyarrow baseline = {lin['ratio_direct_to_baseline']}; "
        f"direct / views = {lin['ratio_direct_to_views']}.",
        "",
        f"## verify (default mode), {results['repeat']} runs each",
        "",
        "| verify | ok | events/s (median) | events/s (best) | CPU µs/event |",
        "|---|---|---|---|---|",
    ]
    for k, v in ver["modes"].items():
        lines.append(
            f"| {k} | {v['ok']} | {v['events_per_s_median']:,} | {v['events_per_s_best']:,} | "
            f"{v['cpu_us_per_event_median']} |"
        )
    floor = ver["io_floor"]
    lines += [
        f"| I/O floor: sha256 of every file, {floor['threads']} threads | - | "
        f"{floor['events_per_s_all_cores']:,} | - | - |",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence_lookup", description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--label", default="")
    ns = parser.parse_args(argv)
    root = ns.root.resolve()
    results: dict[str, Any] = {
        "benchmark": "evidence_lookup",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.evidence_lookup", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "root": str(root),
        "cpus": os.cpu_count(),
        "repeat": ns.repeat,
        "loadavg_start": loadavg(),
    }
    results["lineage"] = run_lineage(root, _sample(root, ns.repeat))
    results["verify"] = run_verify(root, ns.repeat)
    results["loadavg_end"] = loadavg()
    name = "evidence-lookup" + (f"-{ns.label}" if ns.label else "")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
