"""Sealed files and their manifest entries: what the projector's flush (and the benchmark's
generator) writes, so that there is one way evidence reaches disk."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import ledger
from nexuscore.projections import _seal
from nexuscore.projections._manifest import Manifest, fsync_path, replace_with

if TYPE_CHECKING:
    import duckdb


def region_dir(region: str) -> str:
    return f"region={region}"


class SealedWriter:
    """Writes Parquet files, seals each in the manifest, and commits a flush with a checkpoint."""

    def __init__(self, root: Path, signing_key: Ed25519PrivateKey) -> None:
        self.root = root
        self.manifest = Manifest(root, signing_key)
        self._con: duckdb.DuckDBPyConnection | None = None  # opened only if DuckDB must seal
        self._directories: set[Path] = set()
        self._unsynced: list[Path] = []  # files written since the last commit, not yet fsynced
        self.files = 0

    def write(
        self,
        data: pa.Table,
        *,
        table: str,
        region: str,
        topic: str,
        partition: int,
        first_offset: int,
        last_offset: int,
        leaves: list[bytes] | None = None,
    ) -> None:
        """Write and seal one file. ``leaves``: its rows' leaf hashes when the caller rendered them
        already (``_leaves.column_leaves``, equal to ``_seal.leaf_hashes``); else DuckDB renders them."""
        name = f"{topic}-p{partition}-{first_offset:012d}-{last_offset:012d}.parquet"
        placement = {
            "topic": topic,
            "partition": partition,
            "first_offset": first_offset,
            "last_offset": last_offset,
        }
        self._seal(data, table, region, name, placement, leaves, groups=None)

    def write_flush(
        self,
        data: pa.Table,
        *,
        table: str,
        region: str,
        sources: list[dict[str, Any]],
        leaves: list[bytes] | None,
    ) -> None:
        """Write and seal one file of a flush: the rows of one table and region from every partition
        the flush read, partition after partition, as ``sources`` lists them (``topic``,
        ``partition``, ``first_offset``, ``last_offset``, ``rows``). Each partition's rows get row
        groups of their own, so that the footer's statistics tell where every partition's rows are
        (``verify`` reads no rows to place them). Named by the ledger's size when the flush began:
        one name per table, region and flush (a flush cut short is written again under its name).
        ``leaves`` as for ``write``."""
        name = f"flush-{len(self.manifest.entries):012d}.parquet"
        groups = [int(src["rows"]) for src in sources]
        self._seal(data, table, region, name, {"sources": sources}, leaves, groups=groups)

    def _seal(
        self,
        data: pa.Table,
        table: str,
        region: str,
        name: str,
        placement: dict[str, Any],
        leaves: list[bytes] | None,
        *,
        groups: list[int] | None,
    ) -> None:
        """Write one file (fsynced at commit) and add its entry: where its rows came from
        (``placement``), their count, Merkle root and the file's sha256."""
        relative = f"{region_dir(region)}/{table}/{name}"
        digest = write_table(self.root / relative, data, sync=False, groups=groups)
        self._unsynced.append(self.root / relative)
        self._directories.add((self.root / relative).parent)
        self.manifest.add(
            {
                "kind": "file",
                "path": relative,
                "table": table,
                "region": region,
                **placement,
                "rows": data.num_rows,
                "merkle_root": (ledger.root(leaves) if leaves is not None else self._duckdb_root(data)).hex(),
                "sha256": digest,
            }
        )
        self.files += 1

    def _duckdb_root(self, data: pa.Table) -> bytes:
        if self._con is None:
            import duckdb  # rarely needed (values Python cannot render as DuckDB does): loaded then

            self._con = duckdb.connect()
        return _seal.table_root(self._con, data)

    def commit(self, partitions: list[dict[str, Any]], now: datetime) -> None:
        """Make this flush's files durable, then commit them with a checkpoint.

        Every file is fsynced before the manifest names it in a checkpoint, as when each was
        fsynced on writing; done here, together, the fsyncs overlap (one journal commit serves
        many) instead of a flush of a hundred small files waiting for a hundred in a row. A crash
        before the checkpoint leaves files no checkpoint covers: recovery deletes them.
        """
        if self._unsynced:
            with ThreadPoolExecutor(max_workers=min(8, len(self._unsynced))) as pool:
                list(pool.map(fsync_path, self._unsynced))
        self._unsynced = []
        for directory in self._directories:  # once per flush, not once per file
            fsync_path(directory)
        self._directories = set()
        self.manifest.commit(partitions, now)


ROW_GROUP = 16_384
_UNIQUE = {"event_id", "request_id", "causation_id", "trace_id"}  # a value a row: no dictionary


def write_table(path: Path, table: pa.Table, *, sync: bool = True, groups: list[int] | None = None) -> str:
    """Write a Parquet file atomically and durably (the directory is synced at commit; with
    ``sync=False`` the file too, by the caller: ``SealedWriter.commit``).

    ``groups``: row counts (in order, summing to the table's) that no row group may straddle.
    Returns the sha256 of the bytes written. Bloom filters on the request id let a lookup skip
    every row group that cannot hold it.
    """
    if groups is not None and (sum(groups) != table.num_rows or min(groups, default=0) < 0):
        raise ValueError(f"row groups of {groups} rows do not split a table of {table.num_rows} rows")
    path.parent.mkdir(parents=True, exist_ok=True)
    sink = io.BytesIO()
    plain = [f.name for f in table.schema if not pa.types.is_binary(f.type)]
    repeated = [name for name in plain if name not in _UNIQUE]
    largest = max(groups) if groups else table.num_rows
    with pq.ParquetWriter(
        sink,
        table.schema,
        compression="zstd",
        bloom_filter_options={"request_id": {"ndv": max(min(largest, ROW_GROUP), 1), "fpp": 0.01}},
        # No min/max statistics over ciphertext and raw bytes: they prune nothing and cost a
        # comparison of kilobytes per row.
        write_statistics=plain,
        # Dictionaries only where values repeat: ciphertext and ids never do, and the writer hashed
        # every value into a dictionary it then dropped for plain encoding (about 1 µs an event for
        # the blobs, 1.5 µs for the ids; the files come out no bigger).
        use_dictionary=repeated,
    ) as parquet:
        start = 0
        for rows in groups if groups is not None else [table.num_rows]:
            # Small row groups: a lookup by request id decompresses only the group its bloom filter
            # admits (16k rows measured 3x faster than one group per file, for 1% more disk).
            parquet.write_table(table.slice(start, rows), row_group_size=ROW_GROUP)
            start += rows
    return replace_with(path, sink.getbuffer(), sync=sync)  # getbuffer: no copy of the file's bytes
