"""Avro bodies written straight from the event Structs, by code generated from each ``.avsc``.

fastavro's writer walks the schema for every record it writes, after ``msgspec.to_builtins`` has
copied the event into dicts: about 87 µs of CPU for a decision with eleven reasons, a quarter of the
decider's time in the pipeline benchmark. The code generated here is the schema unrolled once into
straight-line Python that reads the Struct's attributes: the same bytes (a test compares them with
fastavro's for every event type), a fraction of the work.

Only what our schemas use is generated: records, strings, bytes, longs, doubles, booleans,
``timestamp-micros``, arrays, and two-branch unions with ``null``. A schema with anything else, or a
value the generated code does not take as it is (a naive datetime, a wrong type), is written by
fastavro instead: ``compile_encoder`` returns None, or the encoder raises :class:`Unencodable`.
"""

from __future__ import annotations

import keyword
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Zigzag varints of the small longs (lengths, counts, union branches) looked up rather than computed.
_SMALL = [
    bytes([(n << 1)]) if n < 64 else bytes([((n << 1) & 0x7F) | 0x80, (n << 1) >> 7]) for n in range(8192)
]


class Unencodable(Exception):
    """A value the generated code does not write as fastavro would: the caller uses fastavro."""


def _long(n: int) -> bytes:
    if 0 <= n < 8192:
        return _SMALL[n]
    if not -(1 << 63) <= n < (1 << 63):
        raise Unencodable(f"{n} is outside Avro's long")
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _micros(value: datetime) -> int:
    if type(value) is not datetime or value.tzinfo is None:
        raise Unencodable("a naive datetime")  # fastavro reads it as local time
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_HELPERS: dict[str, Any] = {
    "_long": _long,
    "_SMALL": _SMALL,
    "_micros": _micros,
    "_double": struct.Struct("<d").pack,
    "Unencodable": Unencodable,
}


# Each value must be of exactly its field's type: anything else (a bool in a long, an int in a
# double, a str subclass, None where no null is allowed) is left to fastavro, which writes or
# refuses it as it always did.
_EXACT = {"string": "str", "bytes": "bytes", "long": "int", "double": "float", "boolean": "bool"}


def _exact(var: str, type_name: str, indent: str) -> list[str]:
    return [f"{indent}if type({var}) is not {type_name}:", f"{indent}    raise Unencodable({type_name!r})"]


class _Unsupported(Exception):
    """The schema uses something this generator does not write."""


class _Generator:
    """Turns one record schema (and the records nested in it) into Python source."""

    def __init__(self) -> None:
        self.functions: dict[str, list[str]] = {}
        self.named: dict[str, dict[str, Any]] = {}
        self.entries: dict[str, str] = {}  # a record's full name -> its function
        self.temp = 0

    def record(self, schema: dict[str, Any]) -> str:
        full = f"{schema.get('namespace', '')}.{schema['name']}"
        if full in self.entries:
            return self.entries[full]
        # Numbered, not named after the record: a name never reaches the generated source.
        name = self.entries[full] = f"_enc_{len(self.entries)}"
        self.named[schema["name"]] = self.named[full.lstrip(".")] = schema
        self.functions[name] = []  # reserved first: a record that names itself recurses
        lines = [f"def {name}(v, buf):"]
        for field in schema["fields"]:
            attr = field["name"]
            if not isinstance(attr, str) or not attr.isidentifier() or keyword.iskeyword(attr):
                raise _Unsupported(f"field name {attr!r}")
            lines += self.value(field["type"], f"v.{attr}", "    ")
        if len(lines) == 1:
            lines.append("    pass")
        self.functions[name] = lines
        return name

    def _var(self) -> str:
        self.temp += 1
        return f"x{self.temp}"

    def value(self, schema: Any, expr: str, indent: str) -> list[str]:
        if isinstance(schema, list):
            return self.union(schema, expr, indent)
        if isinstance(schema, str):
            if schema in self.named:
                return [f"{indent}{self.record(self.named[schema])}({expr}, buf)"]
            return self.primitive(schema, expr, indent)
        kind = schema["type"]
        if schema.get("logicalType") == "timestamp-micros" and kind == "long":
            return [f"{indent}buf += _long(_micros({expr}))"]
        if "logicalType" in schema:
            raise _Unsupported(f"logical type {schema['logicalType']}")
        if kind == "record":
            return [f"{indent}{self.record(schema)}({expr}, buf)"]
        if kind == "array":
            items, item = self._var(), self._var()
            return [
                f"{indent}{items} = {expr}",
                *_exact(items, "list", indent),
                f"{indent}if {items}:",
                f"{indent}    buf += _long(len({items}))",
                f"{indent}    for {item} in {items}:",
                *self.value(schema["items"], item, indent + "        "),
                f"{indent}buf += b'\\x00'",
            ]
        return self.primitive(kind, expr, indent)

    def primitive(self, kind: str, expr: str, indent: str) -> list[str]:
        x, head = self._var(), []
        if kind in _EXACT:
            head = [f"{indent}{x} = {expr}", *_exact(x, _EXACT[kind], indent)]
        if kind == "string":
            b, n = self._var(), self._var()
            # The length looked up inline: a call per string was 4 % of the decider's time.
            return [
                *head,
                f"{indent}{b} = {x}.encode()",
                f"{indent}{n} = len({b})",
                f"{indent}buf += _SMALL[{n}] if {n} < 8192 else _long({n})",
                f"{indent}buf += {b}",
            ]
        if kind == "bytes":
            return [*head, f"{indent}buf += _long(len({x}))", f"{indent}buf += {x}"]
        if kind == "long":
            return [*head, f"{indent}buf += _long({x})"]
        if kind == "double":
            return [*head, f"{indent}buf += _double({x})"]
        if kind == "boolean":
            return [*head, f"{indent}buf += b'\\x01' if {x} else b'\\x00'"]
        if kind == "null":
            return []
        raise _Unsupported(f"type {kind}")

    def union(self, branches: list[Any], expr: str, indent: str) -> list[str]:
        if len(branches) != 2 or "null" not in branches:
            raise _Unsupported(f"union {branches}")
        null_at = branches.index("null")
        other = branches[1 - null_at]
        x = self._var()
        return [
            f"{indent}{x} = {expr}",
            f"{indent}if {x} is None:",
            f"{indent}    buf += {_SMALL[null_at]!r}",
            f"{indent}else:",
            f"{indent}    buf += {_SMALL[1 - null_at]!r}",
            *self.value(other, x, indent + "    "),
        ]


def compile_encoder(schema: dict[str, Any]) -> Callable[[Any, bytearray], None] | None:
    """The generated writer of one record schema's body into a buffer, or None when the schema
    uses something the generator does not write (fastavro writes that type then)."""
    generator = _Generator()
    try:
        entry = generator.record(schema)
    except (_Unsupported, KeyError, TypeError, AttributeError):
        return None
    source = "\n\n".join("\n".join(lines) for lines in generator.functions.values())
    namespace = dict(_HELPERS)
    # The source is made here from the committed schema files, never from input.
    exec(compile(source, f"<avro encoder {schema['name']}>", "exec"), namespace)  # noqa: S102
    encoder: Callable[[Any, bytearray], None] = namespace[entry]
    return encoder
