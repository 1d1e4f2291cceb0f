"""The projector's leaf hashes rendered in Python (``_leaves.column_leaves``) against the definition
(``_seal.leaf_hashes``, DuckDB's ``json_array``): on every table of a projected history, as stored,
and on generated hostile rows, the fast path either gives the very same leaves or declines."""

from __future__ import annotations

import math
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore.projections import SCHEMAS, committed_files
from nexuscore.projections._leaves import column_leaves
from nexuscore.projections._seal import file_source, leaf_hashes
from tests.factories import POLICY, project, run_history

CON = duckdb.connect()


def duckdb_leaves(schema: pa.Schema, table: pa.Table) -> list[bytes]:
    CON.register("_rows", table)
    try:
        return leaf_hashes(CON, schema, "_rows")
    finally:
        CON.unregister("_rows")


def columns_of(table: pa.Table) -> list[list[Any]]:
    return [table.column(name).to_pylist() for name in table.schema.names]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("leaves") / "evidence"
    project(root, run_history(POLICY, 120, seed=11), flush_every=200)
    return root


def test_every_stored_file_has_the_same_leaves_both_ways(store: Path) -> None:
    tables = set()
    for entry in committed_files(store):
        path = str(store / entry["path"])
        schema = SCHEMAS[entry["table"]]
        fast = column_leaves(schema, columns_of(pq.read_table(path, schema=schema)))
        assert fast is not None, entry["path"]
        assert fast == leaf_hashes(CON, schema, file_source(path)), entry["path"]
        tables.add(entry["table"])
    assert {"requests", "decisions", "dispatches", "outcomes", "settlements"} <= tables


_TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", b.to_bytes(8, "little"))[0]),
    st.sampled_from([0.0, -0.0, 1e-4, 9.9e-5, 1e15, 1e15 - 1, 0.1, 1 / 3]),
)
# hypothesis takes naive bounds and attaches the zone itself.
_TS = st.datetimes(
    min_value=datetime(1900, 1, 1),  # noqa: DTZ001
    max_value=datetime(2200, 1, 1),  # noqa: DTZ001
    timezones=st.just(UTC),
)
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
        ("s", pa.string()),
        ("f", pa.float64()),
        ("t", pa.timestamp("us", tz="UTC")),
        ("b", pa.binary()),
        ("i", pa.int64()),
        ("n", pa.int32()),
        ("ok", pa.bool_()),
        ("l", pa.list_(pa.string())),
        ("r", SCHEMAS["decisions"].field("reasons").type),
    ]
)
_ROW = st.tuples(
    st.none() | _TEXT,
    st.none() | _FLOAT,
    st.none() | _TS,
    st.none() | st.binary(max_size=40),
    st.none() | st.integers(-(2**63), 2**63 - 1),
    st.none() | st.integers(-(2**31), 2**31 - 1),
    st.none() | st.booleans(),
    st.none() | st.lists(_TEXT, max_size=3),
    st.none() | st.lists(_REASON, max_size=3),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ROW, min_size=1, max_size=8))
def test_generated_rows_give_the_same_leaves_or_the_fast_path_declines(rows: list[tuple[Any, ...]]) -> None:
    columns = [list(c) for c in zip(*rows, strict=True)]
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, _SCHEMA, strict=True)], schema=_SCHEMA
    )
    fast = column_leaves(_SCHEMA, columns)
    if fast is not None:
        assert fast == duckdb_leaves(_SCHEMA, table)


@pytest.mark.parametrize(
    ("value", "declines"),
    [
        ("plain text, é, 😀, \u2028", False),
        ("a \x1f control character", True),
        (1e16, True),
        (1e-5, True),
        (math.nan, True),
        (math.inf, True),
        (123456.789, False),
    ],
)
def test_values_the_two_render_differently_are_left_to_duckdb(value: object, declines: bool) -> None:
    kind = pa.string() if isinstance(value, str) else pa.float64()
    schema = pa.schema([("v", kind)])
    table = pa.table({"v": pa.array([value], type=kind)}, schema=schema)
    fast = column_leaves(schema, [[value]])
    assert (fast is None) is declines
    if fast is not None:
        assert fast == duckdb_leaves(schema, table)


def test_a_struct_written_in_another_key_order_is_left_to_duckdb() -> None:
    schema = pa.schema([("r", SCHEMAS["decisions"].field("reasons").type)])
    reason = {"detail": "d", "seq": 0, "stage": "s", "kind": "k", "subject": None}
    assert column_leaves(schema, [[[reason]]]) is None


# Backslash followed by "u00" is declined on purpose (it reads as an escape): not an ordinary row.
_SAFE_TEXT = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc",)) | st.sampled_from('\n\t"\\/'), max_size=12
).filter(lambda s: "\\u00" not in s)
_SAFE_FLOAT = st.floats(min_value=1e-4, max_value=1e15, exclude_max=True) | st.just(0.0)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(st.none() | _SAFE_TEXT, st.none() | _SAFE_FLOAT, st.none() | _TS, st.none() | st.binary()),
        min_size=1,
        max_size=8,
    )
)
def test_ordinary_rows_take_the_fast_path_and_match(rows: list[tuple[Any, ...]]) -> None:
    schema = pa.schema(list(_SCHEMA)[:4])
    columns = [list(c) for c in zip(*rows, strict=True)]
    table = pa.Table.from_arrays(
        [pa.array(c, type=f.type) for c, f in zip(columns, schema, strict=True)], schema=schema
    )
    fast = column_leaves(schema, columns)
    assert fast is not None
    assert fast == duckdb_leaves(schema, table)
