"""``verify --deep``'s Merkle phase as it was before it ran on threads (commit 534cfd0): a process per
core (forkserver), each rendering a whole file with DuckDB and prefixing every row with a copy.

Kept here only as the baseline ``bench.evidence_lookup`` measures beside the current path in the same
run. ``check_roots`` stands in for ``_verify_files._check_roots``; the worker processes report their
own CPU (a forkserver's workers are not this process's children: ``getrusage`` misses them).
"""

from __future__ import annotations

import array
import functools
import hashlib
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from nexuscore import ledger
from nexuscore.projections import _seal

WORKER_CPU: dict[int, float] = {}  # worker pid -> its CPU seconds so far (the latest report)


def _leaf_hashes(con: duckdb.DuckDBPyConnection, schema: pa.Schema, source: str) -> list[bytes]:
    column = (
        con.sql(f"SELECT encode({_seal.leaf_sql(schema)}) AS b FROM {source}").to_arrow_table().column("b")
    )  # noqa: S608
    hashes: list[bytes] = []
    for chunk in column.chunks:
        width = "q" if pa.types.is_large_binary(chunk.type) else "i"
        offsets = array.array(width)
        offsets.frombytes(chunk.buffers()[1])
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        data = memoryview(chunk.buffers()[2] or b"")
        sha = hashlib.sha256
        hashes.extend(sha(b"\x00" + data[a:b]).digest() for a, b in zip(offsets, offsets[1:], strict=False))
    return hashes


@functools.cache
def _connection() -> duckdb.DuckDBPyConnection:
    return duckdb.connect(config={"threads": 1})


def _seal_file(path: str, table: str) -> tuple[int, str, int, float]:
    from nexuscore.projections._tables import SCHEMAS

    hashes = _leaf_hashes(_connection(), SCHEMAS[table], _seal.file_source(path))
    return len(hashes), ledger.root(hashes).hex(), os.getpid(), time.process_time()


def check_roots(
    root: Path, files: list[dict[str, Any]], report: Any, progress: Any, workers: int
) -> list[dict[str, Any]]:
    intact = []
    paths, tables = [str(root / e["path"]) for e in files], [e["table"] for e in files]
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("forkserver")
    ) as pool:
        for e, (rows, merkle_root, pid, cpu) in zip(files, pool.map(_seal_file, paths, tables), strict=True):
            WORKER_CPU[pid] = max(cpu, WORKER_CPU.get(pid, 0.0))
            if rows != e["rows"]:
                report.add("rows_mismatch", e["path"], f"has {rows} rows, sealed with {e['rows']}")
            elif merkle_root != e["merkle_root"]:
                report.add("merkle_mismatch", e["path"], "rows do not hash to the sealed Merkle root")
            else:
                intact.append(e)
    return intact
