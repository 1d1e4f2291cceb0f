"""The one check every reader of a tenant-keyed input topic applies, so that the decider and the
projector always agree on what is bad input."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas import AvroCodec, Event


def decode_tenant_event(
    codec: AvroCodec, key: bytes | None, value: bytes | None, expected: tuple[type[Event], ...]
) -> Event:
    """Decode and validate a message of a tenant-keyed topic, or raise DecodeError."""
    return decode_tenant_record(codec, key, value, expected)[0]


def decode_tenant_record(
    codec: AvroCodec, key: bytes | None, value: bytes | None, expected: tuple[type[Event], ...]
) -> tuple[Event, dict[str, Any]]:
    """``decode_tenant_event``, with the Avro record it validated (``AvroCodec.decode_validated``)."""
    event, record = codec.decode_validated(value, expected)
    if key != event.tenant_id.encode():
        # Budget state is correct only if all of a tenant's events share one partition.
        raise DecodeError(f"message key {key!r} is not the tenant id {event.tenant_id!r}")
    return event, record


def appended_at(timestamp_ms: int | None, fallback: datetime) -> datetime:
    """When the broker took a record (governance topics use LogAppendTime, which no producer sets)."""
    if timestamp_ms is None or timestamp_ms < 0:
        return fallback
    return datetime.fromtimestamp(timestamp_ms / 1000, UTC)
