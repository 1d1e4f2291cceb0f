"""Reading a topic back in an integration test: from its beginning, until enough has come."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from aiokafka import AIOKafkaConsumer

from nexuscore.transport import start_client

T = TypeVar("T")


async def read_from_start(
    bootstrap: str,
    topic: str,
    enough: Callable[[list[T]], bool],
    convert: Callable[[bytes], T],
    timeout_s: float = 60,
) -> list[T]:
    """Every record of ``topic`` from its beginning, each through ``convert``, until ``enough`` of
    them (TimeoutError after ``timeout_s``)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await start_client(consumer, bootstrap)
    read: list[T] = []
    try:
        async with asyncio.timeout(timeout_s):
            while not enough(read):
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    read.extend(convert(r.value) for r in records)
    finally:
        await consumer.stop()
    return read
