"""Attack findings that need the real broker (see tests/unit/test_attack_findings.py for the rest)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer

from nexuscore._synthetic import synthetic_requests
from nexuscore.kernel.clock import SystemClock
from nexuscore.policy import Registry, SignedPolicy, TrustStore, default_policy
from nexuscore.schemas import AvroCodec, DeadLettered, Event, RequestDecided, RequestRejected
from nexuscore.streams import PolicyHolder
from nexuscore.streams._loop import DeciderLoop
from nexuscore.transport import DEFAULT_PARTITIONS, Topics, ensure_topics, new_producer, start_client
from tests.factories import replace, request
from tests.integration._topics import read_from_start

pytestmark = pytest.mark.integration
CODEC = AvroCodec()
POLICY = default_policy()
# An unknown tenant's id of 400,000 characters: the request (key and value) is 0.8 MB, under the
# broker's 1 MiB, and its rejection (the id as its key, in tenant_id and quoted in its reason) 1.2 MB.
HUGE_TENANT = "t" * 400_000


async def _decided(bootstrap: str, topic: str, wanted: set[tuple[str, str]]) -> None:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await start_client(consumer, bootstrap)
    try:
        while wanted:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                for r in records:
                    e: Event = CODEC.decode(r.value)
                    if isinstance(e, RequestDecided | RequestRejected):
                        wanted.discard((e.tenant_id, e.request_id))
    finally:
        await consumer.stop()


def test_a_request_with_a_huge_unknown_tenant_id_does_not_stop_the_decider(bootstrap: str) -> None:
    """A producer credential publishes one request for an unknown tenant whose id is 400,000
    characters, then ordinary requests: the first is dead-lettered (a tenant id is at most 200
    characters) and the others are decided, on the first run and after a restart. (Before the
    bound, its rejection was over the producer's ``max_request_size``: the send raised a KafkaError,
    which the boundary re-raises, and the decider stopped, and stopped again once restarted, reading
    the same request.)"""
    topics = Topics(f"atk-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    normal = synthetic_requests(POLICY, 3, seed=5, start=datetime.now(UTC), run="atk")

    async def go() -> None:
        producer = new_producer(bootstrap)
        await start_client(producer, bootstrap)
        try:
            hostile = request(tenant_id=HUGE_TENANT, request_id="r-huge", occurred_at=datetime.now(UTC))
            await (await producer.send(topics.requests, CODEC.encode(hostile), key=HUGE_TENANT.encode()))
            for r in normal:
                await (await producer.send(topics.requests, CODEC.encode(r), key=r.tenant_id.encode()))
        finally:
            await producer.stop()
        wanted = {(r.tenant_id, r.request_id) for r in normal}
        stopped: list[str] = []
        for attempt in ("first run", "restarted"):  # a restart reads the same request again
            holder = PolicyHolder(Registry().apply(SignedPolicy(POLICY, ()), "active"))
            loop = DeciderLoop(
                bootstrap, holder, SystemClock(), topics=topics, reviewers=TrustStore(), instance_id="d1"
            )
            running = asyncio.create_task(loop.run())
            reading = asyncio.create_task(_decided(bootstrap, topics.decisions, set(wanted)))
            try:
                done, _ = await asyncio.wait(
                    {running, reading}, timeout=90, return_when=asyncio.FIRST_COMPLETED
                )
                if running in done:
                    stopped.append(f"{attempt}: {type(running.exception()).__name__}")
                elif reading not in done:
                    stopped.append(f"{attempt}: the ordinary requests were not decided in 90 s")
            finally:
                loop.stopping.set()
                reading.cancel()
                await asyncio.gather(running, reading, return_exceptions=True)

        assert not stopped, stopped

    asyncio.run(go())


def test_a_request_written_to_another_partition_than_its_tenants_is_dead_lettered(bootstrap: str) -> None:
    """A producer credential may name the partition it writes to. A tenant's state (its budget)
    lives with the decider holding the tenant's partition, so a request written elsewhere would be
    decided by another decider, against another copy of that budget. It is dead-lettered with the
    reason; the same tenant's requests on its own partition are decided."""
    topics = Topics(f"atk-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    ours, stray = synthetic_requests(POLICY, 2, seed=5, start=datetime.now(UTC), run="atk-partition")
    stray = replace(stray, tenant_id=ours.tenant_id)

    async def go() -> list[Event]:
        producer = new_producer(bootstrap)
        await start_client(producer, bootstrap)
        try:
            key = ours.tenant_id.encode()
            home = (await producer.send_and_wait(topics.requests, CODEC.encode(ours), key=key)).partition
            elsewhere = (home + 1) % DEFAULT_PARTITIONS
            await producer.send_and_wait(topics.requests, CODEC.encode(stray), key=key, partition=elsewhere)
        finally:
            await producer.stop()
        holder = PolicyHolder(Registry().apply(SignedPolicy(POLICY, ()), "active"))
        loop = DeciderLoop(
            bootstrap, holder, SystemClock(), topics=topics, reviewers=TrustStore(), instance_id="d1"
        )
        running = asyncio.create_task(loop.run())
        try:
            await _decided(bootstrap, topics.decisions, {(ours.tenant_id, ours.request_id)})
            return await _read_until(bootstrap, topics.deadletter, 1)
        finally:
            loop.stopping.set()
            await running

    [dead] = asyncio.run(go())
    assert isinstance(dead, DeadLettered) and "its tenant's) partition is" in dead.reason
    assert dead.raw_value == CODEC.encode(stray)


async def _read_until(bootstrap: str, topic: str, n: int) -> list[Event]:
    return await read_from_start(bootstrap, topic, lambda events: len(events) >= n, CODEC.decode)
