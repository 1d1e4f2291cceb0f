"""The small sealed Parquet files compaction writes beside the tables (the residency, who-routed-what
and spend partials): written whole or not at all, and read only when their bytes are the ones the
ledger sealed, so a file altered on disk changes no answer (``verify`` names it)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nexuscore.projections._manifest import fsync_path, read_regular, replace_with

Entry = dict[str, Any]
# No side file compaction writes comes near this (the largest, a day's routed rows at 10 M
# decisions, is 10 MB): a larger one is not ours, and is not read into memory.
MAX_SEALED_BYTES = 1 << 30


def write_sealed(
    root: Path,
    relative: str,
    table: pa.Table,
    metadata: dict[bytes, bytes],
    *,
    row_group_size: int | None = None,
) -> Entry:
    """Write ``table`` with ``metadata`` in its footer to ``root/relative``, durably; the fields of
    its ledger entry (path, sha256, rows)."""
    sink = pa.BufferOutputStream()
    pq.write_table(
        table.replace_schema_metadata(metadata), sink, compression="zstd", row_group_size=row_group_size
    )
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = replace_with(path, sink.getvalue().to_pybytes())
    fsync_path(path.parent)
    return {"path": relative, "sha256": digest, "rows": table.num_rows}


def read_sealed(root: Path, entry: Entry) -> pa.Table | None:
    """The table of the file ``entry`` seals (its footer's metadata kept), if the file holds the
    sealed bytes and reads as Parquet; else None."""
    sealed = open_sealed(root, entry)
    try:
        return None if sealed is None else sealed.read(use_threads=False)
    except (OSError, ValueError, pa.ArrowException):
        return None


def open_sealed(root: Path, entry: Entry) -> pq.ParquetFile | None:
    """The file ``entry`` seals, opened from the bytes that were hashed (so a file changed on disk
    after the check is not what is read), if it holds the sealed bytes and reads as Parquet; else None."""
    try:
        payload = read_regular(root / entry["path"], MAX_SEALED_BYTES)
        if hashlib.sha256(payload).hexdigest() != entry["sha256"]:
            return None
        # (ParquetFile, not read_table: that loads pyarrow.dataset, a quarter second of start-up.)
        return pq.ParquetFile(io.BytesIO(payload))
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
