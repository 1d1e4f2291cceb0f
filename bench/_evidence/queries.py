"""Phase 3: the store's queries, cold, against the pyarrow baselines of ``query_baselines``.

Cold means a fresh ``EvidenceStore`` (a new DuckDB connection) per measurement, as the CLI opens one
per command; the OS page cache stays warm. Each query runs ``--repeat`` times (lineage: on as many
different requests) and the median is reported; every answer is compared with its baseline's.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench._evidence.common import Params
from bench._evidence.query_baselines import baseline_lineage, baseline_spend, baseline_who_routed_what
from nexuscore.policy import default_policy
from nexuscore.projections import EvidenceStore, committed_files, lineage_at


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _cold(root: Path, call: Callable[[EvidenceStore], Any]) -> tuple[float, float, Any]:
    """(seconds to open a fresh store, seconds of ``call`` on it, its answer)."""
    t0 = time.perf_counter()
    store = EvidenceStore(root)
    t1 = time.perf_counter()
    try:
        out = call(store)
    finally:
        store.close()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, out


def _timed(call: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = call()
    return time.perf_counter() - t0, out


def _stats(xs: list[float]) -> dict[str, Any]:
    return {
        "median_s": round(_median(xs), 4),
        "min_s": round(min(xs), 4),
        "max_s": round(max(xs), 4),
        "runs_s": [round(x, 4) for x in xs],
    }


def _figures(
    totals: list[float], opens: list[float], base_t: list[float], baseline: str, same: bool
) -> dict[str, Any]:
    return {
        "total_s": _stats(totals),
        "open_s": _stats(opens),
        "baseline_s": _stats(base_t),
        "baseline": baseline,
        "answers_match": same,
        "ratio_to_baseline": round(_median(totals) / _median(base_t), 3),
    }


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


def who_routed_what(root: Path, repeat: int, tenant: str, since: datetime, until: datetime) -> dict[str, Any]:
    print(f"[queries] who_routed_what({tenant}, last 30 days) x{repeat}, cold", flush=True)
    totals, opens, base_t = [], [], []
    answer = base_answer = None
    for _ in range(repeat):
        o, q, answer = _cold(root, lambda s: s.who_routed_what(tenant, since, until))
        opens.append(o)
        totals.append(o + q)
    for _ in range(repeat):
        t, base_answer = _timed(lambda: baseline_who_routed_what(root, tenant, since, until))
        base_t.append(t)
    assert answer is not None and base_answer is not None
    same = _same_who(answer, base_answer)
    print(
        f"    {_median(totals):.3f} s (baseline {_median(base_t):.3f} s); answers match: {same}", flush=True
    )
    return {
        "tenant": tenant,
        "since": since.isoformat(),
        "until": until.isoformat(),
        "groups": answer.num_rows,
        "decisions_counted": int(pc.sum(answer["requests"]).as_py()),
        **_figures(
            totals,
            opens,
            base_t,
            "pyarrow.dataset scan (tenant/time filter pushed down) + Table.join + group_by",
            same,
        ),
    }


def lineage(root: Path, repeat: int, samples: list[str], seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    picks = [samples[i] for i in rng.choice(len(samples), size=min(repeat, len(samples)), replace=False)]
    print(f"[queries] lineage of {len(picks)} different requests, cold", flush=True)
    totals, opens, base_t = [], [], []
    matches, events = [], []
    for rid in picks:
        # What ``evidence lineage`` runs: the direct path, no store opened (``open`` is 0 then).
        q, lin = _timed(functools.partial(lineage_at, root, rid))
        opens.append(0.0)
        totals.append(q)
        t, base = _timed(functools.partial(baseline_lineage, root, rid))
        base_t.append(t)
        mine = [(r["event"], r["event_id"], r["detail"]) for r in lin.to_pylist()]
        matches.append(sorted(mine) == sorted((r["event"], r["event_id"], r["detail"]) for r in base))
        events.append(len(mine))
    print(
        f"    {_median(totals) * 1000:.0f} ms (baseline {_median(base_t) * 1000:.0f} ms); match {all(matches)}",
        flush=True,
    )
    baseline = (
        "pyarrow.dataset scan per table with request_id == X (statistics only, no bloom filters) "
        "+ the same decryption and formatting"
    )
    return {
        "requests": picks,
        "events_per_lineage": events,
        **_figures(totals, opens, base_t, baseline, all(matches)),
        # A breakdown of one lineage call: where its time goes.
        "breakdown": _lineage_breakdown(root, picks[0]),
    }


def spend(root: Path, repeat: int) -> dict[str, Any]:
    print(f"[queries] spend() x{repeat}, cold", flush=True)
    totals, opens, base_t = [], [], []
    answer = base_answer = None
    for _ in range(repeat):
        o, q, answer = _cold(root, lambda s: s.spend())
        opens.append(o)
        totals.append(o + q)
    for _ in range(repeat):
        t, base_answer = _timed(lambda: baseline_spend(root))
        base_t.append(t)
    assert answer is not None and base_answer is not None
    same = (
        answer.num_rows == base_answer.num_rows
        and pc.sum(answer["calls"]).as_py() == pc.sum(base_answer["cost_micros_count"]).as_py()
        and abs(pc.sum(answer["cost_usd"]).as_py() - pc.sum(base_answer["cost_micros_sum"]).as_py() / 1e6)
        < 1e-3
    )
    print(f"    {_median(totals):.3f} s (baseline {_median(base_t):.3f} s); match {same}", flush=True)
    baseline = "pyarrow.dataset scans of outcomes, settlements, decisions + group_by + joins"
    return {"rows": answer.num_rows, **_figures(totals, opens, base_t, baseline, same)}


def residency(root: Path, repeat: int) -> dict[str, Any]:
    """``evidence residency``'s answer (the summary), cold; baseline: the per-call audit (one row per
    call from the same DuckDB join, the report as it was) counted in Python."""
    print(f"[queries] residency summary x{repeat}, cold", flush=True)
    totals, opens, base_t = [], [], []
    answer: pa.Table | None = None
    counted: Counter[tuple[Any, ...]] = Counter()
    for _ in range(repeat):
        o, q, answer = _cold(root, lambda s: s.residency_summary())
        opens.append(o)
        totals.append(o + q)
    for _ in range(repeat):
        t0 = time.perf_counter()
        with EvidenceStore(root) as store:
            calls = store.residency()
        counted = Counter(
            zip(
                *(calls.column(c).to_pylist() for c in ("finding", "tenant_id", "event", "region")),
                strict=True,
            )
        )
        base_t.append(time.perf_counter() - t0)
    assert answer is not None
    mine: Counter[tuple[Any, ...]] = Counter()
    for r in answer.to_pylist():
        mine[(r["finding"], r["tenant_id"], r["event"], r["region"])] += r["calls"]
    same = mine == counted
    print(f"    {_median(totals):.3f} s (baseline {_median(base_t):.3f} s); match {same}", flush=True)
    baseline = "the per-call audit (EvidenceStore.residency: one row per call) counted in Python"
    return {
        "rows": answer.num_rows,
        "calls": sum(mine.values()),
        **_figures(totals, opens, base_t, baseline, same),
    }


def run_queries(args: Params, store_info: dict[str, Any]) -> dict[str, Any]:
    root = args.root
    tenant = default_policy().tenants[0].id  # acme-bank: the largest share
    start = datetime.fromisoformat(store_info["start"])
    until = start + timedelta(days=store_info["days"])
    since = until - timedelta(days=30)
    opens = [_timed(lambda: EvidenceStore(root).close())[0] for _ in range(args.repeat)]  # opening alone
    return {
        "repeat": args.repeat,
        "cache": "process-cold (fresh EvidenceStore, i.e. a new DuckDB connection, per run); OS page cache warm",
        "open": _stats(opens),
        "files_committed": len(committed_files(root)),
        "who_routed_what": who_routed_what(root, args.repeat, tenant, since, until),
        "lineage": lineage(root, args.repeat, store_info["sample_requests"], args.seed),
        "spend": spend(root, args.repeat),
        "residency": residency(root, args.repeat),
    }


def _lineage_breakdown(root: Path, request_id: str) -> dict[str, Any]:
    """Where a cold lineage lookup goes: the statements ``lineage`` issues, and per table the same
    lookup reading only ``event_id`` (bloom filters + the request_id column of the matching row group)
    against reading every column (the whole row group: prompts and responses included)."""
    from nexuscore.projections import _lineage

    # The direct path issues one DuckDB statement (it locates the rows) and then reads their row
    # groups with pyarrow: timed whole.
    t0 = time.perf_counter()
    lineage_at(root, request_id)
    total = time.perf_counter() - t0
    per = [total]
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
