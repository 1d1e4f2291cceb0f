"""The request index: where each request's rows are, so that a lineage reads only those.

``evidence compact`` writes one sealed Parquet file, ``_index/requests-<ledger size>.parquet``, with
one row per event of the files it covers: ``request_id``, ``tenant_id``, ``file`` (a number in the
list of covered paths that the file's key-value metadata holds) and ``row`` (the row's number in
that file). Rows are sorted by request id, then tenant (an id is unique per tenant only: a lookup
without ``--tenant`` finds every tenant's rows of it in one place), in row groups of
``ROW_GROUP`` rows with min/max statistics on the request id only. A lookup reads the footer,
bisects the row groups' statistics (about log2(groups) of them are touched) and decompresses one
group: its cost grows with the log of the store, not with its files or rows.

Each compaction writes a complete index of every file in force after it: the previous index's rows
of the files still in force, renumbered, and the rows of every other file (the new compacted files,
and files no index held). The ``compaction`` entry names it (``index``: path, sha256, rows, files),
so the signed chain covers its bytes; ``verify`` checks them. Lineage also treats it as a hint
only: it keeps only rows that are the request's (an index pointing elsewhere cannot put another
request's rows in a lineage), searches every file the index does not cover as before, and scans
everything when the index cannot be read. What it cannot see is an index altered to leave rows out;
the sha256 in the signed ledger is what catches that, in ``verify`` (hashing hundreds of megabytes
on every lookup would cost more than the lookup).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from nexuscore.projections._manifest import fsync_path, names_sealed_file, open_regular, require_regular
from nexuscore.projections._store import sql_list

INDEX_DIR = "_index"
INDEX_PATH = re.compile(r"_index/requests-\d{12}\.parquet")
FILES_KEY = b"nexuscore.index.files"
# Rows per row group: a lookup decompresses one (about a millisecond); more groups would make the
# footer that every lookup parses longer (at 60 million events: about 1,800 groups).
ROW_GROUP = 32_768
SCHEMA = pa.schema(
    [("request_id", pa.string()), ("tenant_id", pa.string()), ("file", pa.int32()), ("row", pa.int32())]
)
# The tables a request's events are in (what lineage reads), in the order lineage tells them.
LINEAGE_TABLES = (
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
Entry = dict[str, Any]
Location = tuple[str, str, int]  # table, absolute path, row number in the file


def current_index(entries: list[Entry]) -> Entry | None:
    """The index that the last compaction to write one names (None when none did, or its entry is
    malformed: then lineage scans, and ``verify`` names the entry)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction" and "index" in e:
            return e["index"] if well_formed(e["index"]) else None
    return None


def well_formed(index: object) -> bool:
    """Does an entry's ``index`` name a file in the index folder, with a sha256?"""
    return names_sealed_file(index, INDEX_PATH)


def index_files(root: Path, index: Entry) -> list[str] | None:
    """The paths an index covers, from its footer (None if it cannot be read as an index)."""
    try:
        metadata = pq.read_metadata(require_regular(root / index["path"]))
        return _paths(metadata)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None


def _paths(metadata: pq.FileMetaData) -> list[str]:
    if metadata.schema.to_arrow_schema().remove_metadata() != SCHEMA:
        raise ValueError("not a request index")
    paths = json.loads((metadata.metadata or {})[FILES_KEY])
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        raise ValueError("not a request index")
    return paths


def locate(
    root: Path, index: Entry, live: dict[str, Entry], request_id: str, tenant: str | None
) -> tuple[set[str], list[Location]] | None:
    """(the committed paths the index covers, where the request's rows are in them), or None when
    the index cannot be read (the caller then searches every file)."""
    if not well_formed(index):
        return None
    try:
        parquet = pq.ParquetFile(require_regular(root / index["path"]))
        paths = _paths(parquet.metadata)
        found = _rows_of(parquet, request_id)
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException):
        return None
    covered = {p for p in paths if p in live}
    located: list[Location] = []
    for rid_tenant, file, row in found:
        if not 0 <= file < len(paths):
            return None  # damaged: not an index this code wrote
        entry = live.get(paths[file])
        # A file no longer in force (a later compaction that wrote no index replaced it): its rows
        # are in files this index does not cover, which the caller searches.
        if entry is None or (tenant is not None and rid_tenant != tenant):
            continue
        if not 0 <= row < int(entry.get("rows", 0)):
            return None
        located.append((str(entry["table"]), str(root.absolute() / paths[file]), row))
    return covered, located


def _rows_of(parquet: pq.ParquetFile, request_id: str) -> list[tuple[str, int, int]]:
    """(tenant, file, row) of every index row of ``request_id``: the row groups whose statistics
    may hold it, found by bisection (the rows are sorted by request id), then filtered."""
    metadata = parquet.metadata
    column = metadata.schema.names.index("request_id")

    def bounds(g: int) -> tuple[str, str]:
        stats = metadata.row_group(g).column(column).statistics
        if stats is None or not stats.has_min_max:
            raise ValueError("index row group without statistics")
        return str(stats.min), str(stats.max)

    groups = range(metadata.num_row_groups)
    first = bisect.bisect_left(groups, request_id, key=lambda g: bounds(g)[1])
    wanted = []
    for g in range(first, metadata.num_row_groups):
        if bounds(g)[0] > request_id:
            break
        wanted.append(g)
    if not wanted:
        return []
    table = parquet.read_row_groups(wanted, use_threads=False)
    # The rows are sorted: two bisections touch about 30 of them (pyarrow.compute would add a
    # tenth of a second to every command's start-up, for a filter of a few microseconds here).
    ids = table.column("request_id")
    rows = range(table.num_rows)
    start = bisect.bisect_left(rows, request_id, key=lambda i: ids[i].as_py())
    end = bisect.bisect_right(rows, request_id, lo=start, key=lambda i: ids[i].as_py())
    table = table.slice(start, end - start)
    return list(
        zip(
            table.column("tenant_id").to_pylist(),
            table.column("file").to_pylist(),
            table.column("row").to_pylist(),
            strict=True,
        )
    )


def write_index(
    con: duckdb.DuckDBPyConnection, root: Path, files: list[Entry], previous: Entry | None, seq: int
) -> Entry:
    """Write the index of every file of the lineage tables in ``files`` (those in force once the
    compaction commits); the ``index`` field of the compaction's entry. The rows of ``previous``
    are reused for the files it covers (when its bytes are still those the ledger sealed), the
    others are read."""
    paths = indexed_paths(files)
    number = {p: i for i, p in enumerate(paths)}
    old_paths = trusted_paths(root, previous) if previous is not None else None
    reused = {p for p in (old_paths or []) if p in number}
    fresh = [p for p in paths if p not in reused]
    sources = []
    if reused and previous is not None and old_paths is not None:
        # The previous index's file numbers, renumbered; -1 for files no longer in force.
        con.register(
            "_remap",
            pa.table({"old": list(range(len(old_paths))), "new": [number.get(p, -1) for p in old_paths]}),
        )
        sources.append(
            'SELECT i.request_id, i.tenant_id, r.new AS file, i."row" '  # noqa: S608  # quoted paths
            f"FROM read_parquet({sql_list([str(root / previous['path'])])}) i "
            "JOIN _remap r ON r.old = i.file WHERE r.new >= 0"
        )
    if fresh:
        con.register(
            "_numbers",
            pa.table({"filename": [str(root / p) for p in fresh], "file": [number[p] for p in fresh]}),
        )
        sources.append(
            'SELECT d.request_id, d.tenant_id, n.file, CAST(d.file_row_number AS INTEGER) AS "row" '  # noqa: S608
            f"FROM read_parquet({sql_list([str(root / p) for p in fresh])}, hive_partitioning = false, "
            "union_by_name = true, filename = true, file_row_number = true) d JOIN _numbers n USING (filename)"
        )
    relative = f"{INDEX_DIR}/requests-{seq:012d}.parquet"
    if not sources:
        reader = SCHEMA.empty_table().to_reader()
    else:
        reader = con.sql(
            'SELECT request_id, tenant_id, CAST(file AS INTEGER) AS file, "row" '  # noqa: S608  # names are ours
            # (A row without a request id is no request's: no lineage asks for it.)
            f"FROM ({' UNION ALL '.join(sources)}) WHERE request_id IS NOT NULL "
            'ORDER BY request_id, tenant_id, file, "row"'
        ).to_arrow_reader(ROW_GROUP)
    rows, digest = _write(root / relative, reader, paths)
    return {"path": relative, "sha256": digest, "rows": rows, "files": len(paths)}


def indexed_paths(files: list[Entry]) -> list[str]:
    """The paths of ``files`` an index of them covers: the lineage tables' files, sorted."""
    return sorted(str(e["path"]) for e in files if e.get("table") in LINEAGE_TABLES)


def trusted_paths(root: Path, previous: Entry) -> list[str] | None:
    """The previous index's paths, if its bytes are those the ledger sealed (else it is not reused:
    its files are indexed again from their rows)."""
    try:
        if sha256_of(root / previous["path"]) != previous["sha256"]:
            return None
    except OSError:
        return None
    return index_files(root, previous)


def _write(path: Path, reader: pa.RecordBatchReader, paths: list[str]) -> tuple[int, str]:
    """Write the index atomically and durably; (rows, sha256 of its bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp"
    schema = SCHEMA.with_metadata({FILES_KEY: json.dumps(paths).encode()})
    rows = 0
    with pq.ParquetWriter(
        tmp, schema, compression="zstd", write_statistics=["request_id"], use_dictionary=["tenant_id"]
    ) as writer:
        for batch in rechunk(reader, ROW_GROUP):
            writer.write_table(batch.cast(schema), row_group_size=ROW_GROUP)
            rows += batch.num_rows
    with tmp.open("rb+") as f:
        os.fsync(f.fileno())
    digest = sha256_of(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return rows, digest


def sha256_of(path: Path) -> str:
    """The sha256 of a regular file's bytes (OSError for a link, a pipe or a device: they could block
    or never end)."""
    digest = hashlib.sha256()
    f, _ = open_regular(path)
    with f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def remove_stale(root: Path, keep: set[str]) -> list[str]:
    """Delete the files of the index folder no committed compaction names as current (a superseded
    index or residency partials, or those of a compaction cut short)."""
    removed = []
    for path in sorted((root / INDEX_DIR).glob("*")) if (root / INDEX_DIR).is_dir() else []:
        relative = path.relative_to(root).as_posix()
        if relative not in keep and path.is_file():
            path.unlink()
            removed.append(relative)
    return removed


def rechunk(reader: pa.RecordBatchReader | Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """The reader's rows as tables of exactly ``rows`` rows (the last one shorter)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            whole = pa.Table.from_batches(pending)
            yield whole.slice(0, rows)
            rest = whole.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)
