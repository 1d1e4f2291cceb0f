"""aiokafka clients configured the one way NexusCore uses them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError

from nexuscore.kernel.errors import BrokerError
from nexuscore.transport._login import KafkaLogin, process_login


def login_options(login: KafkaLogin | None = None) -> dict[str, Any]:
    """The aiokafka keyword arguments of ``login`` (None: this process's, from its environment)."""
    return (login or process_login()).client_options()


def new_producer(bootstrap: str, *, linger_ms: int = 1, login: KafkaLogin | None = None) -> AIOKafkaProducer:
    """acks=all with idempotence: a retried batch is never written twice."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        **login_options(login),
        acks="all",
        enable_idempotence=True,
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
    )


def new_consumer(
    bootstrap: str,
    topics: Sequence[str],
    group_id: str | None,
    *,
    login: KafkaLogin | None = None,
    **extra: Any,
) -> AIOKafkaConsumer:
    """Manual commits, read from the beginning: a new group must see the whole log."""
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=bootstrap,
        **login_options(login),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        **extra,
    )


async def start_client(
    client: AIOKafkaProducer | AIOKafkaConsumer | AIOKafkaAdminClient, bootstrap: str, timeout_s: float = 30.0
) -> None:
    """Start a client, or close it and raise one clear BrokerError."""
    try:
        await asyncio.wait_for(client.start(), timeout_s)
    except (KafkaConnectionError, TimeoutError, OSError) as exc:
        await (client.close() if isinstance(client, AIOKafkaAdminClient) else client.stop())
        raise BrokerError(
            f"cannot reach the Kafka broker at {bootstrap}: {exc or type(exc).__name__}"
        ) from exc
