"""``verify``'s check of the sealed files themselves, in two depths.

- **Default**: every file's sha256 against the one its (chained, signed) manifest entry seals, and
  its row count (from the Parquet footer) against the entry's; where the rows sit (topic,
  partition, offsets, region) is read from the same footer's statistics (the sealed bytes, as the
  sealer wrote them), so the data pages of the default mode are read only by the event checks. Equal sha256 means the bytes are the
  very bytes that were sealed, so nothing in them changed since; hashing runs on every core
  (``hashlib`` releases the GIL), at the speed of the disk.
- **Deep** (``deep=True``): also re-reads every row, recomputes its Merkle leaf and every file's
  Merkle root, and compares the root with the sealed one. This proves what the default cannot: that
  the sealer's roots are those of the rows (so every inclusion proof built from the rows holds),
  whoever computed them; and where the rows sit is read from the rows, not from the statistics.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import queue
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow.parquet as pq

from nexuscore.projections import _seal
from nexuscore.projections._manifest import open_regular
from nexuscore.projections._store import is_table_path

if TYPE_CHECKING:
    from nexuscore.projections._verify import VerifyReport

Entry = dict[str, Any]
Progress = Callable[[int, int], None] | None
# Where a file's rows sit, from its footer: min and max of each of these columns over every row
# group (None when a group has no statistics for one of them: the rows are read then).
PLACEMENT = ("src_topic", "src_partition", "src_offset", "data_region")
Placement = tuple[Any, ...] | None


def check_files(
    root: Path, files: list[Entry], report: VerifyReport, progress: Progress, workers: int, *, deep: bool
) -> tuple[list[Entry], dict[str, Placement]]:
    """The entries whose files are intact (every problem named in ``report``), and where each file's
    rows sit by its footer's statistics (``PLACEMENT``'s mins and maxes, by path; not in deep mode)."""
    total = sum(e["rows"] for e in files)
    placed = []
    for e in files:
        if is_table_path(e):
            placed.append(e)
        else:
            report.add("file_misplaced", e["path"], f"entry says table {e['table']}, region {e['region']}")
    intact: list[Entry] = []
    placements: dict[str, Placement] = {}
    done = 0
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        for e, (digest, rows, placement) in zip(
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
                placements[e["path"]] = placement
            if progress is not None and not deep:
                progress(done, total)
    if deep:
        return _check_roots(root, intact, report, progress, workers), {}
    return intact, placements


NOT_A_FILE = "not a regular file"  # the digest of a path that is not one (no sha256 matches it)


def _read(path: Path) -> tuple[str | None, int, Placement]:
    """(sha256 hex, rows in the Parquet footer, placement by the footer's statistics) of one file;
    (None, 0, None) when it is gone."""
    h = hashlib.sha256()
    # Read into one buffer: a new megabyte for each read is mapped afresh, page by page (measured
    # on 4 GB: 0.7 s of system time, against 0.3 s this way).
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    try:
        f, _ = open_regular(path, links=True)
    except FileNotFoundError:
        return None, 0, None
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # A pipe or a device put where a sealed file was would stall verify, or never end; neither
        # is a sealed file, so it is named altered.
        return NOT_A_FILE, -1, None
    with f:
        while n := f.readinto(buffer):
            h.update(view[:n])
    try:
        metadata = pq.read_metadata(path)
    except (OSError, ValueError):
        # Not Parquet: its sha256 matched, so it was sealed so (a row count will differ).
        return h.hexdigest(), -1, None
    return h.hexdigest(), metadata.num_rows, _placement(metadata)


def _placement(metadata: pq.FileMetaData) -> Placement:
    """(min, max) of each ``PLACEMENT`` column over the file's row groups, flattened; None when a
    group lacks statistics for one of them (hostile, or another writer): the rows decide then."""
    if metadata.num_row_groups == 0:
        return None
    lows: dict[str, Any] = {}
    highs: dict[str, Any] = {}
    try:
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            columns = {group.column(c).path_in_schema: group.column(c) for c in range(group.num_columns)}
            for name in PLACEMENT:
                stats = columns[name].statistics
                if stats is None or not stats.has_min_max or stats.null_count:
                    return None
                lows[name] = stats.min if name not in lows else min(lows[name], stats.min)
                highs[name] = stats.max if name not in highs else max(highs[name], stats.max)
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return tuple(v for name in PLACEMENT for v in (lows[name], highs[name]))


def _check_roots(
    root: Path, files: list[Entry], report: VerifyReport, progress: Progress, workers: int
) -> list[Entry]:
    """Deep: every row's leaf and every file's Merkle root, recomputed on every core."""
    intact: list[Entry] = []
    total, done = sum(e["rows"] for e in files), 0
    paths = [str(root / e["path"]) for e in files]
    with _root_map(workers) as seal:
        for e, (rows, merkle_root) in zip(files, seal(paths, files), strict=True):
            if rows < 0:
                report.add(
                    "merkle_mismatch", e["path"], f"its rows cannot be read to hash them: {merkle_root}"
                )
            elif rows != e["rows"]:
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
def _root_map(workers: int) -> Iterator[Callable[[list[str], list[Entry]], Iterator[tuple[int, str]]]]:
    """Seals files on ``workers`` threads, each with a DuckDB connection of its own, in the order
    given. Threads, not processes: DuckDB renders the rows without the GIL, so one thread's
    rendering overlaps another's hashing, and no worker process pays for importing DuckDB and
    pyarrow (measured: less CPU and less wall than a process per core, ``bench.evidence_lookup``)."""
    connections: queue.SimpleQueue[duckdb.DuckDBPyConnection] = queue.SimpleQueue()
    opened = [duckdb.connect(config={"threads": 1}) for _ in range(max(workers, 1))]
    for con in opened:
        connections.put(con)

    def seal(path: str, table: str) -> tuple[int, str]:
        """(rows, root hex), or (-1, why) when DuckDB cannot render the rows (a sealed file that is
        not one of the table's: columns missing or of other types)."""
        con = connections.get()
        try:
            return _seal.seal_file(path, table, con)
        except duckdb.Error as exc:
            return -1, str(exc).splitlines()[0]
        finally:
            connections.put(con)

    def run(paths: list[str], files: list[Entry]) -> Iterator[tuple[int, str]]:
        # The biggest files first, so that no thread is left sealing a big one at the end alone.
        order = sorted(range(len(files)), key=lambda i: -files[i]["rows"])
        futures = {i: pool.submit(seal, paths[i], files[i]["table"]) for i in order}
        return (futures[i].result() for i in range(len(files)))

    try:
        with ThreadPoolExecutor(max(workers, 1)) as pool:
            yield run
    finally:
        for con in opened:
            con.close()
