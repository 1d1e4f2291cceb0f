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
from nexuscore.schemas import AvroCodec, Event, RequestDecided, RequestRejected
from nexuscore.streams import PolicyHolder
from nexuscore.streams._loop import DeciderLoop
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client
from tests.factories import request

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
