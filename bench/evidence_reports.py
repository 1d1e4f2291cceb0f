"""Cold ``who-routed-what`` and ``spend`` on a compacted store, from the sealed partials and as before.

``python -m bench.evidence_reports --root STORE [--meta META.json] [--repeat 5] [--label NAME]``
(a store that ``python -m bench.evidence`` generated, compacted by ``evidence compact`` of this
version, so that its compaction sealed the ``routed`` and ``spend`` partials; ``--meta``: the
store's ``<root>.bench-meta.json``, for its first day and its number of days):

- **who-routed-what**, the largest tenant, the store's last 30 days: whole UTC days (the window the
  evidence benchmark measures), then with partial first and last days (13:07 after the first
  midnight to 19:00 on the last day), which the report counts from the sealed routed rows of those
  two days (the join per decision, time-sorted, that compaction writes beside the partials);
- **spend**, every tenant: the whole store, then the same partial-day window.

Each case runs ``--repeat`` times cold (a fresh ``EvidenceStore`` each, the OS page cache warm),
interleaved with the report as it was (every view made when the store opens, then the full query:
``full_who_routed_what``, ``full_spend``); both answers are compared. Also timed: the partials'
queries over the whole store, what ``evidence compact`` adds to write them (the routed rows: their
query over the whole store, read to the end, not written; the routed keys' sorted rows likewise).
With routed keys sealed, who-routed-what also runs with the tail's covered rows found by scanning
the tables (``scan``: the code before the keys). CPU is this process's
(DuckDB's threads included), stable on a shared machine where wall times are not.
Results: ``bench/results/evidence-reports[-LABEL].{json,md}``. ``python -m bench._evidence.append_tail
STORE N`` appends a tail to a copy of a store (one flush: late outcomes of covered decisions, new
decisions), for the case of files flushed since the compaction.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa

from bench._harness import git_commit, loadavg, run_main, table
from nexuscore.policy import default_policy
from nexuscore.projections import EvidenceStore, _keyed, _manifest, _rollups, committed_files

T = TypeVar("T")


def _timed(call: Callable[[], T]) -> tuple[float, float, T]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = call()
    return time.perf_counter() - w0, time.process_time() - c0, out


def _now(root: Path, report: str, args: dict[str, Any]) -> pa.Table:
    with EvidenceStore(root) as store:
        return store.who_routed_what(**args) if report == "who-routed-what" else store.spend(**args)


def _before(root: Path, report: str, args: dict[str, Any]) -> pa.Table:
    with EvidenceStore(root) as store:
        store.con  # noqa: B018  # every view, as the store opened before
        if report == "who-routed-what":
            return store.full_who_routed_what(**args)
        return store.full_spend(**args)


def _scanned(root: Path, report: str, args: dict[str, Any]) -> pa.Table:
    """The report as ``_now``, the tail's covered rows found by scanning the tables (as before the
    routed keys): no key set is small enough for lookups."""
    kept = _keyed.MAX_KEYS
    _keyed.MAX_KEYS = -1
    try:
        return _now(root, report, args)
    finally:
        _keyed.MAX_KEYS = kept


def _case(root: Path, report: str, label: str, args: dict[str, Any], repeat: int) -> dict[str, Any]:
    print(f"[reports] {report}, {label} x{repeat}", flush=True)
    runs: dict[str, list[tuple[float, float]]] = {"now": [], "before": []}
    calls = [("now", _now), ("before", _before)]
    if report == "who-routed-what" and _keyed.trusted(root, _manifest.signed_entries(root)):
        calls.append(("scan", _scanned))
        runs["scan"] = []
    answers: dict[str, pa.Table] = {}
    for _ in range(repeat):
        for kind, call in calls:
            wall, cpu, answers[kind] = _timed(functools.partial(call, root, report, args))
            runs[kind].append((wall, cpu))
    same = all(a.to_pylist() == answers["before"].to_pylist() for a in answers.values())
    out: dict[str, Any] = {"report": report, "window": label, "rows": answers["now"].num_rows, "same": same}
    for kind, xs in runs.items():
        out[kind] = {
            "wall_s": round(statistics.median(x[0] for x in xs), 3),
            "cpu_s": round(statistics.median(x[1] for x in xs), 3),
            "runs": [[round(w, 3), round(c, 3)] for w, c in xs],
        }
    print(
        f"    now {out['now']['cpu_s']} s CPU, before {out['before']['cpu_s']} s CPU; same: {same}",
        flush=True,
    )
    return out


def _sealing(root: Path) -> dict[str, Any]:
    """What writing the partials costs ``evidence compact``: their queries over the whole store."""
    out = {}
    for rollup in _rollups.ROLLUPS:
        with EvidenceStore(root) as store:
            wall, cpu, counts = _timed(functools.partial(store.query, rollup.sql))
        out[rollup.name] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows": counts.num_rows}
    with EvidenceStore(root) as store:
        batches = store.batches(_rollups.ROUTED_ROWS_SQL, 65_536, views=_rollups.ROUTED.tables)
        wall, cpu, rows = _timed(lambda: sum(b.num_rows for b in batches))
    out[_rollups.ROUTED_ROWS] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows": rows}
    for k in _keyed.KEYED:  # (the sorted rows read to the end; not written)
        with EvidenceStore(root) as store:
            batches = store.batches(_keyed.rows_sql(k), 65_536, views=(k.table,))
            wall, cpu, rows = _timed(lambda: sum(b.num_rows for b in batches))  # noqa: B023
        out[f"{_keyed.FIELD}.{k.table}"] = {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "rows": rows}
    return out


def _covers(root: Path) -> dict[str, Any]:
    """Per rollup: sealed and intact, and how many of its tables' files it does not cover (the tail)."""
    entries, files = _manifest.signed_entries(root), committed_files(root)
    out = {}
    for rollup in _rollups.ROLLUPS:
        partials = _rollups.current_partials(entries, rollup)
        read = _rollups.read_partials(root, partials, rollup) if partials else None
        live = _rollups.covered_paths(files, rollup)
        out[rollup.name] = {
            "sealed": read is not None,
            "tail_files": None if read is None else len(set(live) - set(read.covered)),
        }
    by_day = _rollups.current_rows(entries)
    out[_rollups.ROUTED_ROWS] = {"sealed": _rollups.rows_trusted(root, entries), "days": len(by_day or {})}
    out[_keyed.FIELD] = {"sealed": _keyed.trusted(root, entries)}
    return out


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--meta", type=Path, help="the store's bench-meta.json (default: <root>.bench-meta.json)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--label", default="", help="results to evidence-reports-LABEL.{json,md}")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict[str, Any]:
    meta = json.loads((a.meta or Path(f"{a.root}.bench-meta.json")).read_text())["generation"]
    start = datetime.fromisoformat(meta["start"]).astimezone(UTC)
    until = start + timedelta(days=meta["days"])
    since = until - timedelta(days=30)
    partial = (since + timedelta(hours=13, minutes=7), until - timedelta(hours=5))
    tenant = default_policy().tenants[0].id
    started = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "load": loadavg()}
    cases = [
        _case(a.root, "who-routed-what", "30 whole days", {"tenant": tenant, "since": since, "until": until}, a.repeat),
        _case(a.root, "who-routed-what", "30 days, partial ends", {"tenant": tenant, "since": partial[0], "until": partial[1]}, a.repeat),
        _case(a.root, "spend", "whole store", {}, a.repeat),
        _case(a.root, "spend", "30 days, partial ends", {"since": partial[0], "until": partial[1]}, a.repeat),
    ]  # fmt: skip
    return {
        "label": a.label,
        "root": str(a.root),
        "commit": git_commit(),
        "started": started,
        "ended": {"at": datetime.now(UTC).isoformat(timespec="seconds"), "load": loadavg()},
        "tenant": tenant,
        "window": [since.isoformat(), until.isoformat()],
        "partial_window": [partial[0].isoformat(), partial[1].isoformat()],
        "partials": _covers(a.root),
        "cases": cases,
        "sealing": _sealing(a.root),
    }


def render(r: dict[str, Any]) -> str:
    rows = [
        (
            c["report"],
            c["window"],
            f"**{c['now']['cpu_s']:.3f}** / {c['now']['wall_s']:.3f}",
            f"{c['scan']['cpu_s']:.3f} / {c['scan']['wall_s']:.3f}" if "scan" in c else "–",
            f"{c['before']['cpu_s']:.3f} / {c['before']['wall_s']:.3f}",
            f"{c['now']['cpu_s'] / c['before']['cpu_s']:.3f}",
            c["rows"],
            "yes" if c["same"] else "**no**",
        )
        for c in r["cases"]
    ]
    sealing = ", ".join(f"{k} {v['cpu_s']} s CPU ({v['rows']:,} rows)" for k, v in r["sealing"].items())
    return "\n".join(
        [
            "# who-routed-what and spend from sealed partials",
            "",
            f"`python -m bench.evidence_reports --root {r['root']}{' --label ' + r['label'] if r.get('label') else ''}` at {r['started']['at']}, commit "
            f"`{r['commit']}`; load {r['started']['load']} at start, {r['ended']['load']} at end (2 shared "
            f"cores). Tenant {r['tenant']}; 30 days {r['window'][0]} to {r['window'][1]}; partial ends "
            f"{r['partial_window'][0]} to {r['partial_window'][1]}. Partials: {r['partials']}.",
            "",
            "Cold (a fresh store per run), medians; CPU of the process, DuckDB's threads included. "
            "Before = every view made when the store opens, then the full query (the report as it was), "
            "same run, interleaved. Tables scanned = the report as now, but the tail's covered rows found by "
            "semi joins over the covered tables, not by the routed keys (their code before them).",
            "",
            *table(
                [
                    "report",
                    "window",
                    "now: CPU / wall s",
                    "tables scanned: CPU / wall s",
                    "before: CPU / wall s",
                    "CPU ratio",
                    "rows",
                    "same answer",
                ],
                rows,
            ),
            "",
            f"Writing the partials at compaction (their queries over the whole store): {sealing}.",
            "",
        ]
    )


def summary(r: dict[str, Any]) -> None:
    for c in r["cases"]:
        print(
            f"{c['report']:16} {c['window']:24} now {c['now']} before {c['before']['cpu_s']} same {c['same']}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    a = _args(argv)
    name = f"evidence-reports-{a.label}" if a.label else "evidence-reports"
    return run_main(name, lambda: run(a), render, summary)


if __name__ == "__main__":
    raise SystemExit(main())
