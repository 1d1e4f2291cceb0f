"""``nexuscore evidence compact``: rewrite many small sealed files as few large ones, re-sealed.

The projector writes one file per table and region per flush (before, one per partition too):
thousands of small files that every view lists and every lookup opens. Compaction merges, per
(table, region) (per topic and partition too for files of one partition), the files under
``file_rows`` rows into files of up to ``file_rows`` rows, and seals
them as the projector seals its own (Merkle root over the rows, sha256, a ``file`` entry each).
Rows are sorted by tenant, then request id, then time: a tenant's rows are contiguous (its
queries skip other tenants' row groups) and each 16,384-row group covers a narrow range of
request ids, so a lookup by request id reads the footer statistics and about one row group per
tenant (the bloom filters rule out the others). A time-sorted file would give every row group the
whole range of request ids, and the reports' windows (30 of 35 days) would prune little anyway.

Each new file keeps its group's region and, per partition, offset range (with its own row count
per partition in ``sources`` when it holds several), so every check and
the projector's restart treat it as any file. Order of work, safe against a crash anywhere:

1. take the projector's lock (a running projector holds it: compaction refuses, and says so);
2. write the new files (atomically, fsynced) under names no flush uses (``compact-…``);
3. write the request index of every file in force after it (``_index``: where each request's rows
   are, for lineage), their residency partials (the residency summary's counts, ``_residency``) and
   the who-routed-what and spend partials and the routed rows (``_rollups``) and the routed keys
   (``_keyed``), then append the new files' entries and one ``compaction`` entry naming the replaced
   and the new files and sealing the sha256 of the index, partials, rows and keys, in one fsynced
   write, then sign a new head: the commit point;
4. only then delete the replaced files (and the index and partials it superseded).

A crash before 3 leaves new files no entry names (debris that ``verify`` warns about and the next
compaction or projector start deletes); after 3, old files the ledger no longer holds (likewise).
Rows are neither lost nor doubled: the same rows, in another order, in other files.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import ledger
from nexuscore.kernel import signing
from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import _keyed, _residency, _rollups, _seal
from nexuscore.projections._index import (
    current_index,
    indexed_paths,
    rechunk,
    remove_stale,
    sha256_of,
    trusted_paths,
    write_index,
)
from nexuscore.projections._manifest import (
    Manifest,
    exclusive,
    file_sources,
    fsync_path,
    read_head,
    replace_with,
    sealed_copies,
)
from nexuscore.projections._store import is_table_path, sql_list
from nexuscore.projections._tables import SCHEMAS

FILE_ROWS = 1_000_000
# Rows per row group of a compacted file. A lookup by request id reads the one group per tenant
# whose request-id range holds it (statistics, then bloom filters) and decompresses all of it:
# 4,096 rows measured about half the CPU of the projector's 16,384 for a cold lineage, while a
# scan of a tenant's month reads the same bytes either way.
ROW_GROUP = 4_096
# Leaves per recorded subtree: a compacted file's entry lists the Merkle roots of its aligned
# 65,536-row subtrees (nodes of the file's RFC 6962 tree), so that ``prove`` hashes only the rows
# of one subtree, not a million, to build an audit path. A wrong list cannot forge a proof: the
# path must still climb to the sealed ``merkle_root``.
CHUNK_ROWS = 65_536
SORT = "tenant_id, request_id, occurred_at, event_id"
# A compaction's output file (or its temporary file), by its name: ``compact-<ledger size>-<n>-…``.
COMPACTED = re.compile(r"region=[^/]+/[^/]+/\.?compact-(?P<seq>\d{12})-\d+-\d+-[^/]+\.parquet(\.tmp)?")
Entry = dict[str, Any]
Group = tuple[str, str, str, int]  # table, region, topic, partition
SEVERAL = ("", -1)  # the topic and partition of a group of files that hold several partitions


@dataclass
class CompactReport:
    files_before: int = 0
    files_after: int = 0
    replaced: int = 0
    written: int = 0
    rows: int = 0
    indexed: int = 0  # rows of the request index written (0: none written)
    groups: list[dict[str, Any]] = field(default_factory=list)


def plan(files: list[Entry], file_rows: int = FILE_ROWS) -> dict[Group, list[Entry]]:
    """The groups worth merging: per (table, region, topic, partition), the files under
    ``file_rows`` rows, where there are at least two of them."""
    groups: dict[Group, list[Entry]] = defaultdict(list)
    for e in files:
        if is_table_path(e) and int(e["rows"]) < file_rows:
            # A flush's files hold several partitions (``sources``): merged per table and region.
            several = "sources" in e
            groups[
                (e["table"], e["region"], *(SEVERAL if several else (e["topic"], int(e["partition"]))))
            ].append(e)
    return {
        g: sorted(es, key=lambda e: e.get("first_offset", -1))
        for g, es in sorted(groups.items())
        if len(es) > 1
    }


def compact(
    root: Path,
    signing_key: Ed25519PrivateKey,
    now: datetime,
    *,
    file_rows: int = FILE_ROWS,
    workers: int | None = None,
) -> CompactReport:
    """Merge the small files under ``root`` (see the module's docstring); returns what it did.
    Groups are merged and sealed in ``workers`` processes (default: one per core)."""
    if file_rows < 1:
        raise EvidenceError("file_rows must be at least 1")
    with exclusive(root, "compact"):
        _same_signer(root, signing_key)
        manifest = Manifest(root, signing_key)
        live = list(manifest.files())
        report = CompactReport(files_before=len(live))
        remove_debris(root, {e["path"] for e in live})
        groups = plan(live, file_rows)
        index = current_index(manifest.entries)
        if (
            not groups
            and index is not None
            and trusted_paths(root, index) == indexed_paths(live)
            and _residency.trusted(root, _residency.current_partials(manifest.entries), live)
            and all(_rollups.trusted(root, manifest.entries, live, r) for r in _rollups.ROLLUPS)
            and _rollups.rows_trusted(root, manifest.entries)
            and _keyed.trusted(root, manifest.entries)
        ):
            report.files_after = len(live)
            return report
        # Nothing to merge but no (usable) index or partials of the files in force: a
        # compaction that only writes them (a store compacted before there were any).
        seq, jobs = len(manifest.entries), list(groups.items())
        replaced = [e["path"] for es in groups.values() for e in es]
        after = [e for e in live if e["path"] not in set(replaced)]
        # The index and the partials are derived from every file in force, then sealed: from a file
        # changed on disk, they would carry its change under the compaction's seal.
        _check_sealed(root, after, workers or os.cpu_count() or 1)
        calls = [(str(root), g, es, seq, n, file_rows) for n, (g, es) in enumerate(jobs)]
        try:
            with _pool(workers or os.cpu_count() or 1, len(jobs)) as run:
                results = run(_rewrite, *zip(*calls, strict=True)) if calls else iter([])
                for (group, entries), written in zip(jobs, results, strict=True):
                    for entry in written:
                        manifest.add(entry)
                    after.extend(written)
                    report.groups.append(_group_report(group, entries, written))
        except EvidenceError:
            remove_debris(root, {e["path"] for e in live})  # what the other groups wrote: no entry names it
            raise
        for directory in {(root / e["path"]).parent for es in groups.values() for e in es}:
            fsync_path(directory)
        with _connection() as con:
            new_index = write_index(con, root, after, index, seq)
        partials = _residency.write_partials(root, after, seq)
        rollups = {r.name: _rollups.write_partials(root, after, seq, r) for r in _rollups.ROLLUPS}
        routed_rows = _rollups.write_routed_rows(root, after, seq)
        routed_keys = _keyed.write_keys(root, after, seq)
        sides = {**rollups, _rollups.ROUTED_ROWS: routed_rows, _keyed.FIELD: routed_keys}
        manifest.commit_compaction(replaced, now, new_index, partials, sides)
        _delete(root, replaced)
        sealed = [*rollups.values(), *routed_rows["files"], *_keyed.sealed_files(routed_keys)]
        remove_stale(root, {new_index["path"], partials["path"], *(r["path"] for r in sealed)})
        report.replaced = len(replaced)
        report.written = sum(len(g["written"]) for g in report.groups)
        report.rows = sum(g["rows"] for g in report.groups)
        report.files_after = len(list(manifest.files()))
        report.indexed = new_index["rows"]
        return report


def _same_signer(root: Path, key: Ed25519PrivateKey) -> None:
    """Refuse another key than the one that signed the head: re-signing with it would make the
    whole ledger fail ``verify`` for whoever trusts the evidence key."""
    head = read_head(root)
    mine = signing.key_id(key.public_key())
    if head is not None and head.get("key_id") != mine:
        raise EvidenceError(
            f"the evidence under {root} is signed by key {head.get('key_id')}, not by the key given ({mine})"
        )


def remove_debris(root: Path, live: set[str]) -> list[str]:
    """Delete the output of a compaction cut short: ``compact-…`` files no committed entry names."""
    removed = []
    for path in sorted(root.glob("region=*/*/*compact-*")):
        relative = path.relative_to(root).as_posix()
        if COMPACTED.fullmatch(relative) and relative not in live:
            path.unlink()
            removed.append(relative)
    return removed


@contextlib.contextmanager
def _connection() -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckDB for the merge sort: bounded memory, spilling to a private temporary folder (never
    into the evidence folder)."""
    with tempfile.TemporaryDirectory(prefix="nexuscore-compact-") as spill:
        con = duckdb.connect(config={"memory_limit": "1GB", "temp_directory": spill, "threads": 1})
        try:
            con.execute("SET TimeZone = 'UTC'")
            con.execute("SET preserve_insertion_order = false")
            con.execute("SET enable_progress_bar = false")
            yield con
        finally:
            con.close()


@contextlib.contextmanager
def _pool(workers: int, jobs: int) -> Iterator[Callable[..., Iterable[list[Entry]]]]:
    """``map`` over the groups: in this process, or in ``workers`` processes (sorting, Parquet
    encoding and the Merkle leaves are CPU work). Not forked from this process: a fork copies the
    locks DuckDB's threads hold, and the workers (which use DuckDB too) could wait on them for ever."""
    if workers <= 1 or jobs <= 1:
        yield map
        return
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=min(workers, jobs), mp_context=context) as pool:
        yield pool.map


def _rewrite(
    root_dir: str, group: Group, entries: list[Entry], seq: int, n: int, file_rows: int
) -> list[Entry]:
    """Write one group's rows, sorted, as files of up to ``file_rows`` rows; their entries."""
    with (
        tempfile.TemporaryDirectory(prefix="nexuscore-compact-inputs-") as inputs,
        _connection() as con,
    ):
        # Compaction re-seals what it reads: a file changed on disk and then merged would come out
        # under a new, valid seal (``verify`` checks that a compaction kept the row counts, not the
        # content of the files it replaced). The merge reads private copies of the sealed bytes.
        copies = sealed_copies(
            Path(root_dir), entries, Path(inputs), purpose="compact it", refusal=_not_sealed
        )
        return _rewrite_with(con, Path(root_dir), group, entries, copies, seq, n, file_rows)


def _check_sealed(root: Path, entries: list[Entry], workers: int) -> None:
    """EvidenceError, naming the first of ``entries`` whose bytes are not the ones the ledger sealed.
    (Hashed on ``workers`` threads: reading and hashing release the GIL.)"""

    def intact(e: Entry) -> bool:
        try:
            return sha256_of(root / e["path"]) == e.get("sha256")
        except OSError:
            return False

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for e, ok in zip(entries, pool.map(intact, entries), strict=True):
            if not ok:
                raise EvidenceError(_not_sealed(e["path"]))


def _not_sealed(path: str) -> str:
    return (
        f"{path} is not the file the ledger sealed (its sha256 differs, or it cannot be read as a "
        "file): compacting would seal its change; nothing was compacted (run `nexuscore evidence verify`)"
    )


def _rewrite_with(
    con: duckdb.DuckDBPyConnection,
    root: Path,
    group: Group,
    entries: list[Entry],
    copies: list[str],
    seq: int,
    n: int,
    file_rows: int,
) -> list[Entry]:
    table, region, topic, partition = group
    schema = SCHEMAS[table]
    sources = sql_list(copies)  # (the entries' files, checked against their seals)
    reader = con.sql(
        f"SELECT * FROM read_parquet({sources}, hive_partitioning = false, union_by_name = true) "  # noqa: S608
        f"ORDER BY {SORT}"
    ).to_arrow_reader(file_rows)
    several = (topic, partition) == SEVERAL
    if not several:
        first, last = min(e["first_offset"] for e in entries), max(e["last_offset"] for e in entries)
    sealer = duckdb.connect()
    written: list[Entry] = []
    try:
        for k, batch in enumerate(rechunk(reader, file_rows)):
            data = _conform(batch, schema)
            name = f"compact-{seq:012d}-{n:05d}-{k:03d}-{'flush' if several else f'{topic}-p{partition}'}.parquet"
            relative = f"region={region}/{table}/{name}"
            digest = _write(root / relative, data)
            written.append(
                {
                    "kind": "file",
                    "path": relative,
                    "table": table,
                    "region": region,
                    **(
                        {"sources": _sources(data, entries)}
                        if several
                        else {
                            "topic": topic,
                            "partition": partition,
                            "first_offset": first,
                            "last_offset": last,
                        }
                    ),
                    "rows": data.num_rows,
                    "sha256": digest,
                    **_seal_rows(sealer, data),
                }
            )
    finally:
        sealer.close()
    return written


def _sources(data: pa.Table, entries: list[Entry]) -> list[dict[str, Any]]:
    """A compacted file's ``sources``: per partition of its rows, the offsets the files it merged
    covered, and how many of its rows come from it."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for e in entries:
        for s in file_sources(e):
            tp = (s["topic"], s["partition"])
            first, last = ranges.get(tp, (s["first_offset"], s["last_offset"]))
            ranges[tp] = (min(first, s["first_offset"]), max(last, s["last_offset"]))
    counts = data.group_by(["src_topic", "src_partition"]).aggregate([([], "count_all")]).to_pylist()
    held = {(c["src_topic"], c["src_partition"]): c["count_all"] for c in counts}
    return [
        {
            "topic": t,
            "partition": p,
            "first_offset": ranges[(t, p)][0],
            "last_offset": ranges[(t, p)][1],
            "rows": n,
        }
        for (t, p), n in sorted(held.items())
    ]


def _seal_rows(con: duckdb.DuckDBPyConnection, data: pa.Table) -> dict[str, Any]:
    """The file's Merkle root, and the roots of its ``CHUNK_ROWS``-row subtrees when it has several."""
    con.register("_sealing", data)
    try:
        leaves = _seal.leaf_hashes(con, data.schema, "_sealing")
    finally:
        con.unregister("_sealing")
    sealed: dict[str, Any] = {"merkle_root": ledger.root(leaves).hex()}
    if len(leaves) > CHUNK_ROWS:
        sealed["chunk_rows"] = CHUNK_ROWS
        sealed["chunk_roots"] = [
            ledger.root(leaves[i : i + CHUNK_ROWS]).hex() for i in range(0, len(leaves), CHUNK_ROWS)
        ]
    return sealed


def _write(path: Path, data: pa.Table) -> str:
    """Write a compacted file atomically and durably; its sha256. As the projector writes its files
    (zstd, bloom filters on the request id), with row groups sized for lookups."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        data,
        sink,
        compression="zstd",
        row_group_size=ROW_GROUP,
        bloom_filter_options={"request_id": {"ndv": max(min(data.num_rows, ROW_GROUP), 1), "fpp": 0.01}},
        # No min/max statistics over ciphertext and raw bytes (as the projector writes): they prune
        # nothing, and with row groups this small they were most of a footer that every cold lookup
        # parses (a prompt's bounds, kilobytes, in every group of the requests table).
        write_statistics=[f.name for f in data.schema if not pa.types.is_binary(f.type)],
    )
    return replace_with(path, sink.getvalue().to_pybytes())


def _conform(data: pa.Table, schema: pa.Schema) -> pa.Table:
    """The rows in today's schema: files of older versions may lack columns added since (nulls)."""
    columns = [
        data.column(f.name).cast(f.type) if f.name in data.column_names else pa.nulls(data.num_rows, f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)


def _delete(root: Path, paths: list[str]) -> None:
    directories = set()
    for relative in paths:
        path = root / relative
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        directories.add(path.parent)
    for directory in directories:
        fsync_path(directory)


def _group_report(group: Group, entries: list[Entry], written: list[Entry]) -> dict[str, Any]:
    table, region, topic, partition = group
    rows = sum(e["rows"] for e in written)
    if rows != sum(e["rows"] for e in entries):  # cannot happen: the same rows, re-ordered
        raise EvidenceError(f"compaction of {table} {region} {topic}[{partition}] changed its row count")
    return {
        "table": table,
        "region": region,
        "topic": topic,
        "partition": partition,
        "replaced": [e["path"] for e in entries],
        "written": [e["path"] for e in written],
        "rows": rows,
    }
