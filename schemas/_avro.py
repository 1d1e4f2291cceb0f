"""Derive Avro schemas from the event Structs, so the ``.avsc`` contract can never drift silently.

The ``.avsc`` files under ``schemas/avro/`` are the wire contract and are committed; this module
regenerates them (``python -m nexuscore.schemas``) and the contract test fails when they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi

from nexuscore.schemas._events import EVENT_TYPES, wire_name

AVRO_DIR = Path(__file__).resolve().parent / "avro"
NAMESPACE = "nexuscore"

AvroType = str | dict[str, Any] | list[Any]


def avro_name(cls: type[msgspec.Struct]) -> str:
    """``request_decided.v1`` -> ``request_decided_v1`` (Avro names allow no dots in a simple name)."""
    return wire_name(cls).replace(".", "_")


def _avro_type(t: mi.Type, defined: set[str]) -> AvroType:
    if isinstance(t, mi.StrType | mi.LiteralType):
        # Enumerations travel as strings: adding a value must not break old readers.
        return "string"
    if isinstance(t, mi.BoolType):
        return "boolean"
    if isinstance(t, mi.IntType):
        return "long"
    if isinstance(t, mi.FloatType):
        return "double"
    if isinstance(t, mi.BytesType):
        return "bytes"
    if isinstance(t, mi.DateTimeType):
        return {"type": "long", "logicalType": "timestamp-micros"}
    if isinstance(t, mi.ListType):
        return {"type": "array", "items": _avro_type(t.item_type, defined)}
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        if len(members) != 1 or len(members) == len(t.types):
            raise TypeError(f"only `X | None` unions are supported on the wire, got {t}")
        return ["null", _avro_type(members[0], defined)]
    if isinstance(t, mi.StructType):
        return _record(t, defined)
    raise TypeError(f"no Avro mapping for {t!r}")


def _record(info: mi.StructType, defined: set[str]) -> AvroType:
    name = avro_name(info.cls)
    if name in defined:
        return f"{NAMESPACE}.{name}"
    defined.add(name)
    fields: list[dict[str, Any]] = []
    for f in info.fields:
        field: dict[str, Any] = {"name": f.name, "type": _avro_type(f.type, defined)}
        default = f.default if f.default is not msgspec.NODEFAULT else None
        if f.default_factory is not msgspec.NODEFAULT:
            default = f.default_factory()
        if f.default is not msgspec.NODEFAULT or f.default_factory is not msgspec.NODEFAULT:
            field["default"] = default
        fields.append(field)
    doc = (info.cls.__doc__ or "").strip().splitlines()[0] if info.cls.__doc__ else ""
    return {"type": "record", "name": name, "namespace": NAMESPACE, "doc": doc, "fields": fields}


def schema_for(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """The self-contained Avro schema of one event type (nested records defined inline)."""
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    schema = _record(info, set())
    assert isinstance(schema, dict)
    return schema


def render(cls: type[msgspec.Struct]) -> str:
    return json.dumps(schema_for(cls), indent=2) + "\n"


def write_all(directory: Path = AVRO_DIR) -> list[Path]:
    """Regenerate every ``.avsc`` file; returns the paths written.

    A schema that changes (a new field with a default) keeps its previous version under
    ``history/``, named by fingerprint, so that messages written with it stay readable.
    """
    from fastavro.schema import to_parsing_canonical_form

    from nexuscore.schemas._codec import fingerprint

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for cls in EVENT_TYPES:
        path = directory / f"{avro_name(cls)}.avsc"
        new = render(cls)
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            if to_parsing_canonical_form(old) != to_parsing_canonical_form(json.loads(new)):
                kept = directory / "history" / f"{avro_name(cls)}.{fingerprint(old).hex()}.avsc"
                kept.parent.mkdir(exist_ok=True)
                kept.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
                written.append(kept)
        path.write_text(new, encoding="utf-8")
        written.append(path)
    return written
