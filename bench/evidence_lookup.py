"""Cold ``lineage``, default ``verify`` and ``verify --deep`` on an existing store, each beside its baselines in one run.

``python -m bench.evidence_lookup --root STORE [--repeat 9] [--label NAME]`` (a store that
``python -m bench.evidence`` or ``bench._evidence.store`` generated and compacted; it must verify
clean, and the results say so):

- **lineage** of ``--repeat`` different requests, cold (a fresh connection and fresh file handles
  per lookup, in this process): the path ``evidence lineage`` runs (``projections.lineage_at``: the
  manifest, then the request index ``evidence compact`` sealed, then only the row groups it names;
  files no index covers are searched as before); the direct path before the index (one DuckDB
  statement over the nine lineage tables' files); the pyarrow.dataset baseline of
  ``bench._evidence.query_baselines``. Every answer is compared with the direct path's and with the
  baseline's. Then the command itself, ``nexuscore evidence lineage``, end to end in a fresh process
  (start-up included), ``--cli-repeat`` times.
- **residency** (``--residency-root``, repeatable: e.g. a 46,000-event store of small files and its
  compacted copy): ``nexuscore evidence residency`` end to end in a fresh process, and in this
  process (the store's views opened, then the summary query; and the query alone), ``--cli-repeat``
  times each, interleaved with the summary counted as before (every call joined with its decision,
  not the partials ``evidence compact`` sealed): both answers are compared; with
  ``--before-python`` (the interpreter of a checkout of the code before), its CLI in the same run.
- **verify** (default mode), ``--repeat`` times: as it runs now (placement from the footers'
  statistics) and with placement read from the rows (as before), beside the I/O floor (sha256 of
  every committed file on every core).
- **verify --deep**, ``--deep-repeat`` times each (default 0: skipped), interleaved: as it runs now
  (threads, each with a DuckDB connection, rows rendered in batches) and as before
  (``bench._evidence.deep_before``: a forkserver process per core, whole files rendered at once).
  CPU counts the worker processes too.

Results go to ``bench/results/evidence-lookup[-LABEL].json`` and ``.md``. CPU times are this
process's (in-process paths) or the child's (``getrusage``), stable on a shared machine where wall
times are not.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
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
from nexuscore.projections import (
    EvidenceStore,
    LocalKeyStore,
    _index,
    _lineage,
    _manifest,
    committed_files,
    lineage_at,
    verify,
)


def _ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "min_ms": round(min(xs) * 1000, 1)}


def _timed(call: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process's threads, answer)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return time.perf_counter() - t0, time.process_time() - c0, out


def _direct_path(root: Path, request_id: str) -> Any:  # noqa: ANN401
    """The direct path before the index: one DuckDB statement over every lineage table's files."""
    keys = LocalKeyStore(root / "_keys")
    return _lineage.lineage(root, committed_files(root), keys, request_id, index=None)


def _key(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return sorted((r["event"], r["event_id"], r["detail"]) for r in rows)


def run_lineage(root: Path, picks: list[str]) -> dict[str, Any]:
    walls: dict[str, list[float]] = {"index (now)": [], "direct (before)": [], "pyarrow baseline": []}
    cpus: dict[str, list[float]] = {k: [] for k in walls}
    same = True
    for rid in picks:
        answers = {}
        for label, call in (
            ("index (now)", functools.partial(lineage_at, root, rid)),
            ("direct (before)", functools.partial(_direct_path, root, rid)),
            ("pyarrow baseline", functools.partial(baseline_lineage, root, rid)),
        ):
            wall, cpu, answers[label] = _timed(call)
            walls[label].append(wall)
            cpus[label].append(cpu)
        now = answers["index (now)"].to_pylist()
        same &= bool(now) and now == answers["direct (before)"].to_pylist()
        same &= _key(now) == _key(answers["pyarrow baseline"])
    out = {k: {"wall": _ms(walls[k]), "cpu": _ms(cpus[k])} for k in walls}
    return {
        "requests": len(picks),
        "answers_match": same,
        "index": _index_facts(root),
        "paths": out,
        "ratio_index_to_baseline": round(
            statistics.median(walls["index (now)"]) / statistics.median(walls["pyarrow baseline"]), 3
        ),
        "ratio_index_to_direct_cpu": round(
            statistics.median(cpus["index (now)"]) / statistics.median(cpus["direct (before)"]), 3
        ),
    }


def _index_facts(root: Path) -> dict[str, Any] | None:
    index = _index.current_index(_manifest.signed_entries(root))
    if index is None:
        return None
    covered = _index.index_files(root, index) or []
    return {
        "rows": index.get("rows"),
        "mb": round((root / index["path"]).stat().st_size / 1e6, 1),
        "files_covered": len(covered),
        "files_committed": len(committed_files(root)),
    }


def _child(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command in a fresh process (start-up included)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, check=False)  # noqa: S603  # our own CLI
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{' '.join(argv[:5])} failed: {done.stderr.decode()[-500:]}")
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def _runs(argv: list[str], repeat: int) -> dict[str, Any]:
    runs = [_child(argv) for _ in range(repeat)]
    walls, cpus = [w for w, _ in runs], [c for _, c in runs]
    return {"wall": _ms(walls), "cpu": _ms(cpus)}


def _cli(python: str, *args: str) -> list[str]:
    return [python, "-m", "nexuscore", "evidence", *args]


def run_cli_lineage(root: Path, picks: list[str], repeat: int, before: str | None) -> dict[str, Any]:
    rids = (picks * repeat)[:repeat]
    out = {"now": _runs_over(rids, lambda rid: _cli(sys.executable, "lineage", rid, "-e", str(root)))}
    if before:
        out["before"] = _runs_over(rids, lambda rid: _cli(before, "lineage", rid, "-e", str(root)))
    return out


def _runs_over(rids: list[str], argv: Callable[[str], list[str]]) -> dict[str, Any]:
    runs = [_child(argv(rid)) for rid in rids]
    return {"wall": _ms([w for w, _ in runs]), "cpu": _ms([c for _, c in runs])}


def _in_process_residency(root: Path, *, full: bool = False) -> Any:  # noqa: ANN401
    """The summary as ``evidence residency`` counts it (the sealed partials plus the files flushed
    since), or (``full``) as it did before: every call joined with its decision."""
    with EvidenceStore(root) as store:
        return store.full_residency_summary() if full else store.residency_summary()


def _query_only(root: Path, *, full: bool) -> tuple[float, float, Any]:
    """The summary alone, the store's views already made."""
    with EvidenceStore(root) as store:
        return _timed(store.full_residency_summary if full else store.residency_summary)


def run_residency(roots: list[Path], repeat: int, before: str | None) -> list[dict[str, Any]]:
    results = []
    for root in roots:
        timed, full, query, query_full = [], [], [], []
        for _ in range(repeat):  # interleaved: the same load for both
            timed.append(_timed(functools.partial(_in_process_residency, root)))
            full.append(_timed(functools.partial(_in_process_residency, root, full=True)))
            query.append(_query_only(root, full=False))
            query_full.append(_query_only(root, full=True))
        row: dict[str, Any] = {
            "root": str(root),
            "events": sum(int(e["rows"]) for e in committed_files(root)),
            "files": len(committed_files(root)),
            "identical": all(
                t[2].to_pylist() == full[0][2].to_pylist() for t in timed + full + query + query_full
            ),
            "cli_now": _runs(_cli(sys.executable, "residency", "-e", str(root)), repeat),
            "in_process": {"wall": _ms([w for w, _, _ in timed]), "cpu": _ms([c for _, c, _ in timed])},
            "in_process_full": {"wall": _ms([w for w, _, _ in full]), "cpu": _ms([c for _, c, _ in full])},
            "query": {"wall": _ms([w for w, _, _ in query]), "cpu": _ms([c for _, c, _ in query])},
            "query_full": {
                "wall": _ms([w for w, _, _ in query_full]),
                "cpu": _ms([c for _, c, _ in query_full]),
            },
        }
        if before:
            row["cli_before"] = _runs(_cli(before, "residency", "-e", str(root)), repeat)
        results.append(row)
    return results


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
    for label, rows_placement in (
        ("now (placement from footers)", False),
        ("before (placement from rows)", True),
    ):
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


def _deep_once(root: Path, *, before: bool) -> tuple[float, float, Any]:
    """(wall, CPU of this process and of the before path's worker processes, report)."""
    call = functools.partial(verify, root, signing_key().public_key(), {default_policy().digest}, deep=True)
    if not before:
        return _timed(call)
    from bench._evidence import deep_before
    from nexuscore.projections import _verify_files

    deep_before.WORKER_CPU.clear()
    with mock.patch.object(_verify_files, "_check_roots", deep_before.check_roots):
        wall, cpu, report = _timed(call)
    return wall, cpu + sum(deep_before.WORKER_CPU.values()), report


def run_deep(root: Path, repeat: int) -> dict[str, Any]:
    labels = {"now (threads, batched rendering)": False, "before (a process per core)": True}
    walls: dict[str, list[float]] = {k: [] for k in labels}
    cpus: dict[str, list[float]] = {k: [] for k in labels}
    ok = dict.fromkeys(labels, True)
    rows = 0
    for _ in range(repeat):  # interleaved: both paths see the same load
        for label, before in labels.items():
            wall, cpu, report = _deep_once(root, before=before)
            walls[label].append(wall)
            cpus[label].append(cpu)
            ok[label] &= report.ok
            rows = report.rows
    modes = {
        k: {
            "ok": ok[k],
            "events_per_s_median": round(rows / statistics.median(walls[k])),
            "events_per_s_best": round(rows / min(walls[k])),
            "cpu_us_per_event_median": round(statistics.median(cpus[k]) / rows * 1e6, 3),
            "wall": _ms(walls[k]),
        }
        for k in labels
    }
    return {"rows": rows, "modes": modes}


def _sample(root: Path, n: int) -> list[str]:
    with EvidenceStore(root) as store:
        found = store.query(
            f"SELECT request_id FROM requests USING SAMPLE reservoir({int(n)} ROWS) REPEATABLE (7)"  # noqa: S608
        )
    return [str(r) for r in found.column("request_id").to_pylist()]


def render(results: dict[str, Any]) -> str:
    lin = results["lineage"]
    index = lin["index"]
    held = (
        f"request index: {index['rows']:,} rows, {index['mb']} MB, covering {index['files_covered']} of "
        f"{index['files_committed']} committed files"
        if index
        else "no request index (every file searched)"
    )
    lines = [
        f"# Evidence lookups: cold lineage, residency, default verify and verify --deep ({results['timestamp_utc']})",
        "",
        f"`{results['command']}` at {results['git_commit']}; store {results['root']}; {held}; load "
        f"average {results['loadavg_start']} at start, {results['loadavg_end']} at end (2 cores, shared).",
        "",
        f"## lineage, cold, {lin['requests']} different requests (answers match: {lin['answers_match']})",
        "",
        "In this process, a fresh connection and fresh file handles per lookup:",
        "",
        "| path | wall median | wall min | CPU median | CPU min |",
        "|---|---|---|---|---|",
    ]
    for k, v in lin["paths"].items():
        lines.append(
            f"| {k} | {v['wall']['median_ms']} ms | {v['wall']['min_ms']} ms | {v['cpu']['median_ms']} ms "
            f"| {v['cpu']['min_ms']} ms |"
        )
    lines += [
        "",
        f"index / pyarrow baseline (wall) = {lin['ratio_index_to_baseline']}; "
        f"index / direct (CPU) = {lin['ratio_index_to_direct_cpu']}.",
        "",
    ]
    lines += _render_cli(results)
    lines += _render_verify(results)
    lines += _render_deep(results)
    return "\n".join(lines)


_RESIDENCY_LABELS = {
    "cli_now": "now",
    "cli_before": "before",
    "in_process": "in-process: views + query, sealed partials + tail",
    "in_process_full": "in-process: views + query, every call joined (before)",
    "query": "the query alone: sealed partials + tail",
    "query_full": "the query alone: every call joined (before)",
}


def _render_cli(results: dict[str, Any]) -> list[str]:
    lines = [
        "## the commands end to end (a fresh process each: interpreter start-up and imports included)",
        "",
        "| command | store | wall median | wall min | CPU median |",
        "|---|---|---|---|---|",
    ]
    for label, v in results["lineage_cli"].items():
        lines.append(
            f"| `evidence lineage` ({label}) | {Path(results['root']).name} | {v['wall']['median_ms']} ms "
            f"| {v['wall']['min_ms']} ms | {v['cpu']['median_ms']} ms |"
        )
    for r in results["residency"]:
        where = f"{Path(r['root']).name}: {r['events']:,} events, {r['files']} files"
        where += "" if r.get("identical", True) else " (ANSWERS DIFFER)"
        for label in _RESIDENCY_LABELS:
            if label in r:
                v = r[label]
                name = _RESIDENCY_LABELS[label]
                lines.append(
                    f"| `evidence residency` ({name}) | {where} | {v['wall']['median_ms']} ms "
                    f"| {v['wall']['min_ms']} ms | {v['cpu']['median_ms']} ms |"
                )
    return [*lines, ""]


def _render_verify(results: dict[str, Any]) -> list[str]:
    ver = results.get("verify")
    if not ver:
        return []
    lines = [
        f"## verify (default mode), {results['verify_repeat']} runs each: {ver['rows']:,} events in "
        f"{ver['files']} committed files",
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
    return lines


def _render_deep(results: dict[str, Any]) -> list[str]:
    deep = results.get("verify_deep")
    if not deep:
        return []
    lines = [
        f"## verify --deep, {results['deep_repeat']} runs each, interleaved (CPU includes worker processes)",
        "",
        "| verify --deep | ok | events/s (median) | events/s (best) | CPU µs/event |",
        "|---|---|---|---|---|",
    ]
    for k, v in deep["modes"].items():
        lines.append(
            f"| {k} | {v['ok']} | {v['events_per_s_median']:,} | {v['events_per_s_best']:,} | "
            f"{v['cpu_us_per_event_median']} |"
        )
    return [*lines, ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.evidence_lookup", description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--cli-repeat", type=int, default=5)
    parser.add_argument("--verify-repeat", type=int, default=None, help="default --repeat; 0 skips verify")
    parser.add_argument(
        "--deep-repeat", type=int, default=0, help="runs of verify --deep per path; 0 skips it"
    )
    parser.add_argument("--residency-root", type=Path, action="append", default=[])
    parser.add_argument("--before-python", help="the interpreter of a checkout of the code before")
    parser.add_argument("--label", default="")
    ns = parser.parse_args(argv)
    if (
        ns.repeat < 1
        or ns.cli_repeat < 1
        or (ns.verify_repeat is not None and ns.verify_repeat < 0)
        or ns.deep_repeat < 0
    ):
        parser.error("--repeat and --cli-repeat >= 1, --verify-repeat and --deep-repeat >= 0")
    root = ns.root.resolve()
    verify_repeat = ns.repeat if ns.verify_repeat is None else ns.verify_repeat
    results: dict[str, Any] = {
        "benchmark": "evidence_lookup",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.evidence_lookup", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "root": str(root),
        "cpus": os.cpu_count(),
        "repeat": ns.repeat,
        "verify_repeat": verify_repeat,
        "deep_repeat": ns.deep_repeat,
        "loadavg_start": loadavg(),
    }
    picks = _sample(root, ns.repeat)
    results["lineage"] = run_lineage(root, picks)
    results["lineage_cli"] = run_cli_lineage(root, picks, ns.cli_repeat, ns.before_python)
    results["residency"] = run_residency(
        [r.resolve() for r in ns.residency_root], ns.cli_repeat, ns.before_python
    )
    if verify_repeat:
        results["verify"] = run_verify(root, verify_repeat)
    if ns.deep_repeat:
        results["verify_deep"] = run_deep(root, ns.deep_repeat)
    results["loadavg_end"] = loadavg()
    name = "evidence-lookup" + (f"-{ns.label}" if ns.label else "")
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS_DIR / f"{name}.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
