"""What a cold lineage through the request index costs at a scale this machine holds no store of.

``python -m bench.index_scale --store STORE --work DIR [--decisions 10000000]``:

- a synthetic request index of ``--decisions`` requests with six events each (random 32-hex-digit
  request ids, sorted, four tenants, written as ``projections._index`` writes one: same schema,
  row groups and statistics), then ``--repeat`` cold lookups of ids it holds (footer, bisection of
  the row groups' statistics, one row group): the index's share of a lineage;
- for each of the six tables a request's rows are in, a 1,000,000-row compacted file (the rows of
  ``STORE``'s file repeated, written as ``evidence compact`` writes it: 4,096-row groups), then a
  cold open (footer) and one row group read: the data's share.

Files already in ``DIR`` are reused (``--fresh`` rewrites them). Results go to
``bench/results/index-scale.{md,json}``; CPU times are this process's.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bench._harness import RESULTS_DIR, git_commit, loadavg
from nexuscore.projections import _compact, _index, committed_files

TABLES = ("requests", "decisions", "dispatches", "attempts", "outcomes", "settlements")
TENANTS = ("acme-bank", "globex-insurance", "initech-payments", "umbrella-credit")
EVENTS_PER_REQUEST = 6
CHUNK = 250_000


def write_synthetic_index(path: Path, decisions: int) -> list[str]:
    """The index of ``decisions`` requests; returns one request id per chunk (to look up)."""
    rnd = random.Random(1)
    files = [f"region=eu/decisions/compact-{i:012d}-00000-000-t-p0.parquet" for i in range(400)]
    schema = _index.SCHEMA.with_metadata({_index.FILES_KEY: json.dumps(files).encode()})
    step = 2**128 // decisions
    sample = []
    with pq.ParquetWriter(
        path, schema, compression="zstd", write_statistics=["request_id"], use_dictionary=["tenant_id"]
    ) as writer:
        for start in range(0, decisions, CHUNK):
            ids = [
                f"{i * step + rnd.randrange(step):032x}" for i in range(start, min(decisions, start + CHUNK))
            ]
            sample.append(ids[len(ids) // 2])
            rows = [x for x in ids for _ in range(EVENTS_PER_REQUEST)]
            table = pa.table(
                {
                    "request_id": rows,
                    "tenant_id": [TENANTS[rnd.randrange(4)] for _ in rows],
                    "file": pa.array([rnd.randrange(400) for _ in rows], pa.int32()),
                    "row": pa.array([rnd.randrange(1_000_000) for _ in rows], pa.int32()),
                },
                schema=schema,
            )
            for piece in _index.rechunk(iter(table.to_batches()), _index.ROW_GROUP):
                writer.write_table(piece, row_group_size=_index.ROW_GROUP)
    return sample


def _cpu_ms(xs: list[float]) -> dict[str, float]:
    return {"cpu_median_ms": round(statistics.median(xs) * 1000, 1), "cpu_min_ms": round(min(xs) * 1000, 1)}


def measure_index(path: Path, sample: list[str], repeat: int) -> dict[str, Any]:
    cpus, found = [], set()
    for request_id in (sample * repeat)[:repeat]:
        c0 = time.process_time()
        rows = _index._rows_of(pq.ParquetFile(path), request_id)
        cpus.append(time.process_time() - c0)
        found.add(len(rows))
    metadata = pq.read_metadata(path)
    return {
        "rows": metadata.num_rows,
        "row_groups": metadata.num_row_groups,
        "footer_kb": round(metadata.serialized_size / 1e3),
        "mb": round(path.stat().st_size / 1e6),
        "rows_found_per_request": sorted(found),
        **_cpu_ms(cpus),
    }


def measure_files(store: Path, work: Path, repeat: int, *, fresh: bool) -> dict[str, Any]:
    out = {}
    for table in TABLES:
        source = next(store / e["path"] for e in committed_files(store) if e["table"] == table)
        path = work / f"{table}-1m.parquet"
        if fresh or not path.exists():
            rows = pq.read_table(source)
            _compact._write(
                path, pa.concat_tables([rows] * -(-1_000_000 // rows.num_rows)).slice(0, 1_000_000)
            )
        metadata = pq.read_metadata(path)
        groups = random.Random(2).sample(range(metadata.num_row_groups), min(repeat, metadata.num_row_groups))
        opens, reads = [], []
        for g in groups:
            c0 = time.process_time()
            parquet = pq.ParquetFile(path)
            c1 = time.process_time()
            parquet.read_row_group(g)
            opens.append(c1 - c0)
            reads.append(time.process_time() - c0)
        out[table] = {
            "row_groups": metadata.num_row_groups,
            "footer_kb": round(metadata.serialized_size / 1e3),
            "open_cpu_median_ms": round(statistics.median(opens) * 1000, 1),
            "open_and_group_cpu_median_ms": round(statistics.median(reads) * 1000, 1),
        }
    return out


def render(results: dict[str, Any]) -> str:
    ix, files = results["index"], results["files"]
    data = sum(f["open_and_group_cpu_median_ms"] for f in files.values())
    lines = [
        f"# A cold lineage through the request index at {results['decisions']:,} decisions ({results['timestamp_utc']})",
        "",
        f"`{results['command']}` at {results['git_commit']}; load average {results['loadavg_start']} at start, "
        f"{results['loadavg_end']} at end (2 cores, shared). CPU times of this process, medians of {results['repeat']}.",
        "",
        f"Index: {ix['rows']:,} rows, {ix['mb']} MB, {ix['row_groups']:,} row groups, footer {ix['footer_kb']} KB; "
        f"a lookup (footer, bisection, one row group): **{ix['cpu_median_ms']} ms** CPU "
        f"(rows found per request: {ix['rows_found_per_request']}).",
        "",
        "| table (1,000,000-row compacted file) | row groups | footer | open (footer) | open + one row group |",
        "|---|---|---|---|---|",
    ]
    for table, f in files.items():
        lines.append(
            f"| {table} | {f['row_groups']} | {f['footer_kb']} KB | {f['open_cpu_median_ms']} ms | "
            f"{f['open_and_group_cpu_median_ms']} ms |"
        )
    lines += [
        "",
        f"Index plus the six files: about {round(ix['cpu_median_ms'] + data)} ms of CPU, before the manifest and "
        "the rows' rendering.",
        "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.index_scale", description=__doc__)
    parser.add_argument(
        "--store", type=Path, required=True, help="a compacted store (its rows fill the files)"
    )
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--decisions", type=int, default=10_000_000)
    parser.add_argument("--repeat", type=int, default=25)
    parser.add_argument("--fresh", action="store_true")
    ns = parser.parse_args(argv)
    if ns.decisions < 1 or ns.repeat < 1:
        parser.error("--decisions and --repeat >= 1")
    ns.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "benchmark": "index_scale",
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.index_scale", *(argv or sys.argv[1:])]),
        "git_commit": git_commit(),
        "decisions": ns.decisions,
        "repeat": ns.repeat,
        "loadavg_start": loadavg(),
    }
    index = ns.work / f"index-{ns.decisions}.parquet"
    samples = ns.work / f"index-{ns.decisions}.sample.json"
    if ns.fresh or not (index.exists() and samples.exists()):
        samples.write_text(json.dumps(write_synthetic_index(index, ns.decisions)))
    results["index"] = measure_index(index, json.loads(samples.read_text()), ns.repeat)
    results["files"] = measure_files(ns.store, ns.work, ns.repeat, fresh=ns.fresh)
    results["loadavg_end"] = loadavg()
    (RESULTS_DIR / "index-scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS_DIR / "index-scale.md").write_text(render(results))
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
