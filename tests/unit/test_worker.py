"""The worker's calling logic (retries, attempts, outcome, cost) and its offset bookkeeping."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import msgspec
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from nexuscore.core import EMPTY_STATE, BreakerConfig, on_request
from nexuscore.kernel.clock import FixedClock
from nexuscore.kernel.errors import ProviderError
from nexuscore.providers import ChatRequest, ChatResult
from nexuscore.schemas import AvroCodec, CircuitStateChanged, DeadLettered, DispatchRequested
from nexuscore.streams import Caller, RetryPolicy
from nexuscore.streams._circuits import CircuitBoard
from nexuscore.streams._worker import Bulkhead, Worker, _Offsets, targets_of
from tests.factories import POLICY, T0, request


class ScriptedProvider:
    """A provider adapter that answers from a script: an exception to raise or a result to return."""

    def __init__(self, *script: ProviderError | ChatResult) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, ChatRequest]] = []

    async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
        self.calls.append((base_url, request))
        step = self.script.pop(0)
        if isinstance(step, ProviderError):
            raise step
        return step

    async def aclose(self) -> None:
        return None


def dispatch(*, failover: bool = False, **fields: object) -> DispatchRequested:
    """A dispatch of public data, which may go to any region: with its fallbacks or without."""
    req = request(max_output_tokens=100, data_classification="public", **fields)
    _, _, events = on_request(EMPTY_STATE, req, POLICY, "tests", T0)
    d = events[1]
    assert isinstance(d, DispatchRequested)
    assert d.fallbacks, "the default policy gives public data a failover chain"
    return d if failover else msgspec.structs.replace(d, fallbacks=[])


def caller(provider: ScriptedProvider, override: str | None = None) -> tuple[Caller, list[float]]:
    slept: list[float] = []
    c = Caller(
        {"openai": provider, "anthropic": provider},
        FixedClock(T0),
        retry=RetryPolicy(max_attempts=3, base_s=0.1, cap_s=1.0),
        rng=random.Random(1),
        endpoint_override=override,
        sleep=slept.append,
    )
    return c, slept


OK = ChatResult(text="fine", input_tokens=8, output_tokens=500, finish_reason="stop", model_version="m-2026")
BUSY = ProviderError("HTTP 503", retryable=True, status_code=503)


@pytest.mark.asyncio
async def test_retryable_errors_are_retried_with_jitter_and_every_attempt_is_recorded() -> None:
    provider = ScriptedProvider(BUSY, BUSY, OK)
    c, slept = caller(provider)
    d = dispatch()
    attempts, outcome = await c.call(d)
    assert [a.status for a in attempts] == ["error", "error", "ok"]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert attempts[0].http_status == 503 and attempts[0].retryable
    assert len(slept) == 2 and 0 <= slept[0] <= 0.1 and 0 <= slept[1] <= 0.2
    assert outcome.status == "answered" and outcome.attempts == 3
    assert outcome.causation_id == d.event_id and outcome.request_id == d.request_id
    # The idempotency key travels with every retry, so the provider can deduplicate.
    assert {r.idempotency_key for _, r in provider.calls} == {d.idempotency_key}
    assert {a.region for a in attempts} == {d.region}


@pytest.mark.asyncio
async def test_usage_is_billed_at_the_dispatch_prices_and_capped_at_max_output_tokens() -> None:
    c, _ = caller(ScriptedProvider(OK))
    d = dispatch()
    _, outcome = await c.call(d)
    assert outcome.output_tokens == d.max_output_tokens == 100
    expected = -(-(8 * d.input_price_micros_per_1k + 100 * d.output_price_micros_per_1k) // 1000)
    assert outcome.cost_micros == expected <= d.estimated_cost_micros
    assert outcome.model_version == "m-2026"


@pytest.mark.asyncio
async def test_a_non_retryable_error_fails_at_once_and_costs_nothing() -> None:
    c, slept = caller(ScriptedProvider(ProviderError("HTTP 400", retryable=False, status_code=400)))
    attempts, outcome = await c.call(dispatch())
    assert len(attempts) == 1 and not slept
    assert (outcome.status, outcome.cost_micros, outcome.error) == ("failed", 0, "HTTP 400")


@pytest.mark.asyncio
async def test_retries_stop_after_the_last_attempt() -> None:
    c, slept = caller(ScriptedProvider(BUSY, BUSY, BUSY))
    attempts, outcome = await c.call(dispatch())
    assert len(attempts) == 3 and len(slept) == 2 and outcome.status == "failed"


@pytest.mark.asyncio
async def test_the_endpoint_override_sends_every_call_to_the_simulated_provider() -> None:
    provider = ScriptedProvider(OK)
    c, _ = caller(provider, override="http://127.0.0.1:9/v1")
    await c.call(dispatch())
    assert provider.calls[0][0] == "http://127.0.0.1:9/v1"


def test_only_a_contiguous_prefix_of_finished_offsets_is_committable() -> None:
    tp = TopicPartition("t", 0)
    o = _Offsets()
    for offset in (10, 11, 12):
        o.started(tp, offset)
    o.finished(tp, 11)
    o.finished(tp, 12)
    assert o.committable() == {tp: 10}  # 10 is still running: nothing past it
    o.committed.update(o.committable())
    assert o.committable() == {}
    o.finished(tp, 10)
    assert o.committable() == {tp: 13}


@pytest.mark.asyncio
async def test_a_failing_deployment_fails_over_inside_the_allowed_regions_recording_every_attempt() -> None:
    provider = ScriptedProvider(BUSY, BUSY, BUSY, OK)
    c, _ = caller(provider)
    d = dispatch(failover=True)
    attempts, outcome = await c.call(d)
    fallback = d.fallbacks[0]
    assert [(a.deployment_id, a.status) for a in attempts] == [
        (d.deployment_id, "error"),
        (d.deployment_id, "error"),
        (d.deployment_id, "error"),
        (fallback.deployment_id, "ok"),
    ]
    assert [a.attempt for a in attempts] == [1, 2, 3, 4]
    assert outcome.status == "answered" and outcome.attempts == 4
    assert (outcome.deployment_id, outcome.region, outcome.model) == (
        fallback.deployment_id,
        fallback.region,
        fallback.model,
    )
    assert {a.region for a in attempts} <= set(d.allowed_regions)
    # Billed at the prices of the deployment that answered, never more than the reservation.
    assert outcome.cost_micros <= d.estimated_cost_micros


@pytest.mark.asyncio
async def test_a_fallback_outside_the_allowed_regions_is_never_called() -> None:
    d = dispatch(failover=True)
    outside = msgspec.structs.replace(d.fallbacks[0], region="elsewhere")
    d = msgspec.structs.replace(d, fallbacks=[outside])
    c, _ = caller(ScriptedProvider(BUSY, BUSY, BUSY))
    attempts, outcome = await c.call(d)
    assert {a.deployment_id for a in attempts} == {d.deployment_id}
    assert outcome.status == "failed"
    assert outcome.skipped == [f"{outside.deployment_id}: region elsewhere is outside the allowed regions"]


@pytest.mark.asyncio
async def test_an_open_circuit_is_skipped_and_reported_then_probed_after_its_cool_down() -> None:
    clock = FixedClock(T0)
    board = CircuitBoard(clock, "worker-a", BreakerConfig(failure_threshold=2, cool_down_s=10))
    published: list[CircuitStateChanged] = []

    async def publish(event: CircuitStateChanged) -> None:
        published.append(event)

    board.publish = publish
    provider = ScriptedProvider(BUSY, BUSY, OK, OK, OK)
    c = Caller(
        {"openai": provider, "anthropic": provider},
        clock,
        retry=RetryPolicy(max_attempts=3, base_s=0.1, cap_s=1.0),
        rng=random.Random(1),
        sleep=lambda _: None,
        circuits=board,
    )
    d = dispatch(failover=True)
    first_attempts, first = await c.call(d)
    # Two failures open the circuit: the third retry is not made, the fallback answers.
    assert [a.deployment_id for a in first_attempts] == [
        d.deployment_id,
        d.deployment_id,
        d.fallbacks[0].deployment_id,
    ]
    assert [(e.deployment_id, e.from_state, e.to_state) for e in published] == [
        (d.deployment_id, "closed", "open")
    ]
    assert published[0].open_until == T0 + timedelta(seconds=10)
    _, second = await c.call(d)
    assert second.skipped == [f"{d.deployment_id}: circuit open"]
    assert second.deployment_id == d.fallbacks[0].deployment_id
    clock.at = T0 + timedelta(seconds=11)
    _, third = await c.call(d)
    assert third.deployment_id == d.deployment_id and not third.skipped
    assert [(e.from_state, e.to_state) for e in published[1:]] == [
        ("open", "half_open"),
        ("half_open", "closed"),
    ]


def test_a_circuit_opened_by_another_worker_is_taken_up() -> None:
    clock = FixedClock(T0)
    mine, theirs = CircuitBoard(clock, "worker-a"), CircuitBoard(clock, "worker-b")
    theirs_event = CircuitStateChanged(
        event_id="e1", request_id="r", tenant_id="t", occurred_at=T0, producer="worker-b",
        deployment_id="eu-small-1", region="eu", from_state="closed", to_state="open",
        reason="5 consecutive failures", consecutive_failures=5, open_until=T0 + timedelta(seconds=5),
    )  # fmt: skip
    mine.take_up(theirs_event)
    theirs.take_up(theirs_event)  # its own event: already applied where it was made
    assert mine.state("eu-small-1") == "open"
    assert theirs.state("eu-small-1") == "closed"


@pytest.mark.asyncio
async def test_a_tenant_over_its_bulkhead_waits_then_is_refused_while_others_still_get_slots() -> None:
    bulkhead = Bulkhead(concurrency=2, queue=1)
    release = asyncio.Event()
    running: list[str] = []

    async def call(tenant: str) -> None:
        async with bulkhead.slot(tenant):
            running.append(tenant)
            await release.wait()

    flood = [asyncio.create_task(call("flood")) for _ in range(3)]
    await asyncio.sleep(0)
    assert running == ["flood", "flood"]  # two in flight, the third waits
    assert bulkhead.full("flood")  # a fourth would be refused at once
    other = asyncio.create_task(call("quiet"))
    await asyncio.sleep(0)
    assert running[-1] == "quiet" and not bulkhead.full("quiet")
    release.set()
    await asyncio.gather(*flood, other)
    assert running.count("flood") == 3


class RecordingProducer:
    """Stands where the worker's Kafka producer would be: every send is acknowledged at once."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes | None]] = []
        self.headers: list[list[tuple[str, bytes]] | None] = []

    async def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[object]:
        self.sent.append((topic, value, key))
        self.headers.append(headers)
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _record(value: bytes | None, key: bytes | None, offset: int = 0) -> ConsumerRecord:
    return ConsumerRecord(
        topic="nexus.dispatch", partition=0, offset=offset, timestamp=0, timestamp_type=0, key=key,
        value=value, checksum=None, serialized_key_size=0, serialized_value_size=0, headers=(),
    )  # fmt: skip


def _worker(provider: ScriptedProvider) -> Worker:
    return Worker("unused:9092", caller(provider)[0], FixedClock(T0))


@pytest.mark.asyncio
async def test_a_dispatch_delivered_twice_calls_the_provider_once() -> None:
    # Finding 9: a redelivered dispatch called the provider twice (and the evidence kept one attempt).
    provider, producer = ScriptedProvider(OK, OK), RecordingProducer()
    worker, d = _worker(provider), dispatch()
    value = AvroCodec().encode(d)
    first = await worker._handle(_record(value, d.request_id.encode()), producer)  # type: ignore[arg-type]
    # The same offset again (a rebalance back to this worker) while the first is not yet recorded:
    # the copy is done only once the first call's outcome is acknowledged, never before.
    again = await worker._handle(_record(value, d.request_id.encode()), producer)  # type: ignore[arg-type]
    assert not again[0].done()
    for future in first:
        await future
    await again[0]
    assert len(provider.calls) == 1 and worker.repeats == 1
    assert [topic for topic, _, _ in producer.sent] == ["nexus.attempts", "nexus.outcomes"]
    # Both records carry the worker's trace context, and the provider call got the same one.
    (traceparent,) = {dict(h or [])["traceparent"] for h in producer.headers}
    assert provider.calls[0][1].traceparent == traceparent.decode()


def test_attempts_of_a_second_worker_incarnation_keep_their_own_ids() -> None:
    # After a crash before the commit, a new worker calls again: both calls must be in the evidence.
    d = dispatch()
    one, two = (Caller({}, FixedClock(T0), incarnation=i) for i in ("w1", "w2"))
    a1 = one._attempt(d, targets_of(d)[0], 1, "ok", 0.0, 200, False, "")
    a2 = two._attempt(d, targets_of(d)[0], 1, "ok", 0.0, 200, False, "")
    assert a1.event_id != a2.event_id
    assert (
        one._outcome(d, targets_of(d)[0], None, 1, 0.0, "", []).event_id
        == two._outcome(d, targets_of(d)[0], None, 1, 0.0, "", []).event_id
    )  # one outcome per dispatch, whichever incarnation records it


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"\x00" * 1_000_000, b"r", "not Avro"),
        (None, b"r", "no value"),
        ("valid", b"someone-else", "is not the request id"),
    ],
)
async def test_bad_dispatches_are_dead_lettered_with_a_bounded_copy(
    value: object, key: bytes, reason: str
) -> None:
    provider, producer = ScriptedProvider(OK), RecordingProducer()
    raw = AvroCodec().encode(dispatch()) if value == "valid" else value
    await _worker(provider)._handle(_record(raw, key), producer)  # type: ignore[arg-type]
    [(topic, sent, _)] = producer.sent
    dead = AvroCodec().decode(sent, (DeadLettered,))
    assert isinstance(dead, DeadLettered) and topic.endswith("nexus.deadletter") and reason in dead.reason
    assert len(dead.raw_value) <= 64 * 1024 and dead.raw_size == len(raw or b"") and not provider.calls


@pytest.mark.asyncio
async def test_a_dispatch_that_breaks_the_worker_is_dead_lettered_and_its_offset_finished() -> None:
    class Exploding(ScriptedProvider):
        async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
            raise RuntimeError("adapter bug")

    producer, worker, d = RecordingProducer(), _worker(Exploding()), dispatch()
    offsets, tp = _Offsets(), TopicPartition("nexus.dispatch", 0)
    offsets.started(tp, 0)
    await worker.pending.acquire()
    await worker._run_one(_record(AvroCodec().encode(d), d.request_id.encode()), tp, producer, offsets)  # type: ignore[arg-type]
    [(topic, sent, _)] = producer.sent
    dead = AvroCodec().decode(sent, (DeadLettered,))
    assert isinstance(dead, DeadLettered) and "internal error: RuntimeError: adapter bug" in dead.reason
    assert offsets.committable() == {tp: 1}
