"""The decision agent run by faust's test_context(): no broker; output captured by a recording sink."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from nexuscore._clock import FixedClock
from nexuscore.core import decode_reservation, decode_state
from nexuscore.policy import SignedPolicy
from nexuscore.policy._promotion import Registry
from nexuscore.schemas import (
    AvroCodec,
    BudgetSettled,
    DeadLettered,
    DispatchRequested,
    Event,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ShadowDecisionRecorded,
)
from nexuscore.streams import PolicyHolder, Topics, build_decider
from tests.factories import POLICY, T0, request

pytestmark = pytest.mark.component
CODEC = AvroCodec()
TOPICS = Topics("component.")
ACTIVE = Registry().apply(SignedPolicy(POLICY, ()), "active")
HOLDER = PolicyHolder(ACTIVE)


class RecordingSink:
    """Stands where the agent's output topics would be."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Event]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, CODEC.decode(value)))

    def of(self, kind: type[Event]) -> list[tuple[str, bytes, Any]]:
        return [s for s in self.sent if isinstance(s[2], kind)]


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[tuple[Any, Any, RecordingSink]]:
    HOLDER.registry = ACTIVE
    sink = RecordingSink()
    app, agent = build_decider("127.0.0.1:1", HOLDER, FixedClock(T0), topics=TOPICS, sink=sink)
    app.finalize()
    app.conf.store = "memory://"
    async with agent.test_context() as ctx:
        yield app, ctx, sink
    # faust builds its Kafka consumer lazily with a private event loop for its thread; the thread never
    # starts without a broker, so nothing else would close that loop.
    consumer = app._consumer
    if consumer is not None and not consumer._thread.thread_loop.is_closed():
        consumer._thread.thread_loop.close()


@pytest.mark.asyncio
async def test_a_request_yields_its_decision_then_its_dispatch_and_reserves_budget(harness: Any) -> None:
    app, ctx, sink = harness
    req = request(feature="credit-memo", task_type="credit_decision", risk_class="high")
    await ctx.put(CODEC.encode(req), key=b"acme-bank")
    assert [type(s[2]) for s in sink.sent] == [RequestDecided, DispatchRequested]
    (topic, key, decided), (dtopic, dkey, dispatch) = sink.sent
    assert (topic, key) == (TOPICS.decisions, b"acme-bank")
    assert (dtopic, dkey) == (TOPICS.dispatch, req.request_id.encode())
    assert decided.policy_digest == POLICY.digest == dispatch.policy_digest
    assert dispatch.causation_id == decided.event_id and dispatch.region in decided.residency.allowed_regions
    state = decode_state(app.tables["budgets"][b"acme-bank"])
    assert state.window(T0.date().isoformat()).tenant_reserved == decided.budget.estimated_cost_micros
    held = decode_reservation(app.tables["reservations"][b"acme-bank\x1f" + req.request_id.encode()])
    assert held is not None and held.amount == decided.budget.estimated_cost_micros


@pytest.mark.asyncio
async def test_an_outcome_settles_the_reservation(harness: Any) -> None:
    app, ctx, sink = harness
    req = request()
    await ctx.put(CODEC.encode(req), key=b"acme-bank")
    dispatch = sink.of(DispatchRequested)[0][2]
    outcome = OutcomeRecorded(
        event_id="o-1", request_id=req.request_id, tenant_id="acme-bank", occurred_at=T0, producer="w",
        status="answered", feature=req.feature, deployment_id=dispatch.deployment_id, model=dispatch.model,
        model_version="v", region=dispatch.region, attempts=1, input_tokens=8, output_tokens=10, cost_micros=7,
        latency_ms=1.0, response="ok", finish_reason="stop",
    )  # fmt: skip
    await ctx.put(CODEC.encode(outcome), key=b"acme-bank")
    await ctx.put(CODEC.encode(outcome), key=b"acme-bank")  # redelivered: settles once
    settled = [s[2] for s in sink.of(BudgetSettled)]
    assert len(settled) == 1 and settled[0].actual_micros == 7
    state = decode_state(app.tables["budgets"][b"acme-bank"])
    window = state.window(T0.date().isoformat())
    assert (window.tenant_settled, window.tenant_reserved) == (7, 0)
    assert b"acme-bank\x1f" + req.request_id.encode() not in app.tables["reservations"]


@pytest.mark.asyncio
async def test_unknown_tenants_are_rejected_not_dropped(harness: Any) -> None:
    _, ctx, sink = harness
    await ctx.put(CODEC.encode(request(tenant_id="nobody")), key=b"nobody")
    [(_, _, rejected)] = sink.sent
    assert isinstance(rejected, RequestRejected) and rejected.reason_code == "unknown_tenant"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"acme-bank", b"garbage", "not Avro single-object encoding"),
        (b"acme-bank", None, "no value (a tombstone)"),
        (b"globex-insurance", CODEC.encode(request()), "is not the tenant id"),
    ],
)
async def test_bad_input_goes_to_the_dead_letters_and_the_agent_keeps_going(
    harness: Any, key: bytes, value: bytes, reason: str
) -> None:
    _, ctx, sink = harness
    await ctx.put(value, key=key)
    await ctx.put(CODEC.encode(request(request_id="after")), key=b"acme-bank")
    dead = sink.of(DeadLettered)
    assert len(dead) == 1
    topic, dkey, letter = dead[0]
    assert topic == TOPICS.deadletter and reason in letter.reason
    assert letter.raw_value == (value or b"") and letter.raw_key == key
    assert any(isinstance(s[2], RequestDecided) and s[2].request_id == "after" for s in sink.sent)


@pytest.mark.asyncio
async def test_a_promotion_is_taken_up_without_a_restart_and_a_shadow_is_recorded_not_enforced(
    harness: Any,
) -> None:
    app, ctx, sink = harness
    await ctx.put(CODEC.encode(request(request_id="before")), key=b"acme-bank")
    # A cheaper candidate: same policy, frontier prices cut, as a new digest.
    data = POLICY.model_dump(mode="json")
    data["version"] = "candidate"
    candidate = type(POLICY).model_validate(data)
    HOLDER.registry = ACTIVE.apply(SignedPolicy(candidate, ()), "shadow")
    await ctx.put(CODEC.encode(request(request_id="shadowed")), key=b"acme-bank")
    HOLDER.registry = HOLDER.registry.apply(SignedPolicy(candidate, ()), "canary", canary_share=0.999999)
    await ctx.put(CODEC.encode(request(request_id="canary")), key=b"acme-bank")
    decided = {e.request_id: e for _, _, e in sink.of(RequestDecided)}
    assert decided["before"].policy_digest == decided["shadowed"].policy_digest == POLICY.digest
    assert decided["before"].policy_stage == decided["shadowed"].policy_stage == "active"
    assert (decided["canary"].policy_digest, decided["canary"].policy_stage) == (candidate.digest, "canary")
    shadows = [e for _, _, e in sink.of(ShadowDecisionRecorded)]
    assert [s.request_id for s in shadows] == ["shadowed"]
    assert shadows[0].policy_digest == candidate.digest and shadows[0].active_digest == POLICY.digest
    assert (
        shadows[0].differs is False and shadows[0].deployment_id == decided["shadowed"].budget.deployment_id
    )
    # Only the active decision reserved budget: the shadow is never enforced.
    state = decode_state(app.tables["budgets"][b"acme-bank"])
    reserved = sum(d.budget.estimated_cost_micros for d in decided.values())
    assert state.window(T0.date().isoformat()).tenant_reserved == reserved
