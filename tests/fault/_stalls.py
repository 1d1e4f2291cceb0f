"""How long the live path stood still after each fault, read from the topics themselves.

For a fault at time T, on the topic the faulted stage writes (the deciders: ``nexus.decisions``; the
workers and the provider: ``nexus.outcomes``; the broker: both), each partition's longest gap between
consecutive records that starts within ``WINDOW_S`` of T is the time that partition stood still; the
stall is the largest, measured from T to the first record after that gap. The load is a backlog for
the whole fault phase, so a partition that is not stalled writes records every few milliseconds.
"""

from __future__ import annotations

import asyncio
import bisect
from collections import defaultdict
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore.transport import DEFAULT_PARTITIONS, start_client

WINDOW_S = 20.0
MIN_STALL_S = 0.5


async def record_times(bootstrap: str, topic: str) -> dict[int, list[float]]:
    """Every record's timestamp (seconds since the epoch), by partition, in log order."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    times: dict[int, list[float]] = defaultdict(list)
    try:
        tps = [TopicPartition(topic, p) for p in range(DEFAULT_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            for tp, records in (await consumer.getmany(*left, timeout_ms=1000)).items():
                times[tp.partition].extend(r.timestamp / 1000 for r in records)
                if records and records[-1].offset + 1 >= end[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return {p: sorted(ts) for p, ts in times.items()}


def stall_after(at: float, partitions: Iterable[list[float]], window_s: float = WINDOW_S) -> float | None:
    """Seconds from ``at`` until the most stalled partition moved again (None: no records near it)."""
    worst: float | None = None
    for times in partitions:
        first = bisect.bisect_left(times, at - 1.0)
        # Gaps that start in [at - 1 s, at + window]: the last record before the fault through the
        # first one after the stall.
        candidates = [
            (times[i + 1] - times[i], times[i + 1])
            for i in range(max(first - 1, 0), len(times) - 1)
            if times[i] <= at + window_s
        ]
        if not candidates:
            continue
        gap, resumed = max(candidates)
        # A partition whose records kept coming (no gap longer than the load's own rhythm) did not
        # stall; otherwise it moved again with the record that ended its longest gap.
        moved = max(resumed - at, 0.0) if gap >= MIN_STALL_S else 0.0
        worst = moved if worst is None else max(worst, moved)
    return worst


def stalls(
    bootstrap: str, decisions: str, outcomes: str, faults: list[tuple[float, str]]
) -> list[float | None]:
    """For each (epoch seconds, kind) fault: the stall of the topic the faulted stage writes."""
    by_topic = {t: asyncio.run(record_times(bootstrap, t)) for t in (decisions, outcomes)}
    out: list[float | None] = []
    for at, kind in faults:
        topics = {"decider": [decisions], "worker": [outcomes], "provider": [outcomes]}.get(
            kind, [decisions, outcomes]
        )
        values = [stall_after(at, by_topic[t].values()) for t in topics]
        known = [v for v in values if v is not None]
        out.append(max(known) if known else None)
    return out
