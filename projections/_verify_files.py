"""``verify``'s check of the sealed files themselves, in two depths.

- **Default**: every file's sha256 against the one its (chained, signed) manifest entry seals, and
  its row count (from the Parquet footer) against the entry's. Equal sha256 means the bytes are the
  very bytes that were sealed, so nothing in them changed since; hashing runs on every core
  (``hashlib`` releases the GIL), at the speed of the disk.
- **Deep** (``deep=True``): also re-reads every row, recomputes its Merkle leaf and every file's
  Merkle root, and compares the root with the sealed one. This proves what the default cannot: that
  the sealer's roots are those of the rows (so every inclusion proof built from the rows holds),
  whoever computed them.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq

from nexuscore.projections import _seal
from nexuscore.projections._store import is_table_path

if TYPE_CHECKING:
    from nexuscore.projections._verify import VerifyReport

Entry = dict[str, Any]
Progress = Callable[[int, int], None] | None


def check_files(
    root: Path, files: list[Entry], report: VerifyReport, progress: Progress, workers: int, *, deep: bool
) -> list[Entry]:
    """The entries whose files are intact (every problem named in ``report``)."""
    total = sum(e["rows"] for e in files)
    placed = []
    for e in files:
        if is_table_path(e):
            placed.append(e)
        else:
            report.add("file_misplaced", e["path"], f"entry says table {e['table']}, region {e['region']}")
    intact: list[Entry] = []
    done = 0
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for e, (digest, rows) in zip(
            placed, pool.map(lambda e: _read(root / e["path"]), placed), strict=True
        ):
            done += e["rows"]
            if digest is None:
                report.add("file_missing", e["path"], f"{e['rows']} rows of {e['table']} are gone")
            elif digest != e["sha256"]:
                report.add(
                    "file_altered", e["path"], f"sha256 is {digest[:16]}…, sealed as {e['sha256'][:16]}…"
                )
            elif rows != e["rows"]:
                report.add("rows_mismatch", e["path"], f"has {rows} rows, sealed with {e['rows']}")
            else:
                intact.append(e)
                report.rows += rows
            if progress is not None and not deep:
                progress(done, total)
    return _check_roots(root, intact, report, progress, workers) if deep else intact


def _read(path: Path) -> tuple[str | None, int]:
    """(sha256 hex, rows in the Parquet footer) of one file; (None, 0) when it is gone."""
    h = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except FileNotFoundError:
        return None, 0
    try:
        rows = pq.read_metadata(path).num_rows
    except (OSError, ValueError):
        rows = -1  # not Parquet: its sha256 matched, so it was sealed so (a row count will differ)
    return h.hexdigest(), rows


def _check_roots(
    root: Path, files: list[Entry], report: VerifyReport, progress: Progress, workers: int
) -> list[Entry]:
    """Deep: every row's leaf and every file's Merkle root, recomputed on every core."""
    intact: list[Entry] = []
    total, done = sum(e["rows"] for e in files), 0
    paths, tables = [str(root / e["path"]) for e in files], [e["table"] for e in files]
    with _seal_map(workers, len(files)) as seal:
        for e, (rows, merkle_root) in zip(files, seal(paths, tables), strict=True):
            if rows != e["rows"]:
                report.add("rows_mismatch", e["path"], f"has {rows} rows, sealed with {e['rows']}")
            elif merkle_root != e["merkle_root"]:
                report.add("merkle_mismatch", e["path"], "rows do not hash to the sealed Merkle root")
            else:
                intact.append(e)
            done += e["rows"]
            if progress is not None:
                progress(done, total)
    return intact


@contextlib.contextmanager
def _seal_map(
    workers: int, jobs: int
) -> Iterator[Callable[[list[str], list[str]], Iterable[tuple[int, str]]]]:
    if workers <= 1 or jobs <= 1:
        yield lambda paths, tables: map(_seal.seal_file, paths, tables)
        return
    # The Merkle hashing is pure-Python work: one process per core. Not forked from this process: a
    # fork copies the locks DuckDB's threads hold here, and the workers (which use DuckDB too) can
    # wait on them for ever.
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("forkserver")
    ) as pool:
        yield lambda paths, tables: pool.map(_seal.seal_file, paths, tables)
