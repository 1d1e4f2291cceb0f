"""Avro single-object encoding: ``C3 01`` + CRC-64-AVRO fingerprint (little-endian) + Avro body.

Any Avro library can read these messages with nothing but the ``.avsc`` files: the fingerprint
names the writer's schema.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import fastavro
import msgspec
from fastavro.schema import to_parsing_canonical_form

from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas._avro import AVRO_DIR, avro_name
from nexuscore.schemas._encoder import compile_encoder
from nexuscore.schemas._events import EVENT_TYPES, Event

MAGIC = b"\xc3\x01"
_EMPTY = 0xC15D213AA4D7A795


def _crc64_table() -> list[int]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (_EMPTY & -(fp & 1))
        table.append(fp)
    return table


_TABLE = _crc64_table()


def crc64_avro(data: bytes) -> int:
    """The Rabin CRC-64 fingerprint the Avro specification defines."""
    fp = _EMPTY
    for byte in data:
        fp = (fp >> 8) ^ _TABLE[(fp ^ byte) & 0xFF]
    return fp


def fingerprint(schema: dict[str, Any]) -> bytes:
    """The 8 bytes that follow the marker: CRC-64-AVRO of the parsing canonical form, little-endian."""
    canonical = to_parsing_canonical_form(schema)
    return crc64_avro(canonical.encode("utf-8")).to_bytes(8, "little")


class _Writer(msgspec.Struct, frozen=True):
    cls: type[Event]
    parsed: Any
    header: bytes
    # Set for an earlier version of the schema: fastavro resolves its records to the current one.
    reader: Any = None
    # The generated writer of this schema's body (None: fastavro writes it).
    body: Any = None


class AvroCodec:
    """Encodes events to, and decodes them from, Avro single-object encoding.

    Schemas are read from the committed ``.avsc`` files: the files are the contract, not the code.
    """

    def __init__(self, types: Iterable[type[Event]] = EVENT_TYPES, avro_dir: Path = AVRO_DIR) -> None:
        self._by_type: dict[type[Event], _Writer] = {}
        self._by_fingerprint: dict[bytes, _Writer] = {}
        for cls in types:
            path = avro_dir / f"{avro_name(cls)}.avsc"
            schema = json.loads(path.read_text(encoding="utf-8"))
            header = MAGIC + fingerprint(schema)
            writer = _Writer(cls, fastavro.parse_schema(schema), header, body=compile_encoder(schema))
            self._by_type[cls] = writer
            self._by_fingerprint[header[2:]] = writer
            for old_path in sorted((avro_dir / "history").glob(f"{avro_name(cls)}.*.avsc")):
                old = json.loads(old_path.read_text(encoding="utf-8"))
                old_header = MAGIC + fingerprint(old)
                self._by_fingerprint[old_header[2:]] = _Writer(
                    cls, fastavro.parse_schema(old), old_header, writer.parsed
                )

    def encode(self, event: Event) -> bytes:
        writer = self._by_type[type(event)]
        if writer.body is not None:
            buf = bytearray(writer.header)
            try:
                writer.body(event, buf)
                return bytes(buf)
            except Exception:  # noqa: BLE001, S110  # fastavro writes what the generated code does not, or says why not
                pass
        out = io.BytesIO()
        out.write(writer.header)
        fastavro.schemaless_writer(out, writer.parsed, msgspec.to_builtins(event, builtin_types=_NATIVE))
        return out.getvalue()

    def decode(self, data: bytes | None, expected: tuple[type[Event], ...] | None = None) -> Event:
        """Decode and validate one message, or raise DecodeError with a reason a person can act on."""
        return self.decode_validated(data, expected)[0]

    def decode_validated(
        self, data: bytes | None, expected: tuple[type[Event], ...] | None = None
    ) -> tuple[Event, dict[str, Any]]:
        """``decode``, with the Avro record the event was validated from: the event's fields as
        builtins (what ``msgspec.to_builtins`` would give back, less the tag), for a reader that
        needs both without converting the event back."""
        cls, record = self.decode_record(data, expected)
        try:
            return msgspec.convert(record, cls), record
        except msgspec.ValidationError as exc:
            raise DecodeError(f"invalid {avro_name(cls)}: {exc}") from exc

    def decode_record(
        self, data: bytes | None, expected: tuple[type[Event], ...] | None = None
    ) -> tuple[type[Event], dict[str, Any]]:
        """Decode to the Avro record without building (and validating) the Struct.

        For messages our own stages wrote with this codec, where the schema is check enough.
        """
        if data is None:
            raise DecodeError("message has no value (a tombstone)")
        if len(data) < 10 or data[:2] != MAGIC:
            raise DecodeError("not Avro single-object encoding (no C3 01 marker)")
        writer = self._by_fingerprint.get(data[2:10])
        if writer is None:
            raise DecodeError(f"unknown schema fingerprint {data[2:10].hex()}")
        if expected is not None and writer.cls not in expected:
            names = ", ".join(avro_name(t) for t in expected)
            raise DecodeError(
                f"event {avro_name(writer.cls)} does not belong on this topic (expects {names})"
            )
        body = io.BytesIO(data[10:])
        try:
            record = fastavro.schemaless_reader(body, writer.parsed, writer.reader)
        except Exception as exc:  # fastavro raises bare EOFError/ValueError/UnicodeDecodeError...
            raise DecodeError(
                f"body does not match {avro_name(writer.cls)}: {type(exc).__name__}: {exc}"
            ) from exc
        if body.tell() != len(data) - 10:
            raise DecodeError(f"{len(data) - 10 - body.tell()} bytes after the {avro_name(writer.cls)} body")
        assert isinstance(record, dict)
        return writer.cls, record


_NATIVE = (datetime, bytes)
