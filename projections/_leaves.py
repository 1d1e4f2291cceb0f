"""Row leaf hashes rendered in Python from the columns the projector builds: the same bytes as
``_seal.leaf_hashes`` (DuckDB's ``json_array``), without a DuckDB round trip per file.

The leaf definition stays the one in ``_seal``: a JSON array of the row's columns in schema order,
timestamps as integer microseconds since the epoch, binary values in base64, hashed as
``sha256(0x00 ‖ bytes)``. msgspec writes that JSON exactly as DuckDB does for every value this
module accepts (``tests/unit/test_leaves.py`` compares the two on generated and hostile rows). Where
they are known to differ, this module declines (returns None) and the caller asks DuckDB:

- doubles outside ``[1e-4, 1e15)`` (and NaN, ±Infinity): msgspec switches to exponent notation
  there, DuckDB writes every digit;
- control characters other than ``\\n \\r \\t \\b \\f`` in a string: msgspec escapes them with
  lower-case hex (``\\u001f``), DuckDB with upper-case (``\\u001F``).
"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pyarrow as pa

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_ENCODE = msgspec.json.Encoder().encode
_LOW, _HIGH = 1e-4, 1e15  # doubles msgspec and DuckDB render alike (checked, see the module)

Normalise = Callable[[Any], Any]


class _Decline(Exception):
    """A value outside the domain where this rendering is known to equal DuckDB's."""


def _float(v: Any) -> Any:
    if v is None:
        return None
    f = float(v)
    if f != 0.0 and not _LOW <= abs(f) < _HIGH:  # NaN fails both comparisons
        raise _Decline
    return f


def _micros(v: Any) -> Any:
    if v is None:
        return None
    if not isinstance(v, datetime) or v.tzinfo is None:
        raise _Decline  # Arrow's reading of a naive or foreign value is not ours to guess
    return (v - _EPOCH) // _US


def _base64(v: Any) -> Any:
    return None if v is None else binascii.b2a_base64(v, newline=False).decode("ascii")


def _normaliser(t: pa.DataType, top: bool) -> Normalise | None:
    """How one value of Arrow type ``t`` becomes what DuckDB renders (None: as it is)."""
    if pa.types.is_timestamp(t):
        if not top:
            raise _Decline  # nested timestamps render as text in DuckDB: not used by any table
        return _micros
    if pa.types.is_binary(t):
        if not top:
            raise _Decline
        return _base64
    if pa.types.is_floating(t):
        return _float
    if pa.types.is_list(t):
        inner = _normaliser(t.value_type, False)
        if inner is None:
            return None
        return lambda v: None if v is None else [inner(x) for x in v]
    if pa.types.is_struct(t):
        names = tuple(f.name for f in t)
        subs = [(f.name, _normaliser(f.type, False)) for f in t]
        if all(s is None for _, s in subs):
            # The row builders write these dicts in the struct's field order: check, don't rebuild.
            def same(v: Any) -> Any:
                if v is not None and (type(v) is not dict or tuple(v) != names):
                    raise _Decline
                return v

            return same

        def struct(v: Any) -> Any:
            if v is None:
                return None
            if type(v) is not dict or tuple(v) != names:
                raise _Decline
            return {n: (v[n] if s is None else s(v[n])) for n, s in subs}

        return struct
    if pa.types.is_boolean(t) or pa.types.is_integer(t) or pa.types.is_string(t):
        return None
    raise _Decline


def normalisers(schema: pa.Schema) -> list[Normalise | None] | None:
    """Per column, how its values are rendered; None when a column type is not supported."""
    try:
        return [_normaliser(f.type, True) for f in schema]
    except _Decline:
        return None


def column_leaves(schema: pa.Schema, columns: Sequence[Sequence[Any]]) -> list[bytes] | None:
    """The leaf hashes of the rows held column by column (in schema order), or None to decline."""
    fns = normalisers(schema)
    if fns is None:
        return None
    try:
        rendered = [col if fn is None else [fn(v) for v in col] for fn, col in zip(fns, columns, strict=True)]
    except (_Decline, AttributeError, TypeError, ValueError, OverflowError):
        return None
    sha, encode = hashlib.sha256, _ENCODE
    hashes = []
    try:
        for row in zip(*rendered, strict=True):  # one row's bytes at a time: a flush's worth never held
            data = encode(row)
            if b"\\u00" in data:
                return None  # a control character (or a literal backslash-u00): DuckDB's casing rules
            hashes.append(sha(b"\x00" + data).digest())
    except (msgspec.EncodeError, TypeError, ValueError, OverflowError):
        return None
    return hashes
