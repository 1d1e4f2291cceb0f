"""Phase 1, the baseline: the same messages through plain aiokafka, the transport's own limit.

An idempotent acks=all producer here publishes the encoded requests into a fresh 4-partition topic; a
consumer-group member in a child process (like every pipeline stage, so the two do not share one event
loop and one core) reads them back. End to end runs from the first send to the last message read.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from bench._harness import BenchError, Child, CpuMeter, await_topics, create_topic, tell_parent
from bench._pipeline.params import JOIN_TIMEOUT_S
from bench._pipeline.topics import send_all
from nexuscore.transport import DEFAULT_PARTITIONS, new_consumer, start_client


def read_back(bootstrap: str, topic: str, group: str, expected: int, timeout_s: float) -> dict[str, Any]:
    """In the child process: join ``group``, say "ready", then read ``expected`` messages."""
    return asyncio.run(_read_back(bootstrap, topic, group, expected, timeout_s))


async def _read_back(
    bootstrap: str, topic: str, group: str, expected: int, timeout_s: float
) -> dict[str, Any]:
    consumer = new_consumer(bootstrap, [topic], group)
    await start_client(consumer, bootstrap)
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not consumer.assignment():
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the baseline consumer got no partitions of {topic} within {JOIN_TIMEOUT_S:.0f} s"
                )
            await consumer.getmany(timeout_ms=100)
        tell_parent("ready")
        deadline = time.monotonic() + timeout_s
        seen = nbytes = 0
        while seen < expected:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"the baseline consumer read {seen} of {expected} messages within {timeout_s:.0f} s"
                )
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batches.values():
                seen += len(records)
                nbytes += sum(len(r.value) for r in records)
        # CLOCK_MONOTONIC is system-wide on Linux: comparable with the parent's first send.
        return {"count": seen, "bytes": nbytes, "last_mono": time.monotonic()}
    finally:
        await consumer.stop()


def run_baseline(
    bootstrap: str, messages: Sequence[tuple[bytes, bytes]], run: str, broker_pid: int | None
) -> dict[str, Any]:
    n = len(messages)
    topic = f"bench-{run}.baseline"
    timeout_s = 60 + n / 500
    asyncio.run(create_topic(bootstrap, topic, DEFAULT_PARTITIONS))
    asyncio.run(await_topics(bootstrap, [topic], JOIN_TIMEOUT_S))
    group = f"bench-{run}.baseline-readers"
    with Child("baseline consumer", read_back, bootstrap, topic, group, n, timeout_s) as reader:
        reader.receive(JOIN_TIMEOUT_S + 30, "join")
        pids = {"bench (producer)": os.getpid(), "baseline consumer": reader.pid}
        if broker_pid is not None:
            pids["broker"] = broker_pid
        cpu = CpuMeter(pids)
        cpu.start()
        sent = asyncio.run(send_all(bootstrap, topic, messages))
        done = reader.receive(timeout_s, "read-back")
        cpu.stop()
    e2e_s = done["last_mono"] - sent.first_mono
    return {
        "topic_partitions": DEFAULT_PARTITIONS,
        "messages": n,
        "message_bytes_mean": round(sent.nbytes / n, 1),
        "total_mb": round(sent.nbytes / 1e6, 2),
        "produce_s": round(sent.seconds, 3),
        "produced_msgs_per_s": round(n / sent.seconds, 1),
        "end_to_end_s": round(e2e_s, 3),
        "end_to_end_msgs_per_s": round(n / e2e_s, 1),
        "end_to_end_mb_per_s": round(sent.nbytes / 1e6 / e2e_s, 2),
        "consumed": done["count"],
        "cpu": cpu.result(),
    }
