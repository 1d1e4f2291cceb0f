"""The evidence benchmark's results as markdown (``bench/results/evidence.md``) and on the console."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from bench._evidence.common import (
    TARGET_DEEP_EPS,
    TARGET_LINEAGE_S,
    TARGET_PROJECTOR_EPS,
    TARGET_RESIDENCY_S,
    TARGET_RESIDENCY_SMALL_S,
    TARGET_RSS_MB,
    TARGET_VERIFY_EPS,
    TARGET_WHO_S,
)
from bench._harness import fmt, loadavg, met, table
from bench._profile import profile_lines

Row = tuple[str, str, str, str, str, str]  # metric, target, measured, baseline, ratio, met


def machine() -> dict[str, Any]:
    mem = 0
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "ram_gb": round(mem / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyarrow": pa.__version__,
        "duckdb": duckdb.__version__,
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
    }


# --- the headline ----------------------------------------------------------------------------------


def _projector_rows(p: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    return [
        (
            "Projector throughput, events/s (real broker, from offset 0)",
            f"≥ {TARGET_PROJECTOR_EPS:,.0f}",
            fmt(p["events_per_s"]),
            f"{b['messages_per_s']:,} msgs/s (plain aiokafka consumer)",
            f"{p['ratio_to_baseline']:.3f}",
            met(p["events_per_s"] >= TARGET_PROJECTOR_EPS),
        ),
        (
            "Projector peak RSS, MB",
            f"< {TARGET_RSS_MB:.0f} (pipeline target)",
            fmt(p["peak_rss_mb"]),
            f"{b['peak_rss_mb']:.0f} MB (baseline consumer)",
            f"{p['peak_rss_mb'] / b['peak_rss_mb']:.1f}",
            met(p["peak_rss_mb"] < TARGET_RSS_MB),
        ),
    ]


def _query_rows(q: dict[str, Any], when: str = "compacted") -> list[Row]:
    rows: list[Row] = []
    for key, label, target, spec in (
        ("who_routed_what", "who_routed_what, 1 tenant, 30 days, cold (s)", TARGET_WHO_S, ".3f"),
        ("lineage", "lineage of 1 request, cold (ms)", TARGET_LINEAGE_S, ".0f"),
        ("spend", "spend by day, all tenants, cold (s)", None, ".3f"),
        ("residency", "evidence residency (summary), cold (s)", TARGET_RESIDENCY_S, ".3f"),
    ):
        x = q.get(key)
        if not x:
            continue
        scale = 1000 if key == "lineage" else 1
        measured = x["total_s"]["median_s"]
        source = "per-call audit" if key == "residency" else "pyarrow.dataset"
        rows.append(
            (
                f"{label}, {when}",
                "—" if target is None else f"< {target * scale:g}",
                format(measured * scale, spec),
                f"{format(x['baseline_s']['median_s'] * scale, spec)} ({source})",
                f"{x['ratio_to_baseline']:.3f}",
                "n/a" if target is None else met(measured < target),
            )
        )
    if q.get("open"):
        opened = format(q["open"]["median_s"] * 1000, ".0f")
        rows.append(("EvidenceStore(root) open alone, cold (ms)", "—", opened, "", "", "n/a"))
    return rows


def _verify_rows(v: dict[str, Any], when: str = "") -> list[Row]:
    floor = v["floor"]
    deep = v.get("mode") == "deep"
    target = TARGET_DEEP_EPS if deep else TARGET_VERIFY_EPS
    return [
        (
            f"verify{' --deep' if deep else ''}, events/s (whole store{when})",
            f"≥ {target:,.0f}",
            fmt(v["events_per_s"]),
            f"{floor['events_per_s_all_cores']:,} (sha256 of all bytes, {floor['threads']} threads)",
            f"{v['ratio_to_floor']:.4f}",
            met(v["events_per_s"] >= target),
        ),
        (
            f"verify{' --deep' if deep else ''} ok, findings{when}",
            "ok, none",
            f"{v['ok']}, {len(v['findings'])}",
            "",
            "",
            met(v["ok"] and not v["findings"]),
        ),
    ]


def headline(r: dict[str, Any]) -> list[Row]:
    """(metric, target, measured, baseline, ratio, met) rows for the console and the markdown."""
    k = r.get("kafka") or {}
    p, b = k.get("projector"), k.get("baseline")
    rows = _projector_rows(p, b) if p and b else []
    if r.get("verify_before_compaction"):
        rows += _verify_rows(r["verify_before_compaction"], ", as generated")
    rows += _query_rows(r.get("queries_before_compaction") or {}, "small files")
    rows += _compaction_rows(r.get("compaction") or {})
    rows += _query_rows(r.get("queries") or {})
    for key in ("verify", "verify_deep"):
        if r.get(key):
            rows += _verify_rows(r[key], ", compacted")
    rows += _small_store_rows(r.get("small_store") or {})
    return rows


def _compaction_rows(c: dict[str, Any]) -> list[Row]:
    if not c:
        return []
    files = f"{c['files_before']:,} -> {c['files_after']:,} files"
    return [
        (f"compaction: rows/s ({files})", "—", fmt(c["rows_per_s"]), "", "", "n/a"),
        (
            "compaction keeps every row (count per table)",
            "yes",
            str(c["rows_kept"]),
            "",
            "",
            met(c["rows_kept"]),
        ),
    ]


def _small_store_rows(s: dict[str, Any]) -> list[Row]:
    if not s:
        return []
    label = f"evidence residency, {s['events']:,}-event store, CLI end to end (s)"
    base = s["baseline_residency_calls_small_files"]["wall_s"]
    rows: list[Row] = []
    for key, when in (
        ("residency_summary_small_files", f"{s['files']} files"),
        ("residency_summary_compacted", "compacted"),
    ):
        wall = s[key]["wall_s"]
        rows.append(
            (
                f"{label}, {when}",
                f"< {TARGET_RESIDENCY_SMALL_S:g}",
                f"{wall:.3f}",
                f"{base:.3f} (--calls: every call, {s['files']} files)",
                f"{wall / base:.3f}",
                met(wall < TARGET_RESIDENCY_SMALL_S),
            )
        )
    return rows


# --- the sections ----------------------------------------------------------------------------------


def _timed_calls(calls: dict[str, dict[str, Any]], spec: str = "") -> list[str]:
    return table(
        ("Call", "Seconds", "Calls"), ((n, format(v["s"], spec), f"{v['calls']:,}") for n, v in calls.items())
    )


def _offline_lines(o: dict[str, Any]) -> list[str]:
    return [
        f"The projector's own processing without the broker (records read into memory first, then "
        f"`Projector.add`/`flush` as `_loop` calls them, a flush every {o['flush_rows']:,} events): "
        f"{o['events']:,} events in {o['seconds']} s = **{o['events_per_s']:,} events/s** "
        f"({o['us_per_event']} µs per event). Where that time goes (wall, summed; wrappers add ~0.3 µs per call):",
        "",
        *table(
            ("Step", "Seconds", "Calls", "µs per event"),
            (
                (name, v["s"], f"{v['calls']:,}", f"{v['s'] / o['events'] * 1e6:.1f}")
                for name, v in o["timed_calls"].items()
            ),
        ),
        "",
    ]


def _baseline_projector_rows(o: dict[str, Any] | None) -> list[tuple[Any, ...]]:
    if not o:
        return []
    return [
        (
            f"Projector of `{o['commit']}` (before; same log, run first)",
            *(f"{o['events_in_log']:,}", o["seconds"], f"{o['events_per_s']:,}"),
            *(f"{o['events_per_s_from_first_event']:,}/s", o["cpu_s"], f"{o['peak_rss_mb']:.0f}"),
        )
    ]


def _baseline_projector_line(o: dict[str, Any] | None) -> list[str]:
    if not o:
        return []
    return [
        f"Projector of `{o['commit']}` (before): {o['cpu_us_per_event']} µs CPU per event; files written: "
        f"{o['files']}; broker CPU during it: {o.get('broker_cpu_s')} s."
    ]


def _kafka_lines(k: dict[str, Any]) -> list[str]:
    p, b, pf, verified = k["projector"], k["baseline"], k["prefill"], k["projector_verify"]
    broker = k["broker"]
    lines = [
        "",
        "## 1. Projector on Kafka",
        "",
        f"Broker {broker['bootstrap']} (Kafka {broker['kafka_version']}"
        f"{', external' if broker['external'] else ''}), same 2 cores. Log: {pf['events']:,} events "
        f"({pf['mb']} MB, {pf['bytes_per_event']} B/event) of `tests.factories.run_history`: "
        + ", ".join(f"{t} {n:,}" for t, n in pf["per_type"].items())
        + f"; published at {pf['produced_per_s']:,}/s.",
        "",
        *table(
            ("", "events", "seconds", "events/s", "from first event", "CPU s", "peak RSS MB"),
            [
                (
                    *(
                        "plain aiokafka consumer",
                        f"{b['messages']:,}",
                        b["seconds"],
                        f"{b['messages_per_s']:,}",
                    ),
                    *(f"{b['messages_per_s_from_first_message']:,}/s", b["cpu_s"], f"{b['peak_rss_mb']:.0f}"),
                ),
                *_baseline_projector_rows(k.get("projector_baseline")),
                (
                    f"Projector (flush_rows {p['flush_rows']:,}, interval {p['flush_interval_s']:g} s)",
                    *(f"{p['events_in_log']:,}", p["seconds"], f"{p['events_per_s']:,}"),
                    *(f"{p['events_per_s_from_first_event']:,}/s", p["cpu_s"], f"{p['peak_rss_mb']:.0f}"),
                ),
            ],
        ),
        "",
        f"Projector CPU per event: {p['cpu_us_per_event']} µs; files written: {p['files']}; broker CPU during "
        f"the projection: {p.get('broker_cpu_s')} s. The projection verifies: ok={verified['ok']}, "
        f"{verified['rows']:,} rows.",
        *_baseline_projector_line(k.get("projector_baseline")),
        "",
        "Time inside the projector's flushes (wall, summed over calls):",
        "",
        *_timed_calls(p["timed_calls"]),
        "",
    ]
    if k.get("projector_offline"):
        lines += _offline_lines(k["projector_offline"])
    prof = k.get("profile") or {}
    if prof.get("top_own"):
        title = (
            f"py-spy profile of the projector process ({prof['samples']} samples), top functions by own time:"
        )
        lines += profile_lines(prof, title)
    return lines


def _store_lines(s: dict[str, Any]) -> list[str]:
    made = "reused, generated " + s["generated_at"] if s.get("reused") else "generated in this run"
    file_rows, enc = s["file_rows"], s["encryption"]
    filled = (
        "Columns of the current schemas the generator does not model, written as: "
        + ", ".join(f"`{c}` = {v}" for c, v in s["columns_filled"].items())
        + ". "
        if s.get("columns_filled")
        else ""
    )
    return [
        "## 2. The store",
        "",
        f"{s['decisions']:,} decisions ({made}): "
        f"{s['rows_total']:,} rows in {s['files']} files, {s['flushes']} flushes (checkpoints), "
        f"{s['store_gb']} GB on disk ({s['parquet_gb']} GB Parquet), {s['days']} days from {s['start'][:10]}, "
        "tenants " + ", ".join(f"{t} {w:.0%}" for t, w in s["tenant_shares"].items()) + ".",
        "",
        *table(("Table", "Rows"), ((t, f"{n:,}") for t, n in s["rows"].items())),
        "",
        f"Generation: {s['seconds']:,} s wall ({s['seconds'] / 60:.1f} min), peak RSS of the writer "
        f"{s['peak_rss_mb_writer']:.0f} MB; sealing and writing {s['seal_and_write_s']:,} s, waiting for "
        f"encryption {s['wait_for_encryption_s']} s. Encryption: {enc['fields']:,} fields with "
        f"`FieldCipher.encrypt`, {enc['us_per_field']} µs each, {enc['seconds_in_worker']:,} s "
        "in one worker process overlapping the sealing.",
        "",
        "Time inside the production sealing code (main process):",
        "",
        *_timed_calls(s["timed_calls"], ","),
        "",
        f"Rows per file: min {file_rows.get('min', 0):,}, median {file_rows.get('median', 0):,}, "
        f"max {file_rows.get('max', 0):,}. "
        + filled
        + "Budgets are not enforced by the generator: at this volume (about "
        f"{s['decisions'] / s['days']:,.0f} decisions a day) the default policy's daily budgets would deny most "
        "requests, so committed and spent amounts exceed the budgets; the verdict mix is fixed instead.",
        "",
    ]


def _breakdown_lines(bd: dict[str, Any]) -> list[str]:
    return [
        f"One more cold lineage call: {bd['total_s']} s in {bd['statements']} statement(s) "
        f"({', '.join(f'{x:.3f}' for x in bd['statement_s'])} s). The same lookup per table, each on "
        "a fresh store, reading only `event_id` (bloom filters, then the matching row group's "
        "request_id column) and reading every column (the whole matching row group):",
        "",
        *table(
            ("Table", "event_id only, ms", "all columns, ms"),
            (
                (t, f"{x['event_id_only_s'] * 1000:.0f}", f"{x['all_columns_s'] * 1000:.0f}")
                for t, x in bd["per_table_lookup"].items()
            ),
        ),
        "",
    ]


def _query_lines(q: dict[str, Any], title: str = "## Queries") -> list[str]:
    rows = [
        (
            *(key, x["total_s"]["median_s"], x["total_s"]["min_s"], x["total_s"]["max_s"]),
            *(x["open_s"]["median_s"], x["baseline_s"]["median_s"], x["answers_match"]),
        )
        for key in ("who_routed_what", "lineage", "spend", "residency")
        if (x := q.get(key))
    ]
    header = ("Query", "median s", "min", "max", "open s (median)", "baseline median s", "answers match")
    lines = [
        *(title, "", f"{q['cache']}; {q['repeat']} runs each, median.", ""),
        *table(header, rows),
        "",
        f"Store open alone: median {q['open']['median_s']} s over {q['files_committed']} committed files.",
        "",
    ]
    bd = q.get("lineage", {}).get("breakdown")
    return lines + _breakdown_lines(bd) if bd else lines


def _verify_lines(v: dict[str, Any], title: str = "## verify") -> list[str]:
    floor = v["floor"]
    return [
        title,
        "",
        f"Mode: {v.get('mode', 'default')}; CPU per event {v.get('cpu_us_per_event', '-')} µs "
        "(this process and the worker processes).",
        "",
        f"ok={v['ok']}, {len(v['findings'])} findings; {v['rows']:,} rows, {v['files']} files, {v['entries']} "
        f"manifest entries, {v['requests']:,} requests in {v['seconds']} s = {v['events_per_s']:,} events/s. "
        f"I/O floor: {floor['gb']} GB hashed in {floor['seconds_all_cores']} s with "
        f"{floor['threads']} threads ({floor['seconds_one_thread']} s with one). CPU: main process "
        f"{v['cpu_s_main_process']} s, worker processes {v['cpu_s_worker_processes']} s; load average "
        f"(1 min) before/after {v['loadavg_1min_before_after']}.",
        "",
        *table(
            ("Phase", "Seconds", "Calls"), ((n, x["s"], f"{x['calls']:,}") for n, x in v["phases"].items())
        ),
        "",
        *(f"- finding `{f['kind']}` {f['where']}: {f['detail']}" for f in v["findings"]),
    ]


def _clean_lines(r: dict[str, Any]) -> list[str]:
    """Whether every store measured here verified clean: a benchmark of a broken store measures
    nothing worth quoting."""
    checks = [
        (name, v["ok"] and not v["findings"])
        for name, v in (
            ("the store as generated", r.get("verify_before_compaction")),
            ("the compacted store", r.get("verify")),
            ("the compacted store, --deep", r.get("verify_deep")),
        )
        if v
    ]
    small = r.get("small_store")
    if small:
        checks += [
            ("the small store", small["verified_clean"]),
            ("the small store, compacted", small["verified_clean_after_compaction"]),
        ]
    if not checks:
        return []
    clean = all(ok for _, ok in checks)
    said = "; ".join(f"{name}: {'clean' if ok else 'NOT CLEAN'}" for name, ok in checks)
    verdict = (
        "Every store measured verified clean (ok, no findings)"
        if clean
        else "**A store did not verify clean**"
    )
    return [f"{verdict}: {said}.", ""]


def _compaction_lines(c: dict[str, Any]) -> list[str]:
    rows = (
        (t, f"{n:,}", f"{c['rows_per_table_after'].get(t, 0):,}")
        for t, n in c["rows_per_table_before"].items()
    )
    return [
        "## 5. Compaction (`evidence compact`)",
        "",
        f"{c['replaced']:,} files merged into {c['written']:,} ({c['rows_rewritten']:,} rows) in {c['seconds']} s "
        f"= {c['rows_per_s']:,} rows/s; {c['files_before']:,} files before, {c['files_after']:,} after "
        f"(rows per file now {c.get('file_rows_after')}). CPU {c['cpu_s']} s in this process and reaped "
        f"children ({c['cpu_us_per_row']} µs per row; the forkserver workers' CPU is not included). "
        f"Every table's row count is the same before and after: {c['rows_kept']}."
        + (" The store was compacted already (a reused store)." if c.get("already_compact") else ""),
        "",
        *table(("Table", "Rows before", "Rows after"), rows),
        "",
    ]


def _small_store_lines(s: dict[str, Any]) -> list[str]:
    rows = [
        (label, s[key]["wall_s"], s[key]["cpu_s"])
        for key, label in (
            ("residency_summary_small_files", f"evidence residency, {s['files']} files"),
            ("residency_summary_compacted", f"evidence residency, compacted ({s['files_compacted']} files)"),
            (
                "baseline_residency_calls_small_files",
                f"evidence residency --calls (every call), {s['files']} files",
            ),
        )
    ]
    return [
        "## 9. Residency on a small store of many small files",
        "",
        f"{s['events']:,} events projected with the production projector code, a flush every 500 events: "
        f"{s['files']} files. Verified clean: {s['verified_clean']} (after compaction: "
        f"{s['verified_clean_after_compaction']}). The CLI end to end (start-up included), median of {s['repeat']}:",
        "",
        *table(("Command", "wall s", "CPU s"), rows),
        "",
    ]


def render_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Evidence-plane benchmark",
        "",
        f"`{r['command']}` at {r['timestamp_utc']}, commit `{r['git_commit']}`; {m['cores']} cores ({m['cpu']}), "
        f"{m['ram_gb']} GiB RAM, Python {m['python']}, pyarrow {m['pyarrow']}, DuckDB {m['duckdb']}. "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')} (the machine is shared: "
        "other work running at the same time shows as noise in wall times).",
        "",
        "Ratio = measured / baseline (for times, < 1 means faster than the baseline).",
        "",
        *table(("Metric", "Target", "Measured", "Baseline", "Ratio", "Met"), headline(r)),
        "",
    ]
    lines += _clean_lines(r)
    for section in ("kafka", "store", "queries", "verify", "compaction", "small_store"):
        if r.get(section, {}).get("carried_over_from"):
            lines.append(
                f"The `{section}` figures are carried over from the run of {r[section]['carried_over_from']}."
            )
    if r.get("kafka", {}).get("projector"):
        lines += _kafka_lines(r["kafka"])
    if r.get("store"):
        lines += _store_lines(r["store"])
    for key, title in (
        ("verify_before_compaction", "## 3. verify of the store as generated (default mode)"),
        ("queries_before_compaction", "## 4. Queries on the store as generated (small files)"),
    ):
        if r.get(key):
            lines += (_verify_lines if key.startswith("verify") else _query_lines)(r[key], title)
    if r.get("compaction"):
        lines += _compaction_lines(r["compaction"])
    for key, title in (
        ("queries", "## 6. Queries on the compacted store"),
        ("verify", "## 7. verify of the compacted store (default mode)"),
        ("verify_deep", "## 8. verify --deep of the compacted store"),
    ):
        if r.get(key):
            lines += (_verify_lines if key.startswith("verify") else _query_lines)(r[key], title)
    if r.get("small_store"):
        lines += _small_store_lines(r["small_store"])
    lines += ["", "All figures: `bench/results/evidence.json`.", ""]
    return "\n".join(lines)


def print_summary(r: dict[str, Any]) -> None:
    print("\n=== NexusCore evidence-plane benchmark ===")
    print(f"  {'metric':<62} {'measured':>12}  {'target':<24} {'ratio':>7}  met   baseline")
    for metric, target, measured, baseline, ratio, ok in headline(r):
        print(f"  {metric:<62} {measured:>12}  {target:<24} {ratio:>7}  {ok.strip('*'):<5} {baseline}")
    s = r.get("store")
    if s:
        print(
            f"  store: {s['decisions']:,} decisions, {s['rows_total']:,} rows, {s['files']} files, {s['store_gb']} GB; "
            f"generated in {s['seconds']:,} s{' (reused)' if s.get('reused') else ''}"
        )
