"""The routed keys: the covered decisions and outcomes that ``who-routed-what`` needs, found by request.

A report over files flushed since the last compaction (the tail) counts again, from their rows, the
covered decisions that have an outcome in the tail, and it needs the covered outcomes of every
decision it counts from rows. As semi joins on the request id over the covered tables, those read
most of a tenant's rows: about 1,600 ids spread over a tenant's history touch 980 of its 2,449 row
groups on a 10 M decision store (about 1 s of CPU, and the two tables' footers 0.35 s more). So
``evidence compact`` also writes, for each of the two tables, a directory of its covered rows,
keyed by the first 16 bytes of sha256(tenant id, NUL, request id) and sorted by key:

- ``_index/routed-keys-<n>-<table>.bin``: blocks of ``BLOCK`` rows (the last one shorter), each laid
  out by column: the keys (16 bytes each), the time (int64 microseconds since the epoch), the amount
  (int64: a decision's estimated cost, an outcome's cost, in micro-USD) and the group (uint32: the
  row's report columns as a number in the table's list of them, its two top bits saying that the
  time, the amount is null), little-endian.
- ``_index/routed-keys-<n>-<table>.parquet``, the fences: per block its first key, its rows and the
  sha256 of its bytes; the list of groups and the layout (block size, row width) in the footer.

The compaction entry names both per table (``routed_keys``: path, sha256 and rows), so the signed
chain covers their bytes, and ``verify`` checks them. A lookup reads the fences only after their
sha256 matches (a few megabytes), bisects their first keys and reads only the blocks its keys fall
in (4.6 KB each), each checked against its sha256 before use: a directory altered on disk makes the
lookup fail (None) and the report reads the tables as before, never a different answer. A key is a
hash, not the id: two requests of a tenant whose keys collide (by chance 2^-128; on purpose about
2^64 sha256 evaluations) would be taken for each other by the report, nowhere else.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.projections._index import rechunk, sha256_of
from nexuscore.projections._manifest import fsync_path, names_sealed_file, open_regular
from nexuscore.projections._partials import read_sealed, write_sealed
from nexuscore.projections._tables import SCHEMAS

FIELD = "routed_keys"  # the compaction entry's field
BLOCK = 128  # rows per block: a lookup reads and hashes one block per key (4.6 KB)
KEY_BYTES = 16
WIDTH = KEY_BYTES + 8 + 8 + 4  # key, time, amount, group
TIME_NULL, AMOUNT_NULL = 1 << 31, 1 << 30  # the group's top bits
GROUP_BITS = AMOUNT_NULL - 1
# A lookup costs about 20 us a request (10M decisions): beyond this many (a second's worth) the
# report scans the tables instead, about as long.
MAX_KEYS = 50_000
_DATA = re.compile(r"_index/routed-keys-[0-9]{12}-(decisions|outcomes)\.bin")
_FENCES = re.compile(r"_index/routed-keys-[0-9]{12}-(decisions|outcomes)\.parquet")
_GROUPS_KEY = b"nexuscore.routed_keys.groups"
_LAYOUT_KEY = b"nexuscore.routed_keys.layout"
BATCH_BLOCKS = 512  # blocks per batch the compaction reads from DuckDB
Entry = dict[str, Any]


@dataclass(frozen=True)
class Keyed:
    """One table's directory: the amount column and the report columns its groups hold."""

    table: str
    amount: str
    groups: tuple[str, ...]


DECISIONS = Keyed(
    "decisions", "estimated_cost_micros", ("feature", "verdict", "tier", "deployment_id", "policy_version")
)
OUTCOMES = Keyed("outcomes", "cost_micros", ("status", "model", "region"))
KEYED = (DECISIONS, OUTCOMES)


def key_of(tenant_id: str, request_id: str) -> bytes:
    """The directory's key of a request (as the compaction's SQL computes it)."""
    return hashlib.sha256(f"{tenant_id}\x00{request_id}".encode()).digest()[:KEY_BYTES]


def _groups_sql(k: Keyed) -> str:
    columns = ", ".join(k.groups)
    return f"SELECT DISTINCT {columns} FROM {k.table} ORDER BY ALL"  # noqa: S608  # names are ours


def rows_sql(k: Keyed) -> str:
    """The table's keyed rows, sorted, each with its group's number (its row in ``_groups_sql``)."""
    columns = ", ".join(k.groups)
    same = " AND ".join(f"t.{c} IS NOT DISTINCT FROM g.{c}" for c in k.groups)
    return f"""
WITH g AS (
    SELECT {columns}, CAST(row_number() OVER (ORDER BY {columns}) - 1 AS UINTEGER) AS code
    FROM ({_groups_sql(k)})
)
SELECT from_hex(substr(sha256(t.tenant_id || chr(0) || t.request_id), 1, {2 * KEY_BYTES})) AS key,
       coalesce(epoch_us(t.occurred_at), 0) AS time_us, coalesce(CAST(t.{k.amount} AS BIGINT), 0) AS amount,
       CAST(g.code + CASE WHEN t.occurred_at IS NULL THEN {TIME_NULL} ELSE 0 END
            + CASE WHEN t.{k.amount} IS NULL THEN {AMOUNT_NULL} ELSE 0 END AS UINTEGER) AS code
FROM {k.table} t JOIN g ON {same}
WHERE t.tenant_id IS NOT NULL AND t.request_id IS NOT NULL
ORDER BY key, time_us, amount, code
"""  # noqa: S608  # names are ours


# --- writing (at compaction) -----------------------------------------------------------------------


def write_keys(root: Path, files: list[Entry], seq: int) -> Entry:
    """Write the directories of ``files`` (the decisions and outcomes in force once the compaction
    commits); the compaction entry's ``routed_keys`` field."""
    from nexuscore.projections._store import EvidenceStore

    if sys.byteorder != "little":  # (the layout is Arrow's buffers, written as they are)
        raise OSError("routed keys are written on little-endian machines only")
    tables = {k.table for k in KEYED}
    with EvidenceStore(root, files=[e for e in files if e.get("table") in tables]) as store:
        return {k.table: _write_table(store, root, seq, k) for k in KEYED}


def _write_table(store: Any, root: Path, seq: int, k: Keyed) -> Entry:
    groups = store.query(_groups_sql(k), views=(k.table,))
    if groups.num_rows > GROUP_BITS:  # (a group per row at most: a store of a billion rows)
        raise OSError(f"{groups.num_rows} groups of {k.table}: more than routed keys can number")
    relative = f"_index/routed-keys-{seq:012d}-{k.table}"
    fences: dict[str, list[Any]] = {"first_key": [], "rows": [], "sha256": []}
    with _Sink(root, f"{relative}.bin") as sink:
        batch = BLOCK * BATCH_BLOCKS  # (whole blocks: only the last one is short)
        for chunk in rechunk(store.batches(rows_sql(k), batch, views=(k.table,)), batch):
            for block in _blocks(chunk):
                sink.write(block.payload)
                fences["first_key"].append(block.first_key)
                fences["rows"].append(block.rows)
                fences["sha256"].append(hashlib.sha256(block.payload).digest())
    table = pa.table(
        {
            "first_key": pa.array(fences["first_key"], pa.binary(KEY_BYTES)),
            "rows": pa.array(fences["rows"], pa.int32()),
            "sha256": pa.array(fences["sha256"], pa.binary(32)),
        }
    )
    listed = json.dumps([list(row.values()) for row in groups.to_pylist()]).encode()
    fenced = write_sealed(root, f"{relative}.parquet", table, {_GROUPS_KEY: listed, _LAYOUT_KEY: _layout()})
    return {"data": sink.entry, "fences": fenced}


@dataclass(frozen=True)
class _Block:
    first_key: bytes
    rows: int
    payload: bytes


def _blocks(chunk: pa.Table) -> Iterator[_Block]:
    """The chunk's rows as blocks of ``BLOCK`` (the last one shorter), each laid out by column."""
    columns = [
        (pc.cast(chunk.column("key"), pa.binary(KEY_BYTES)).combine_chunks(), KEY_BYTES),
        (chunk.column("time_us").combine_chunks(), 8),
        (chunk.column("amount").combine_chunks(), 8),
        (chunk.column("code").combine_chunks(), 4),
    ]
    views = [(memoryview(a.buffers()[1])[a.offset * width :], width) for a, width in columns]
    for start in range(0, chunk.num_rows, BLOCK):
        rows = min(BLOCK, chunk.num_rows - start)
        payload = b"".join(v[start * w : (start + rows) * w] for v, w in views)
        yield _Block(payload[:KEY_BYTES], rows, payload)


class _Sink:
    """A data file written whole or not at all (a temporary file renamed over it), durably."""

    def __init__(self, root: Path, relative: str) -> None:
        self.relative, self.path = relative, root / relative
        self.tmp = self.path.parent / f".{self.path.name}.tmp"
        self.digest = hashlib.sha256()
        self.rows = 0
        self.entry: Entry = {}
        self._file: BinaryIO | None = None

    def __enter__(self) -> _Sink:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.tmp.open("wb")
        return self

    def write(self, payload: bytes) -> None:
        assert self._file is not None
        self._file.write(payload)
        self.digest.update(payload)
        self.rows += len(payload) // WIDTH

    def __exit__(self, kind: object, *exc: object) -> None:
        assert self._file is not None
        with self._file:
            self._file.flush()
            os.fsync(self._file.fileno())
        if kind is not None:
            self.tmp.unlink(missing_ok=True)
            return
        os.replace(self.tmp, self.path)
        fsync_path(self.path.parent)
        self.entry = {"path": self.relative, "sha256": self.digest.hexdigest(), "rows": self.rows}


# --- the ledger's field ----------------------------------------------------------------------------


def well_formed(field: object) -> bool:
    """Does a compaction entry's ``routed_keys`` name, per table, a data file (with its rows) and
    fences of the store's own, each with a sha256?"""
    if not isinstance(field, dict) or set(field) != {k.table for k in KEYED}:
        return False
    return all(_refs_well_formed(table, refs) for table, refs in field.items())


def _refs_well_formed(table: str, refs: object) -> bool:
    if not isinstance(refs, dict):
        return False
    data, fences = refs.get("data"), refs.get("fences")
    if not (names_sealed_file(data, _DATA) and names_sealed_file(fences, _FENCES)):
        return False
    assert isinstance(data, dict) and isinstance(fences, dict)  # (names_sealed_file says so)
    rows = data.get("rows")
    same_table = data["path"].endswith(f"-{table}.bin") and fences["path"].endswith(f"-{table}.parquet")
    return isinstance(rows, int) and not isinstance(rows, bool) and rows >= 0 and same_table


def current(entries: list[Entry]) -> Entry | None:
    """The field of the last compaction (None when it has none, or a malformed one: then the report
    reads the tables, and ``verify`` names the entry)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction":
            field = e.get(FIELD)
            return field if well_formed(field) else None
    return None


def sealed_files(field: Entry) -> list[Entry]:
    """Every file the field names (path and sha256 each)."""
    return [refs[part] for refs in field.values() for part in ("data", "fences")]


def trusted(root: Path, entries: list[Entry]) -> bool:
    """Does the last compaction name directories whose files all hold the bytes it sealed?"""
    field = current(entries)
    return field is not None and trusted_files(root, field)


def trusted_files(root: Path, field: Entry) -> bool:
    """Do the files of a well-formed ``routed_keys`` field all hold the bytes it sealed, and open as
    directories of this version's layout?"""
    try:
        intact = all(sha256_of(root / f["path"]) == f["sha256"] for f in sealed_files(field))
    except OSError:
        return False
    return intact and all(Directory.open(root, field, k) is not None for k in KEYED)


# --- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """The rows of one table a lookup found: per row the probe's number, the time, amount, group."""

    probe: list[int]
    at: list[int | None]
    amount: list[int | None]
    group: list[tuple[str | None, ...]]


class Directory:
    """One table's directory, its fences read and checked; ``find`` looks keys up."""

    def __init__(self, root: Path, k: Keyed, refs: Entry, fences: pa.Table, groups: list[tuple[Any, ...]]):
        self.root, self.keyed, self.refs, self.groups = root, k, refs, groups
        self.blocks, self.data_rows = fences.num_rows, int(refs["data"]["rows"])
        # (The columns' bytes, sliced when needed: a list of 78,000 keys costs 60 ms to make.)
        self._keys = _fixed_bytes(fences.column("first_key"), KEY_BYTES)
        self._digests = _fixed_bytes(fences.column("sha256"), 32)

    def first_key(self, i: int) -> bytes:
        return self._keys[i * KEY_BYTES : (i + 1) * KEY_BYTES]

    def rows(self, i: int) -> int:
        return BLOCK if i < self.blocks - 1 else self.data_rows - BLOCK * (self.blocks - 1)

    def digest(self, i: int) -> bytes:
        return self._digests[i * 32 : (i + 1) * 32]

    @classmethod
    def open(cls, root: Path, field: Entry, k: Keyed) -> Directory | None:
        """The directory of table ``k`` the field names, if its fences hold their sealed bytes and
        agree with the data's rows; else None."""
        refs = field[k.table]
        fences = read_sealed(root, refs["fences"])
        if fences is None or not _fences_hold(fences, int(refs["data"]["rows"])):
            return None
        if (fences.schema.metadata or {}).get(_LAYOUT_KEY) != _layout():
            return None  # (written by another version: the report scans; a compaction rewrites it)
        groups = _groups(fences, len(k.groups))
        return None if groups is None else cls(root, k, refs, fences, groups)

    def find(self, probes: list[tuple[str, str]]) -> Found | None:
        """Every row of each probe's (tenant, request id) key; None when a block read does not hold
        its sealed bytes (or cannot be read)."""
        found = Found([], [], [], [])
        if self.blocks == 0:
            return found
        order = sorted((key_of(t, r), n) for n, (t, r) in enumerate(probes))
        try:
            f, size = open_regular(self.root / self.refs["data"]["path"])
            with f:
                if size != self.data_rows * WIDTH:
                    return None  # (not the data file its fences describe)
                blocks = _Blocks(f.fileno(), self)
                if not all(self._find_one(blocks, key, n, found) for key, n in order):
                    return None
        except OSError:
            return None
        return found

    def _find_one(self, blocks: _Blocks, key: bytes, n: int, found: Found) -> bool:
        """Add probe ``n``'s rows (key ``key``) to ``found``: from the last block starting before
        the key, on while the next block starts with it. False when a block is not the sealed one."""
        i = max(bisect.bisect_left(range(self.blocks), key, key=self.first_key) - 1, 0)
        while True:
            blob = blocks.read(i)
            if blob is None:
                return False
            rows = self.rows(i)
            for j in range(*_span(blob, rows, key)):
                time, amount, code = _unpack(blob, rows, j)
                if code & GROUP_BITS >= len(self.groups):
                    return False  # (the block was sealed with it: a directory not written by us)
                found.probe.append(n)
                found.at.append(None if code & TIME_NULL else time)
                found.amount.append(None if code & AMOUNT_NULL else amount)
                found.group.append(self.groups[code & GROUP_BITS])
            i += 1
            if i == self.blocks or self.first_key(i) != key:
                return True


def _span(blob: bytes, rows: int, key: bytes) -> tuple[int, int]:
    """The rows of a block whose key is ``key``: [first, end)."""

    def key_at(j: int) -> bytes:
        return blob[j * KEY_BYTES : (j + 1) * KEY_BYTES]

    first = bisect.bisect_left(range(rows), key, key=key_at)
    return first, bisect.bisect_right(range(rows), key, lo=first, key=key_at)


class _Blocks:
    """The data file's blocks, each read once and used only when its sha256 is the sealed one."""

    def __init__(self, fd: int, directory: Directory) -> None:
        self.fd, self.directory = fd, directory
        # The last two read: keys come sorted, so a lookup goes back one block at most.
        self.read_blocks: dict[int, bytes | None] = {}

    def read(self, i: int) -> bytes | None:
        if i not in self.read_blocks:
            blob = os.pread(self.fd, self.directory.rows(i) * WIDTH, i * BLOCK * WIDTH)
            if len(self.read_blocks) == 2:
                del self.read_blocks[min(self.read_blocks)]
            self.read_blocks[i] = blob if hashlib.sha256(blob).digest() == self.directory.digest(i) else None
        return self.read_blocks[i]


def _layout() -> bytes:
    return json.dumps({"block": BLOCK, "width": WIDTH, "key": KEY_BYTES, "version": 1}).encode()


def _unpack(blob: bytes, rows: int, j: int) -> tuple[int, int, int]:
    """Row ``j``'s time, amount and group of a block of ``rows`` rows."""
    times = rows * KEY_BYTES
    (time,) = struct.unpack_from("<q", blob, times + 8 * j)
    (amount,) = struct.unpack_from("<q", blob, times + 8 * rows + 8 * j)
    (code,) = struct.unpack_from("<I", blob, times + 16 * rows + 4 * j)
    return time, amount, code


def _fences_hold(fences: pa.Table, data_rows: int) -> bool:
    """Are the fences well typed, without nulls, a block per ``BLOCK`` of the data's rows, full but
    the last, adding up to them? (Their order is the sealed one: the signed chain covers it.)"""
    expected = pa.schema(
        [("first_key", pa.binary(KEY_BYTES)), ("rows", pa.int32()), ("sha256", pa.binary(32))]
    )
    blocks = -(-data_rows // BLOCK)
    if not fences.schema.remove_metadata().equals(expected) or fences.num_rows != blocks:
        return False
    if blocks == 0:
        return True
    if any(column.null_count for column in fences.columns):
        return False
    rows = fences.column("rows")
    full_blocks = len(rows) == 1 or bool(pc.all(pc.equal(rows.slice(0, blocks - 1), BLOCK)).as_py())
    return full_blocks and rows[blocks - 1].as_py() == data_rows - BLOCK * (blocks - 1)


def _fixed_bytes(column: pa.ChunkedArray, width: int) -> bytes:
    """The values of a fixed-width binary column without nulls, end to end."""
    array = column.combine_chunks()
    return memoryview(array.buffers()[1])[
        array.offset * width : (array.offset + len(array)) * width
    ].tobytes()


def _groups(fences: pa.Table, width: int) -> list[tuple[Any, ...]] | None:
    try:
        listed = json.loads((fences.schema.metadata or {})[_GROUPS_KEY])
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(listed, list):
        return None
    groups = []
    for group in listed:
        if not (isinstance(group, list) and len(group) == width):
            return None
        if not all(v is None or isinstance(v, str) for v in group):
            return None
        groups.append(tuple(group))
    return groups


def found_table(probes: list[tuple[str, str]], found: Found, k: Keyed) -> pa.Table:
    """The rows found as the table's columns: tenant, request id, time, the group's columns, amount."""
    schema = SCHEMAS[k.table]
    columns: dict[str, pa.Array] = {
        "tenant_id": pa.array([probes[n][0] for n in found.probe], pa.string()),
        "request_id": pa.array([probes[n][1] for n in found.probe], pa.string()),
        "occurred_at": pa.array(found.at, pa.int64()).cast(schema.field("occurred_at").type),
    }
    for i, name in enumerate(k.groups):
        columns[name] = pa.array([g[i] for g in found.group], schema.field(name).type)
    columns[k.amount] = pa.array(found.amount, schema.field(k.amount).type)
    return pa.table(columns)
