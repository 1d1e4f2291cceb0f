"""The decision agent run by faust's test_context(): no broker; output captured by a recording sink."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import fastavro
import msgspec
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.core import DECIDER, decode_reservation, decode_state, derive_id, timeout_review
from nexuscore.core._latency import MIN_SAMPLES
from nexuscore.core._timeout import TIMEOUT_REASON
from nexuscore.kernel.clock import FixedClock
from nexuscore.policy import Controls, SignedPolicy, TrustStore, sign_review, trusted_key_entry
from nexuscore.policy._promotion import Registry
from nexuscore.schemas import (
    ActRefused,
    AvroCodec,
    BudgetSettled,
    DeadLettered,
    DispatchRequested,
    EscalationResolved,
    Event,
    KillSwitchChanged,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
    ShadowDecisionRecorded,
    schema_for,
)
from nexuscore.streams import PolicyHolder, build_decider
from nexuscore.transport import Topics
from tests.factories import POLICY, T0, request

pytestmark = pytest.mark.component
CODEC = AvroCodec()
TOPICS = Topics("component.")
ACTIVE = Registry().apply(SignedPolicy(POLICY, ()), "active")
HOLDER = PolicyHolder(ACTIVE)
CLOCK = FixedClock(T0)
REVIEWER = Ed25519PrivateKey.from_private_bytes(bytes([7]) * 32)
TRUST = TrustStore(keys=(trusted_key_entry(REVIEWER.public_key(), "carol@acme-bank", ("reviewer",)),))


def _switch(scope: str, target: str, mode: str) -> KillSwitchChanged:
    return KillSwitchChanged(
        event_id=f"k-{scope}-{mode}", request_id="", tenant_id="", occurred_at=T0, producer="t", scope=scope,
        target=target, mode=mode, actor="dana@ops", reason="provider outage",
    )  # fmt: skip


class RecordingSink:
    """Stands where the agent's output topics would be."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, Event]] = []

    async def send(self, topic: str, key: bytes, value: bytes) -> None:
        self.sent.append((topic, key, CODEC.decode(value)))

    def of(self, kind: type[Event]) -> list[tuple[str, bytes, Any]]:
        return [s for s in self.sent if isinstance(s[2], kind)]


class BrokerStamped:
    """Puts records stamped with the test clock's time, as the broker stamps the decider's inputs
    (LogAppendTime): the decider takes its time from the record."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    async def put(self, value: bytes, key: bytes, timestamp: float | None = None) -> None:
        stamp = CLOCK.at.timestamp() if timestamp is None else timestamp
        await self.ctx.put(value, key=key, timestamp=stamp)


@pytest_asyncio.fixture
async def harness() -> AsyncIterator[tuple[Any, Any, RecordingSink]]:
    HOLDER.registry = ACTIVE
    HOLDER.controls = Controls()
    CLOCK.at = T0
    sink = RecordingSink()
    app, agent = build_decider("127.0.0.1:1", HOLDER, CLOCK, topics=TOPICS, sink=sink, trust=TRUST)
    app.finalize()
    app.conf.store = "memory://"
    async with agent.test_context() as ctx:
        yield app, BrokerStamped(ctx), sink
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
    # The settlement is sent again, the same event (the evidence keeps one), the budget moved once.
    assert len(settled) == 2 and settled[0] == settled[1] and settled[0].actual_micros == 7
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


def _review(
    req_id: str,
    action: str,
    at: datetime = T0,
    key: Ed25519PrivateKey = REVIEWER,
    reviewer: str = "carol@acme-bank",
) -> ReviewRecorded:
    """A reviewer's signed review of the escalation of ``req_id`` (its decision's id is derived)."""
    return sign_review(ReviewRecorded(
        event_id=f"review-{req_id}-{action}", request_id=req_id, tenant_id="acme-bank", occurred_at=at,
        causation_id=derive_id("acme-bank", req_id, "decision"), producer="nexuscore.review", action=action,  # type: ignore[arg-type]  # one of the three
        reviewer=reviewer, reason=f"{action}: memo checked",
    ), key)  # fmt: skip


async def put_review(ctx: Any, review: ReviewRecorded, appended: datetime | None = None) -> None:
    """As the broker would append it: the reviews topic's timestamps are the broker's clock."""
    at = appended or review.occurred_at
    await ctx.put(CODEC.encode(review), key=review.tenant_id.encode(), timestamp=at.timestamp())


def _outcome(
    dispatch: DispatchRequested, *, latency_ms: float = 1.0, response: str = "ok"
) -> OutcomeRecorded:
    return OutcomeRecorded(
        event_id=f"o-{dispatch.request_id}", request_id=dispatch.request_id, tenant_id=dispatch.tenant_id,
        occurred_at=T0, producer="w", policy_digest=dispatch.policy_digest, status="answered",
        feature=dispatch.feature, deployment_id=dispatch.deployment_id, model=dispatch.model, model_version="v",
        region=dispatch.region, attempts=1, input_tokens=8, output_tokens=10, cost_micros=7,
        latency_ms=latency_ms, response=response, finish_reason="stop", decode_strategy=dispatch.decode_strategy,
    )  # fmt: skip


@pytest.mark.asyncio
async def test_an_approved_escalation_resumes_and_a_denied_one_ends_with_the_reviewer_recorded(
    harness: Any,
) -> None:
    app, ctx, sink = harness
    for rid in ("crit-1", "crit-2"):
        await ctx.put(CODEC.encode(request(request_id=rid, risk_class="critical")), key=b"acme-bank")
    escalated = [e for _, _, e in sink.of(RequestDecided)]
    assert [e.verdict for e in escalated] == ["escalated", "escalated"]
    assert escalated[0].review_deadline == T0 + timedelta(seconds=POLICY.escalation[0].review_deadline_s or 0)
    assert not sink.of(DispatchRequested)  # nothing goes to a model before a person decides
    assert len(app.tables["escalations"]) == 2

    await put_review(ctx, _review("crit-1", "approved"))
    await put_review(ctx, _review("crit-2", "denied"))
    await put_review(ctx, _review("crit-2", "approved"))  # too late: already ended
    [(_, _, refused)] = sink.of(ActRefused)  # and recorded as such
    assert (refused.act, refused.code, refused.act_event_id) == (
        "review",
        "not_pending",
        "review-crit-2-approved",
    )
    resolved = {e.request_id: e for _, _, e in sink.of(EscalationResolved)}
    assert set(resolved) == {"crit-1", "crit-2"}
    assert resolved["crit-1"].resolution == "dispatched" and resolved["crit-1"].reviewer == "carol@acme-bank"
    assert resolved["crit-2"].resolution == "denied" and "memo checked" in resolved["crit-2"].verdict_reason
    [(_, _, dispatch)] = sink.of(DispatchRequested)
    assert dispatch.request_id == "crit-1" and dispatch.causation_id == resolved["crit-1"].event_id
    # The approved request holds its budget now; nothing awaits review any more.
    state = decode_state(app.tables["budgets"][b"acme-bank"])
    assert state.window(T0.date().isoformat()).tenant_reserved == dispatch.estimated_cost_micros
    assert all(b"resolved" in v for v in app.tables["escalations"].values())  # markers only


@pytest.mark.asyncio
async def test_a_review_that_overtakes_its_redecided_request_is_applied_when_the_request_comes(
    harness: Any,
) -> None:
    # After a crash, the request that prompted a review may be decided again after the review.
    _, ctx, sink = harness
    await put_review(ctx, _review("crit-4", "approved"))
    assert not sink.sent
    crit = request(request_id="crit-4", risk_class="critical")
    await ctx.put(CODEC.encode(crit), key=b"acme-bank")
    first = list(sink.sent)
    await ctx.put(CODEC.encode(crit), key=b"acme-bank")  # and once more, redelivered
    kinds = [type(e).__name__ for _, _, e in first]
    assert kinds == ["RequestDecided", "EscalationResolved", "DispatchRequested"]
    assert sink.sent == first + first  # the very same events again, nothing decided anew
    (_, _, resolved), _ = sink.of(EscalationResolved)
    assert resolved.resolution == "dispatched" and resolved.review_event_id == "review-crit-4-approved"


@pytest.mark.asyncio
async def test_an_escalation_past_its_deadline_ends_as_timed_out_even_if_approved_late(
    harness: Any,
) -> None:
    app, ctx, sink = harness
    await ctx.put(CODEC.encode(request(request_id="crit-3", risk_class="critical")), key=b"acme-bank")
    [(_, _, escalated)] = sink.of(RequestDecided)
    CLOCK.at = escalated.review_deadline + timedelta(seconds=1)
    await put_review(ctx, _review("crit-3", "approved", CLOCK.at))
    [(_, _, resolved)] = sink.of(EscalationResolved)
    assert resolved.resolution == "timed_out" and not sink.of(DispatchRequested)


@pytest.mark.asyncio
async def test_a_kill_switch_denies_then_offline_mode_answers_from_the_cache_marked_cached(
    harness: Any,
) -> None:
    _, ctx, sink = harness
    first = request(request_id="warm", data_classification="internal")
    await ctx.put(CODEC.encode(first), key=b"acme-bank")
    [(_, _, dispatch)] = sink.of(DispatchRequested)
    await ctx.put(CODEC.encode(_outcome(dispatch, response="the kept answer")), key=b"acme-bank")

    HOLDER.controls = Controls().apply(_switch("tenant", "acme-bank", "off"))
    await ctx.put(CODEC.encode(request(request_id="off-1")), key=b"acme-bank")
    HOLDER.controls = Controls().apply(_switch("global", "", "offline"))
    same_prompt = msgspec.structs.replace(first, request_id="offline-hit", event_id="e-offline-hit")
    await ctx.put(CODEC.encode(same_prompt), key=b"acme-bank")
    await ctx.put(CODEC.encode(request(request_id="offline-miss", prompt="never asked")), key=b"acme-bank")
    tools = request(request_id="offline-tools", prompt=first.prompt, required_capabilities=["tools"])
    await ctx.put(CODEC.encode(tools), key=b"acme-bank")

    decided = {e.request_id: e for _, _, e in sink.of(RequestDecided)}
    assert decided["off-1"].verdict == "denied" and decided["off-1"].verdict_reason.startswith("kill_switch:")
    assert decided["offline-hit"].verdict == "dispatch"
    assert decided["offline-hit"].verdict_reason.startswith("offline: answered from the cache (request warm")
    assert (
        decided["offline-miss"].verdict == "denied"
        and "no cached answer" in decided["offline-miss"].verdict_reason
    )
    assert (
        decided["offline-tools"].verdict == "denied"
        and "tools are disabled" in decided["offline-tools"].verdict_reason
    )
    [(topic, _, cached)] = [s for s in sink.of(OutcomeRecorded)]
    assert topic == TOPICS.outcomes and cached.request_id == "offline-hit"
    assert (cached.cached, cached.cached_from, cached.response, cached.cost_micros) == (
        True,
        "warm",
        "the kept answer",
        0,
    )
    assert [d.request_id for _, _, d in sink.of(DispatchRequested)] == ["warm"]  # no model was called offline


@pytest.mark.asyncio
async def test_the_latency_controller_predicts_from_observed_calls_once_it_has_enough(harness: Any) -> None:
    _, ctx, sink = harness
    for n in range(MIN_SAMPLES + 1):
        await ctx.put(
            CODEC.encode(request(request_id=f"lat-{n}", data_classification="confidential")), key=b"acme-bank"
        )
        dispatch = sink.of(DispatchRequested)[-1][2]
        await ctx.put(CODEC.encode(_outcome(dispatch, latency_ms=9000.0 + n)), key=b"acme-bank")
    decisions = [e for _, _, e in sink.of(RequestDecided)]
    first, last = decisions[0], decisions[-1]
    assert first.decode.basis == "policy" and first.decode.fits_slo
    slow = first.budget.deployment_id
    assert all(d.budget.deployment_id == slow for d in decisions[:MIN_SAMPLES])
    # Once the window holds enough calls its p95 predicts: the slow deployment no longer fits the
    # SLO, and the controller moves to the next deployment of the failover chain, recording why.
    [seen] = [o for o in last.decode.observations if o.deployment_id == slow]
    assert seen.samples == MIN_SAMPLES and seen.p95_ms >= 9000
    assert last.budget.deployment_id != slow and last.decode.fits_slo
    assert any(r.subject == slow and r.stage == "decode" and "(observed)" in r.detail for r in last.reasons)


@pytest.mark.asyncio
async def test_a_redelivered_request_gets_its_first_decision_again_and_reserves_once(harness: Any) -> None:
    app, ctx, sink = harness
    tight = request(request_id="tight", tenant_id="initech-payments", feature="fraud-review")
    await ctx.put(CODEC.encode(tight), key=b"initech-payments")
    first = list(sink.sent)
    reserved = decode_state(app.tables["budgets"][b"initech-payments"])
    await ctx.put(CODEC.encode(tight), key=b"initech-payments")
    assert sink.sent == first + first
    assert decode_state(app.tables["budgets"][b"initech-payments"]) == reserved


@pytest.mark.asyncio
async def test_a_redelivered_review_or_outcome_sends_what_it_sent_the_first_time(harness: Any) -> None:
    # A crash after a Table change reached the broker but before the outputs went out (they wait
    # for the commit) redelivers the input: its outputs must go out then, identical.
    _, ctx, sink = harness
    await ctx.put(CODEC.encode(request(request_id="crit-5", risk_class="critical")), key=b"acme-bank")
    approval = _review("crit-5", "approved")
    await put_review(ctx, approval)
    resolved = sink.sent[1:]
    assert [type(e).__name__ for _, _, e in resolved] == ["EscalationResolved", "DispatchRequested"]
    await put_review(ctx, approval)
    assert sink.sent[3:] == resolved
    other = _review("crit-5", "denied")
    await put_review(ctx, other)  # a different, later review: refused, nothing else
    assert len(sink.sent) == 6 and sink.of(ActRefused)[0][2].code == "not_pending"

    plain = request(request_id="plain")
    await ctx.put(CODEC.encode(plain), key=b"acme-bank")
    dispatch = sink.of(DispatchRequested)[-1][2]
    outcome = _outcome(dispatch)
    await ctx.put(CODEC.encode(outcome), key=b"acme-bank")
    settled = sink.of(BudgetSettled)
    await ctx.put(CODEC.encode(outcome), key=b"acme-bank")
    assert sink.of(BudgetSettled) == settled + settled


@pytest.mark.asyncio
async def test_forged_reviews_are_refused_as_evidence_and_the_escalation_stays_pending(harness: Any) -> None:
    # Finding: an unsigned "approved" review with any reviewer name resumed an escalated request.
    app, ctx, sink = harness
    await ctx.put(CODEC.encode(request(request_id="crit-6", risk_class="critical")), key=b"acme-bank")
    mallory = Ed25519PrivateKey.from_private_bytes(bytes([9]) * 32)
    genuine = _review("crit-6", "approved")
    forgeries = {
        "unsigned": msgspec.structs.replace(genuine, event_id="f1", key_id="", signature=""),
        "unknown_key": _review("crit-6", "approved", key=mallory, reviewer="carol@acme-bank"),
        "actor_mismatch": _review("crit-6", "approved", reviewer="the-ceo"),
        "bad_signature": msgspec.structs.replace(genuine, event_id="f4", reason="approve everything"),
        "wrong_escalation": sign_review(
            msgspec.structs.replace(genuine, event_id="f5", causation_id="other"), REVIEWER
        ),
        # A timeout is unsigned. One not shaped as the deciders write it, or appended before the
        # deadline it names, is the projector's to record (tests/unit/test_refusals_evidence.py);
        # one that names an earlier deadline than the escalation's is the decider's.
        "invalid": msgspec.structs.replace(
            genuine, event_id="f6", action="timed_out", key_id="", signature=""
        ),
        "early": timeout_review(sink.of(RequestDecided)[0][2], T0),
        "not_due": msgspec.structs.replace(timeout_review(sink.of(RequestDecided)[0][2], T0), deadline=T0),
    }
    for forged in forgeries.values():
        await put_review(ctx, forged)
    # A genuine review replayed long after it was signed is stale.
    await put_review(ctx, genuine, appended=T0 + timedelta(hours=1))
    # The decider records what only its state can judge; the projector records the signature
    # failures from the reviews topic (tests/unit/test_refusals_evidence.py), one refusal per act.
    codes = [e.code for _, _, e in sink.of(ActRefused)]
    assert codes == ["wrong_escalation", "not_due"]
    assert not sink.of(EscalationResolved) and not sink.of(DispatchRequested)
    await put_review(ctx, genuine)  # the reviewer's own, fresh: applied
    [(_, _, resolved)] = sink.of(EscalationResolved)
    assert resolved.resolution == "dispatched" and resolved.reviewer == "carol@acme-bank"


@pytest.mark.asyncio
async def test_an_early_forged_review_is_not_kept_so_the_table_cannot_be_filled(harness: Any) -> None:
    app, ctx, sink = harness
    unsigned = msgspec.structs.replace(_review("crit-7", "approved"), key_id="", signature="")
    await put_review(ctx, unsigned)
    timeout = msgspec.structs.replace(  # as the deciders write one, its deadline passed
        unsigned, event_id=derive_id("crit-7", "acme-bank", "review-timeout"), action="timed_out",
        producer=DECIDER, reviewer=DECIDER, reason=TIMEOUT_REASON, deadline=T0 - timedelta(minutes=1),
    )  # fmt: skip
    await put_review(ctx, timeout)
    await put_review(ctx, msgspec.structs.replace(timeout, reason="forged"))  # "invalid": the projector's
    assert [e.code for _, _, e in sink.of(ActRefused)] == ["not_pending"]  # "unsigned": the projector's
    assert len(app.tables["escalations"]) == 0


@pytest.mark.asyncio
async def test_two_tenants_may_use_the_same_request_id_without_any_id_colliding(harness: Any) -> None:
    _, ctx, sink = harness
    await ctx.put(CODEC.encode(request(request_id="same", event_id="e-same")), key=b"acme-bank")
    other = request(
        request_id="same", event_id="e-same", tenant_id="globex-insurance", feature="claims-triage"
    )
    await ctx.put(CODEC.encode(other), key=b"globex-insurance")
    ids = [e.event_id for _, _, e in sink.sent]
    assert len(ids) == len(set(ids)) and {e.tenant_id for _, _, e in sink.sent} == {
        "acme-bank",
        "globex-insurance",
    }


@pytest.mark.asyncio
async def test_a_request_id_that_is_empty_or_too_long_is_dead_lettered(harness: Any) -> None:
    _, ctx, sink = harness
    for bad in ("", "x" * 129, "tab\there"):
        value = _encode_unchecked(request(request_id="ok"), request_id=bad)
        await ctx.put(value, key=b"acme-bank")
    dead = [e for _, _, e in sink.of(DeadLettered)]
    assert len(dead) == 3 and all("request_id" in d.reason for d in dead)
    assert not sink.of(RequestDecided)


def _encode_unchecked(event: Event, **changes: Any) -> bytes:
    """Encode with fields the Struct would refuse (what a hostile producer can put on the wire)."""
    record = {**msgspec.to_builtins(event, builtin_types=(datetime, bytes)), **changes}
    record.pop("event_type", None)
    parsed = fastavro.parse_schema(schema_for(type(event)))
    out = io.BytesIO()
    fastavro.schemaless_writer(out, parsed, record)
    header = CODEC.encode(event)[:10]  # magic and fingerprint of the same schema
    return header + out.getvalue()


@pytest.mark.asyncio
async def test_nothing_near_the_broker_limit_stops_the_decider_or_becomes_an_event_over_it(
    harness: Any,
) -> None:
    # Finding 3: non-Avro bytes just under 1 MiB made a dead letter over the producer's limit, and a
    # request within the token limit (four characters a token) could make a dispatch over 1 MiB.
    _, ctx, sink = harness
    await ctx.put(b"\xc3\x01" + b"\x00" * 1_040_000, key=b"acme-bank")
    wide = request(request_id="wide", prompt="\U0001d11e" * 150_000)  # 600 KB of UTF-8, 37,500 tokens
    await ctx.put(CODEC.encode(wide), key=b"acme-bank")
    await ctx.put(CODEC.encode(request(request_id="after")), key=b"acme-bank")
    [(_, _, dead)] = sink.of(DeadLettered)
    assert dead.raw_size == 1_040_002 and len(dead.raw_value) == 64 * 1024 and len(dead.raw_sha256) == 64
    rejected = {e.request_id: e for _, _, e in sink.of(RequestRejected)}
    assert rejected["wide"].reason_code == "request_too_large"
    assert [d.request_id for _, _, d in sink.of(DispatchRequested)] == ["after"]  # and it went on
    assert max(len(CODEC.encode(e)) for _, _, e in sink.sent) < 1024 * 1024
