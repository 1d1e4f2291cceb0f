"""Requests onto a topic as fast as the producer takes them, and what a run's topics hold afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from bench._harness import admin_client, kafka_properties, topic_partitions
from nexuscore.schemas import AvroCodec, InferenceRequested
from nexuscore.transport import new_producer, start_client


@dataclass(frozen=True)
class Sent:
    """One publish: how much, and when it started (both clocks) and was fully acknowledged."""

    count: int
    nbytes: int
    first_mono: float
    first_wall: float
    acked_mono: float

    @property
    def seconds(self) -> float:
        return self.acked_mono - self.first_mono


def encode_requests(codec: AvroCodec, requests: Sequence[InferenceRequested]) -> list[tuple[bytes, bytes]]:
    """(key, value) exactly as the demo publishes them: Avro single-object encoding, keyed by tenant."""
    return [(r.tenant_id.encode(), codec.encode(r)) for r in requests]


async def send_all(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> Sent:
    """Publish pre-encoded (key, value) pairs as fast as the producer takes them, like
    ``nexuscore._synthetic.publish`` (same producer, same send-then-await-all pattern)."""
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        # The clock starts at the first send, after the producer has connected and fetched metadata.
        first_mono, first_wall = time.monotonic(), time.time()
        futures = [await producer.send(topic, value, key=key) for key, value in messages]
        await asyncio.gather(*futures)
        acked = time.monotonic()
    finally:
        await producer.stop()
    return Sent(len(messages), sum(len(v) for _, v in messages), first_mono, first_wall, acked)


def broker_topic_bytes(broker_pid: int | None, prefix: str) -> dict[str, int]:
    """Bytes in the log segments of every topic starting with ``prefix`` (local broker only).

    What the stages wrote, read straight from the broker's log.dirs: the admin API aiokafka offers has
    no DescribeLogDirs.
    """
    props = kafka_properties(broker_pid) if broker_pid is not None else None
    if props is None:
        return {}
    sizes: Counter[str] = Counter()
    for log_dir in (props.get("log.dirs") or props.get("log.dir", "")).split(","):
        if not log_dir.strip():
            continue
        for part in Path(log_dir.strip()).glob(f"{prefix}*-*"):
            topic = part.name.rpartition("-")[0]
            with contextlib.suppress(OSError):
                sizes[topic] += sum(f.stat().st_size for f in part.glob("*.log"))
    return dict(sizes)


async def topic_messages(bootstrap: str, prefix: str) -> dict[str, int]:
    """Messages (end offsets summed over partitions) of every topic starting with ``prefix``."""
    admin = await admin_client(bootstrap)
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
    finally:
        await admin.close()
    tps = await topic_partitions(bootstrap, names) if names else []
    if not tps:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    try:
        ends = await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
    counts: Counter[str] = Counter()
    for tp, end in ends.items():
        counts[tp.topic] += end
    return dict(counts)


def topic_stats(bootstrap: str, prefix: str, broker_pid: int | None) -> dict[str, Any]:
    """Per topic of a namespace: messages, bytes on the broker and bytes per message."""
    messages = asyncio.run(topic_messages(bootstrap, prefix))
    sizes = broker_topic_bytes(broker_pid, prefix)
    out: dict[str, Any] = {}
    for topic in sorted(messages, key=lambda t: -sizes.get(t, 0)):
        n, b = messages[topic], sizes.get(topic)
        out[topic.removeprefix(prefix)] = {
            "messages": n,
            "mb": None if b is None else round(b / 1e6, 2),
            "bytes_per_message": None if b is None or not n else round(b / n),
        }
    return out
