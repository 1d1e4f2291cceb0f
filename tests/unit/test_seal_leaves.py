"""``_seal.leaf_hashes`` (what the sealer and ``verify --deep`` compute: rows rendered by DuckDB in
batches, hashed straight from the Arrow buffers) against the definition taken row by row, as the
path before it did (DuckDB's ``json_array`` text of each row, hashed as ``sha256(0x00 ‖ bytes)``):
edge-case values, in files written as the sealer writes them, batches cut inside the rows, binary
columns first, in the middle, side by side and last."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore import ledger
from nexuscore.projections import SCHEMAS, _seal
from nexuscore.projections._writer import write_table

_TEXT = st.one_of(
    st.just(""),
    st.text(st.characters(codec="utf-8"), max_size=12),  # unicode, control characters, quotes
    st.sampled_from(['"', "\\", "\\u0000", "é😀\u2028", "\x00", "\x1f\x7f", "a,b]"]),
)
_TS = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001  # hypothesis attaches the zone itself
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)
_FLOAT = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, -0.0, 1e-4, 1e15, 1 / 3])
_REASON = st.fixed_dictionaries(
    {
        "seq": st.integers(-(2**31), 2**31 - 1),
        "stage": _TEXT,
        "kind": _TEXT,
        "subject": st.none() | _TEXT,
        "detail": _TEXT,
    }
)
_SCHEMA = pa.schema(
    [
        ("b0", pa.binary()),
        ("s", pa.string()),
        ("i", pa.int64()),
        ("n", pa.int32()),
        ("f", pa.float64()),
        ("t", pa.timestamp("us", tz="UTC")),
        ("b", pa.binary()),
        ("ok", pa.bool_()),
        ("l", pa.list_(pa.string())),
        ("r", SCHEMAS["decisions"].field("reasons").type),
        ("b1", pa.binary()),
        ("b2", pa.binary()),
    ]
)
_BYTES = st.none() | st.binary(max_size=40)
_ROW = st.tuples(
    _BYTES,
    st.none() | _TEXT,
    st.none() | st.integers(-(2**63), 2**63 - 1) | st.sampled_from([0, -(2**63), 2**63 - 1]),
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | _FLOAT,
    st.none() | _TS,
    st.none() | st.binary(max_size=40),
    st.none() | st.booleans(),
    st.none() | st.lists(st.none() | _TEXT, max_size=3),
    st.none() | st.lists(st.none() | _REASON, max_size=3),
    _BYTES,
    _BYTES,
)
CON = duckdb.connect()


def by_the_definition(source: str, schema: pa.Schema) -> list[bytes]:
    """Each row's canonical text as DuckDB writes it, fetched as a Python string and hashed alone."""
    rows = CON.execute(f"SELECT {_seal.leaf_sql(schema)} FROM {source}").fetchall()  # noqa: S608
    return [ledger.leaf_hash(text.encode()) for (text,) in rows]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seal-leaves")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(rows=st.lists(_ROW, min_size=0, max_size=12), batch=st.integers(1, 5))
def test_stored_rows_hash_as_their_canonical_text_row_for_row(
    rows: list[tuple[Any, ...]], batch: int, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = pa.Table.from_pylist([dict(zip(_SCHEMA.names, r, strict=True)) for r in rows], schema=_SCHEMA)
    path = folder / "rows.parquet"
    write_table(path, table, sync=False)
    source = _seal.file_source(str(path))
    monkeypatch.setattr(_seal, "_BATCH_ROWS", batch)  # batches end inside the rows
    assert _seal.leaf_hashes(CON, _SCHEMA, source) == by_the_definition(source, _SCHEMA)
