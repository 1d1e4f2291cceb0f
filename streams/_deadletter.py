"""Dead letters: bad input is kept byte for byte with its reason and position, never dropped."""

from __future__ import annotations

from datetime import datetime

from nexuscore.core import derive_id
from nexuscore.schemas import DeadLettered


def dead_letter(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    producer: str,
    now: datetime,
) -> DeadLettered:
    tenant = ""
    if key is not None:
        try:
            tenant = key.decode("utf-8")
        except UnicodeDecodeError:
            tenant = ""
    return DeadLettered(
        # The same bad message at the same position always yields the same dead letter id.
        event_id=derive_id(topic, partition, offset, "deadletter"),
        request_id="",
        tenant_id=tenant,
        occurred_at=now,
        producer=producer,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        reason=reason,
        raw_key=key,
        raw_value=value or b"",  # a tombstone: the reason says so
    )
