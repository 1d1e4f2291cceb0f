"""The producer SDK on the real broker, with the real decider, worker and simulated provider."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore._demo import decider_args
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Services
from nexuscore.client import InvalidRequest, NexusClient, RequestSpec, Result, SyncNexusClient
from nexuscore.kernel.signing import load_private_key
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy, load_trust_store
from nexuscore.schemas import AvroCodec, InferenceRequested, ReviewRecorded
from nexuscore.services import publish, review_event, signer_name
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client
from tests.waiting import eventually_async

pytestmark = pytest.mark.integration
TRACE = "0af7651916cd43dd8448eb211c80319c"


@dataclass
class Live:
    bootstrap: str
    topics: Topics
    keys: DevKeys
    services: Services

    def client(self, **options: object) -> NexusClient:
        return NexusClient(self.bootstrap, namespace=self.topics.namespace, **options)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """Provider, decider and worker as child processes (no projector: the SDK reads the topics)."""
    topics = Topics(f"sdk-{uuid.uuid4().hex[:8]}.")
    keys = dev_keys(tmp_path_factory.mktemp("keys"), DEFAULT_POLICY_PATH)
    asyncio.run(ensure_topics(bootstrap, topics))
    with Services(tmp_path_factory.mktemp("logs")) as services:
        start_pipeline(services, bootstrap, topics, keys)
        yield Live(bootstrap, topics, keys, services)


def start_pipeline(services: Services, bootstrap: str, topics: Topics, keys: DevKeys) -> None:
    provider = services.start("provider", "run", "provider", "--port", "0")
    url = provider.wait_for_line("simulated provider listening on", 30)
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    services.start("decider", *decider_args(common, keys))
    services.start("worker", "run", "worker", *common, "--simulated-url", url)


def chat(**overrides: object) -> RequestSpec:
    fields: dict[str, object] = {
        "tenant_id": "acme-bank",
        "feature": "support-chat",
        "task_type": "chat",
        "risk_class": "low",
        "data_classification": "public",
        "prompt": "What is the balance on my account?",
        "max_output_tokens": 64,
    }
    fields.update(overrides)
    return msgspec.convert(fields, RequestSpec)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_a_request_is_answered_with_the_response_and_its_trace(live: Live) -> None:
    async def go() -> None:
        async with live.client(policy=default_policy()) as nexus:
            caller = f"00-{TRACE}-00f067aa0ba902b7-01"
            sent = await nexus.send(chat(), traceparent=caller)
            result = await nexus.result(sent.tenant_id, sent.request_id, 60)
        assert result.status == "answered", result
        assert result.response and result.model and result.output_tokens > 0
        assert result.trace_id == TRACE == sent.trace_id
        # On the wire: keyed by the tenant, the traceparent header carries the request's trace id.
        record = await read_one(live, live.topics.requests, sent.partition, sent.offset)
        assert record.key == b"acme-bank"
        header = dict(record.headers)["traceparent"].decode()
        assert header == sent.traceparent and header.startswith(f"00-{TRACE}-") and header.endswith("-01")
        request = AvroCodec().decode(record.value, (InferenceRequested,))
        assert request.trace_id == TRACE and request.request_id == sent.request_id

    live.services.check()
    run(go)


def test_the_sync_client_answers_too(live: Live) -> None:
    with SyncNexusClient(live.bootstrap, namespace=live.topics.namespace) as nexus:
        result = nexus.submit(chat(prompt="Summarise my last statement."), timeout_s=60)
    assert result.status == "answered" and result.response


def test_a_bad_request_fails_in_the_producer_and_a_rejection_comes_back_with_its_reason(live: Live) -> None:
    async def go() -> None:
        async with live.client(policy=default_policy()) as checked, live.client() as unchecked:
            with pytest.raises(InvalidRequest) as caught:
                await checked.send(chat(feature="no-such-feature"))
            assert caught.value.code == "unknown_feature"
            assert checked.stats.published == 0
            # Without the policy the decider rejects it: the same code and reason come back.
            result = await unchecked.submit(chat(feature="no-such-feature"), timeout_s=60)
        assert result.status == "rejected" and result.terminal
        assert result.reason_code == "unknown_feature" and result.reason == caught.value.reason

    run(go)


def test_an_escalation_returns_its_deadline_then_its_resolution(live: Live) -> None:
    async def go() -> None:
        async with live.client() as nexus:
            escalated = await nexus.submit(chat(risk_class="critical"), timeout_s=60)
            assert escalated.status == "escalated" and not escalated.terminal
            assert escalated.review_deadline is not None and escalated.review_deadline > datetime.now(UTC)
            await approve(live, escalated)
            final = await nexus.result(escalated.tenant_id, escalated.request_id, 60)
        assert final.status == "answered" and final.escalated and final.resolution == "dispatched"
        assert final.response

    run(go)


def test_reviews_published_together_each_reach_their_own_escalation(live: Live) -> None:
    async def go() -> None:
        async with live.client() as nexus:
            first = await nexus.submit(chat(risk_class="critical"), timeout_s=60)
            second = await nexus.submit(chat(risk_class="critical"), timeout_s=60)
            assert first.status == second.status == "escalated"
            await publish(
                live.bootstrap, live.topics, review(live, first, "approved"), review(live, second, "denied")
            )
            approved = await nexus.result(first.tenant_id, first.request_id, 60)
            denied = await nexus.result(second.tenant_id, second.request_id, 60)
        assert approved.status == "answered" and approved.resolution == "dispatched"
        assert denied.status == "denied" and denied.reason_code == "escalation_denied"

    run(go)


async def approve(live: Live, escalated: Result) -> None:
    await publish(live.bootstrap, live.topics, review(live, escalated, "approved"))


def review(live: Live, escalated: Result, action: str) -> ReviewRecorded:
    assert live.keys.reviewer is not None
    key = load_private_key(live.keys.reviewer)
    reviewer = signer_name(key, load_trust_store(live.keys.trust_store), "reviewer")
    return review_event(
        escalated.request_id, escalated.tenant_id, escalated.decision_id, action,
        "checked by the test", key, reviewer, datetime.now(UTC),
    )  # fmt: skip


def test_a_retry_under_the_same_request_id_returns_the_same_result(live: Live) -> None:
    rid = f"retry-{uuid.uuid4().hex}"

    async def go() -> None:
        async with live.client() as first:
            original = await first.submit(chat(), request_id=rid, timeout_s=60)
            again = await first.submit(chat(), request_id=rid, timeout_s=60)
        # A new client (a restarted producer) retrying, even with other content: the first answer.
        async with live.client() as second:
            retried = await second.submit(
                chat(prompt="Something else entirely."), request_id=rid, timeout_s=60
            )
        assert original.status == "answered"
        assert again == original
        assert retried == original

    run(go)


def test_re_emitted_messages_are_dropped_by_event_id(live: Live) -> None:
    async def go() -> None:
        async with live.client() as nexus:
            result = await nexus.submit(chat(prompt="Is my card blocked?"), timeout_s=60)
            assert result.status == "answered"
            copies = await republish_answer(live, result)
            assert copies >= 2  # the decision and the outcome
            await eventually_async(
                lambda: nexus.stats.duplicates >= copies, "the copies consumed and dropped", 30
            )
            assert nexus.peek(result.tenant_id, result.request_id) == result

    run(go)


async def republish_answer(live: Live, result: Result) -> int:
    """Publish again, byte for byte, every message of this request on the answer topics, as a stage
    repeating a batch after a crash would."""
    codec = AvroCodec()
    copies = []
    for topic in (live.topics.decisions, live.topics.outcomes):
        for record in await read_all(live, topic):
            event = codec.decode(record.value)
            if event.request_id == result.request_id and event.tenant_id == result.tenant_id:
                copies.append((topic, record.key, record.value))
    producer = new_producer(live.bootstrap)
    await start_client(producer, live.bootstrap)
    try:
        for topic, key, value in copies:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
    return len([c for c in copies if codec.decode(c[2]).__class__.__name__ != "BudgetSettled"])


async def read_all(live: Live, topic: str) -> list:  # type: ignore[type-arg]
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=live.bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        records = []
        while batch := await consumer.getmany(timeout_ms=1500, max_records=5000):
            for rs in batch.values():
                records.extend(rs)
        return records
    finally:
        await consumer.stop()


async def read_one(live: Live, topic: str, partition: int, offset: int):  # type: ignore[no-untyped-def]
    consumer = AIOKafkaConsumer(bootstrap_servers=live.bootstrap)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        return await consumer.getone()
    finally:
        await consumer.stop()
