"""Replay from the topics themselves: the log, projected afresh into a scratch evidence store.

The same projector code reads every topic from offset 0 up to the end offsets of the moment, into
a temporary folder with a throwaway signing key, so that replay runs on exactly what the log holds
(not on what an evidence store made of it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.kernel.clock import SystemClock
from nexuscore.policy import TrustStore
from nexuscore.projections import Projector
from nexuscore.transport import Topics, login_options, partition_counts, start_client


async def _end_offsets(bootstrap: str, topics: Topics) -> dict[tuple[str, int], int]:
    counts = await partition_counts(bootstrap, topics.all)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **login_options())
    await start_client(consumer, bootstrap)
    try:
        ends = await consumer.end_offsets(
            [TopicPartition(t, p) for t in topics.all for p in range(counts[t])]
        )
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


async def project_log(
    bootstrap: str,
    topics: Topics,
    root: Path,
    regions: Mapping[str, str],
    progress: Callable[[int, int], None] | None = None,
    trust: TrustStore | None = None,
) -> None:
    """Project every topic, from the start to its end offset now, into ``root``; governance acts
    and reviews are judged against ``trust`` (the deciders' trust store), as the projector does."""
    ends = await _end_offsets(bootstrap, topics)
    total = sum(ends.values())
    projector = Projector(
        bootstrap,
        root,
        Ed25519PrivateKey.generate(),
        SystemClock(),
        regions=regions,
        topics=topics,
        flush_interval_s=0.5,
        flush_rows=50_000,
        trust=trust,
        group=None,  # a scratch projection: the live projector's committed offsets stay its own
    )
    runner = asyncio.create_task(projector.run())
    try:
        while not runner.done():
            manifest = projector.writer.manifest if projector.writer is not None else None
            positions = manifest.positions if manifest is not None else {}
            done = sum(min(positions.get(tp, 0), end) for tp, end in ends.items())
            if progress is not None:
                progress(done, total)
            if all(positions.get(tp, 0) >= end for tp, end in ends.items() if end > 0):
                break
            await asyncio.sleep(0.2)
    finally:
        projector.stopping.set()
        await runner
