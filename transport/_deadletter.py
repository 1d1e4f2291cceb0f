"""Dead letters: bad input is kept with its reason and position, never dropped.

A dead letter holds a bounded prefix of the raw bytes plus the size and sha256 of the whole: the
original stays on its source topic at the recorded offset, and a message just under the broker's
limit must not become a dead letter over it (which would stop the stage that writes it).
"""

from __future__ import annotations

import hashlib
from datetime import datetime

from nexuscore.core import derive_id
from nexuscore.schemas import DeadLettered

# What a dead letter keeps of the raw value and key, and of the reason text.
MAX_RAW_VALUE = 64 * 1024
MAX_RAW_KEY = 1024
MAX_REASON = 2000


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
    raw = value or b""  # a tombstone: the reason says so
    return DeadLettered(
        # The same bad message at the same position always yields the same dead letter id.
        event_id=derive_id(topic, partition, offset, "deadletter"),
        request_id="",
        tenant_id=_tenant(key),
        occurred_at=now,
        producer=producer,
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        reason=reason[:MAX_REASON],
        raw_key=None if key is None else key[:MAX_RAW_KEY],
        raw_value=raw[:MAX_RAW_VALUE],
        raw_size=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(),
    )


def _tenant(key: bytes | None) -> str:
    """The key names the tenant on tenant-keyed topics; anything else is no tenant at all."""
    if key is None or len(key) > 200:
        return ""
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return text if text.isprintable() else ""
