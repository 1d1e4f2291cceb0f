"""The decision agent: decode, look up the tenant's budget state, call the core, emit, fold.

One agent consumes both ``nexus.requests`` and ``nexus.outcomes``. Both are keyed by tenant and have
the same partition count, so a tenant's requests and settlements reach the same agent instance in
log order and its budget Table entry is never raced.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import faust
import msgspec
from aiokafka.errors import KafkaError

from nexuscore.core import (
    BudgetState,
    Reservation,
    answer_to_keep,
    bump,
    decode_answer,
    decode_reservation,
    decode_state,
    decode_window,
    derive_id,
    encode_answer,
    encode_record,
    encode_window,
    observe,
    on_outcome,
    on_request,
    on_review,
    refusal_event,
    reserve,
    shadow_event,
)
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError
from nexuscore.policy import SIGNER_CODES, Refusal, TrustStore, check_review, judge_review
from nexuscore.schemas import (
    AvroCodec,
    DispatchRequested,
    Event,
    InferenceRequested,
    LatencyObservation,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
)
from nexuscore.streams._faust import IdempotentApp
from nexuscore.streams._governance import GovernanceFollower, PolicyHolder
from nexuscore.transport import DEFAULT_PARTITIONS, Topics, appended_at, dead_letter, decode_tenant_event

log = logging.getLogger(__name__)
PRODUCER = "nexuscore.decider"
_ANY_INPUT = (InferenceRequested, OutcomeRecorded, ReviewRecorded)
# How often each decider looks for escalations whose review deadline has passed.
DEADLINE_SCAN_S = 1.0


class EscalationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the decider knows of one escalation.

    Awaiting review: the request and its decision as they went out, and the deadline. A review can
    also arrive first: after a crash the request is decided again, possibly after the review that
    the first decision prompted; it is kept (``early_review``) and applied as soon as the request
    is escalated again. Once resolved, the record stays as a marker, so that a redelivered request
    or review changes nothing.
    """

    request: bytes = b""
    decided: bytes = b""
    deadline_us: int = 0
    early_review: bytes = b""
    resolved: bool = False
    # The review that resolved it and what that sent: sent again if the same review is redelivered.
    resolved_by: str = ""
    sent: list[tuple[str, bytes, bytes]] = msgspec.field(default_factory=list)


class DecidedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A request's decision as it went out, kept so that a redelivered request gets the very same
    events (a new decision against a moved budget could differ: denied once, dispatched the next
    time) and its budget effect is applied once. ``version_before`` is the tenant's budget-state
    version it was decided against: a state still at or below it never received the effect."""

    sent: list[tuple[str, bytes, bytes]]
    version_before: int
    reservation: bytes = b""
    # The outcome that settled it and the settlement sent: sent again if the outcome is redelivered.
    settled_by: str = ""
    settlement: list[tuple[str, bytes, bytes]] = msgspec.field(default_factory=list)


_decided_encoder = msgspec.msgpack.Encoder()
_decided_decoder = msgspec.msgpack.Decoder(DecidedRecord)
_escalation_encoder = msgspec.msgpack.Encoder()
_escalation_decoder = msgspec.msgpack.Decoder(EscalationRecord)


def _decided(data: bytes | None) -> DecidedRecord | None:
    return None if data is None else _decided_decoder.decode(data)


def _escalation(data: bytes | None) -> EscalationRecord | None:
    return None if data is None else _escalation_decoder.decode(data)


class Sink(Protocol):
    """Where the agent's output goes: Kafka topics in production, a recorder in component tests."""

    async def send(self, topic: str, key: bytes, value: bytes) -> None: ...


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def build_decider(
    bootstrap: str,
    holder: PolicyHolder,
    clock: Clock,
    *,
    follower: GovernanceFollower | None = None,
    topics: Topics = Topics(),
    partitions: int = DEFAULT_PARTITIONS,
    web_port: int = 0,
    store: str = "memory://",
    sink: Sink | None = None,
    trust: TrustStore | None = None,
) -> tuple[faust.App, Any]:
    """Build the faust app and its decision agent (returned for ``agent.test_context()``).

    ``holder`` says which policy decides each tenant (active, or a canary) and which is in shadow;
    ``follower`` keeps it current from the governance topic. ``sink`` replaces the topics the agent
    writes to; component tests pass a recording fake. ``trust`` holds the reviewers' keys (by
    default the follower's trust store): a review is applied only if ``judge_review`` accepts it.
    """
    reviewers = trust if trust is not None else (follower.trust if follower is not None else TrustStore())
    app = IdempotentApp(
        topics.group("nexuscore-decider"),
        broker=f"kafka://{bootstrap}",
        store=store,
        topic_partitions=partitions,
        web_enabled=False,
        # faust listens on its web port even with the web server disabled: never share 6066.
        web_port=web_port or _free_port(),
        producer_acks=-1,
        # Decisions are small and latency matters: send at once rather than wait to fill a batch.
        producer_linger=0.0,
        broker_commit_every=1000,
        # A decider that died without leaving its group holds its partitions until the session
        # times out: keep that short so a replacement takes over in seconds, not a minute.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        broker_commit_interval=0.25,
        # Outputs wait for their input's commit (which first puts the Table changes on the broker):
        # nothing goes out that a restart would decide differently.
        stream_publish_on_commit=True,
        stream_wait_empty=False,
        key_serializer="raw",
        value_serializer="raw",
        # faust keeps a data folder even with the memory store; keep it out of the working directory.
        datadir=str(Path(tempfile.gettempdir()) / "nexuscore-faust"),
    )
    # Bytes in, bytes out: decoding is ours (Avro), and faust's model layer would only add cost.
    raw: dict[str, Any] = {
        "key_type": bytes,
        "value_type": bytes,
        "key_serializer": "raw",
        "value_serializer": "raw",
    }

    # Totals per tenant, and each open reservation keyed by request. faust writes a table's changelog
    # to the partition of the event being processed, so both stay in the tenant's partition.
    def table(name: str) -> Any:
        return app.Table(name, partitions=partitions, key_type=bytes, value_type=bytes)

    budgets, reservations = table("budgets"), table("reservations")
    # Escalated requests awaiting review; latency windows per (partition, deployment, strategy);
    # answers kept for offline mode, keyed by tenant first. faust writes a change to the changelog
    # partition of the event being processed, so a key must only ever be written from one
    # partition: the latency windows are per input partition for that reason.
    escalations, latency, answers = table("escalations"), table("latency"), table("answers")
    decided_requests = table("decided")
    inputs = app.topic(topics.requests, topics.outcomes, topics.reviews, **raw)
    out_topics = {
        name: app.topic(name, **raw)
        for name in (topics.decisions, topics.dispatch, topics.deadletter, topics.outcomes, topics.reviews)
    }
    expected: dict[str, tuple[type[Event], ...]] = {
        topics.requests: (InferenceRequested,),
        topics.outcomes: (OutcomeRecorded,),
        topics.reviews: (ReviewRecorded,),
    }

    async def send_to_topic(topic: str, key: bytes, value: bytes) -> None:
        await out_topics[topic].send(key=key, value=value)

    send = sink.send if sink is not None else send_to_topic
    codec = AvroCodec()

    def review(
        state: BudgetState,
        request: InferenceRequested,
        escalated: RequestDecided,
        event: ReviewRecorded,
        now: datetime,
        partition: int = 0,
    ) -> tuple[BudgetState, Reservation | None, list[Event]]:
        return on_review(
            state,
            request,
            escalated,
            event,
            holder.registry.for_tenant(event.tenant_id).policy,
            PRODUCER,
            now,
            controls=holder.controls,
            latency=lambda d, s: _observed(latency, partition, d, s),
        )

    async def process(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        timestamp_ms: int | None = None,
    ) -> None:
        """One input inside a boundary: what cannot be processed becomes a dead letter with its
        reason, and the agent goes on (a failure of the broker itself still stops it)."""
        try:
            event = decode_tenant_event(codec, key, value, expected.get(topic, _ANY_INPUT))
        except DecodeError as exc:
            await reject(topic, partition, offset, key, value, str(exc))
            return
        try:
            await decide_one(event, topic, partition, offset, value, appended_at(timestamp_ms, clock.now()))
        except (KafkaError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001  # no input may stop the decider
            log.exception("could not process %s[%d]@%d", topic, partition, offset)
            await reject(topic, partition, offset, key, value, f"internal error: {type(exc).__name__}: {exc}")

    async def reject(
        topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
    ) -> None:
        dl = dead_letter(topic, partition, offset, key, value, reason, PRODUCER, clock.now())
        await send(topics.deadletter, topic.encode(), codec.encode(dl))

    async def refuse(
        act: ReviewRecorded, refusal: Refusal, source: tuple[str, int, int], now: datetime
    ) -> None:
        log.warning("review %s of %s refused: %s", act.event_id, act.request_id, refusal)
        if refusal.code in SIGNER_CODES:
            return  # the projector records these from the reviews topic: one refusal per act
        refused = refusal_event(act, refusal, source, PRODUCER, now)
        await send(topics.decisions, act.tenant_id.encode(), codec.encode(refused))

    async def decide_one(
        event: Event, topic: str, partition: int, offset: int, value: bytes | None, appended: datetime
    ) -> None:
        source = (topic, partition, offset)
        tenant, now = event.tenant_id.encode(), clock.now()
        state = decode_state(budgets.get(tenant))
        # Request ids come from clients: scope them by tenant.
        request_key = tenant + b"\x1f" + event.request_id.encode()
        held = decode_reservation(reservations.get(request_key))

        def observed(deployment: str, strategy: str) -> LatencyObservation | None:
            return _observed(latency, partition, deployment, strategy)

        controls = holder.controls
        if isinstance(event, InferenceRequested) and (memo := decided_requests.get(request_key)) is not None:
            await redeliver(_decided_decoder.decode(memo), state, tenant, request_key)
            return
        sent: list[tuple[str, bytes, bytes]] = []
        if isinstance(event, InferenceRequested):
            registry = holder.registry
            serving = registry.for_tenant(event.tenant_id)
            new_state, reservation, out = on_request(
                state,
                event,
                serving.policy,
                PRODUCER,
                now,
                held,
                serving.stage,
                controls=controls,
                latency=observed,
                answers=lambda key: decode_answer(answers.get(key)),
            )
            if registry.shadow is not None:
                decided = out[0]
                assert isinstance(decided, RequestDecided | RequestRejected)
                out.append(shadow_event(state, event, registry.shadow.policy, decided, PRODUCER, now, held))
            decided = out[0]
            record = _escalation(escalations.get(request_key))
            if (
                isinstance(decided, RequestDecided)
                and decided.verdict == "escalated"
                and (record is None or not record.resolved)
            ):
                deadline = decided.review_deadline
                pending = EscalationRecord(
                    request=value or b"",
                    decided=codec.encode(decided),
                    deadline_us=int(deadline.timestamp() * 1_000_000) if deadline else 0,
                )
                early = _early_review(record)
                # Its signature and freshness were checked when it arrived; what it answers, now.
                refused = early and judge_review(
                    early, decided.event_id, decided.review_deadline, reviewers, early.occurred_at
                )
                if early is not None and not refused:
                    new_state, reservation, resolved = review(
                        new_state, event, decided, early, now, partition
                    )
                    out.extend(resolved)
                    escalations[request_key] = _escalation_encoder.encode(
                        EscalationRecord(resolved=True, resolved_by=early.event_id)
                    )
                else:
                    if early is not None and isinstance(refused, Refusal):
                        await refuse(early, refused, ("early-review", partition, offset), now)
                    escalations[request_key] = _escalation_encoder.encode(pending)
        elif isinstance(event, ReviewRecorded):
            record = _escalation(escalations.get(request_key))
            if record is not None and record.resolved:
                if record.resolved_by == event.event_id:
                    await resend(record.sent)  # the same review again: its outputs may not be out
                else:
                    await refuse(
                        event, Refusal("not_pending", "the escalation was resolved already"), source, now
                    )
                return
            if record is None or not record.request:
                await hold_early_review(event, record, request_key, value, source, now, appended)
                return
            request = codec.decode(record.request, (InferenceRequested,))
            escalated = codec.decode(record.decided, (RequestDecided,))
            assert isinstance(request, InferenceRequested) and isinstance(escalated, RequestDecided)
            refused = judge_review(event, escalated.event_id, escalated.review_deadline, reviewers, appended)
            if refused is not None:
                await refuse(event, refused, source, now)
                return
            new_state, reservation, out = review(state, request, escalated, event, now, partition)
            held = None
        else:
            assert isinstance(event, OutcomeRecorded)
            if held is None:
                memo = _decided(decided_requests.get(request_key))
                if memo is not None and memo.settled_by == event.event_id:
                    await resend(memo.settlement)  # the same outcome again: its settlement may not be out
                    return
            new_state, out = on_outcome(state, held, event, PRODUCER, now)
            reservation = None
            kept = answer_to_keep(event, held)
            if kept is not None:
                answers[kept[0]] = encode_answer(kept[1])
            if held is not None and event.status == "answered" and not event.cached and event.decode_strategy:
                key = _latency_key(partition, event.deployment_id, event.decode_strategy)
                latency[key] = encode_window(observe(decode_window(latency.get(key)), event.latency_ms, now))
        # The decision goes out before the dispatch that acts on it (same producer, in order).
        for e in out:
            if isinstance(e, DispatchRequested):
                sent.append((topics.dispatch, e.request_id.encode(), codec.encode(e)))
            elif isinstance(e, OutcomeRecorded):
                sent.append((topics.outcomes, tenant, codec.encode(e)))
            else:
                sent.append((topics.decisions, tenant, codec.encode(e)))
        await resend(sent)
        if isinstance(event, ReviewRecorded):
            escalations[request_key] = _escalation_encoder.encode(
                EscalationRecord(resolved=True, resolved_by=event.event_id, sent=sent)
            )
        elif isinstance(event, OutcomeRecorded) and held is not None:
            memo = _decided(decided_requests.get(request_key))
            if memo is not None:
                settled = msgspec.structs.replace(memo, settled_by=event.event_id, settlement=sent)
                decided_requests[request_key] = _decided_encoder.encode(settled)
        # Outputs are published when the input's offset is committed, after every Table change
        # before it is on the broker (see nexuscore.streams._faust). The Tables are still not
        # updated atomically with each other: the decision record goes first, the budget last.
        if isinstance(event, InferenceRequested) and held is None:
            decided_requests[request_key] = _decided_encoder.encode(
                DecidedRecord(
                    sent=sent,
                    version_before=state.version,
                    reservation=encode_record(reservation) if reservation is not None else b"",
                )
            )
        if reservation is not None and held is None:
            reservations[request_key] = encode_record(reservation)
        elif reservation is None and held is not None:
            del reservations[request_key]
        if new_state is not state:
            budgets[tenant] = encode_record(new_state)

    async def hold_early_review(
        event: ReviewRecorded,
        record: EscalationRecord | None,
        request_key: bytes,
        value: bytes | None,
        source: tuple[str, int, int],
        now: datetime,
        appended: datetime,
    ) -> None:
        """A review of an escalation not (yet) known here: after a crash its request may be decided
        again after this review. The first signed one is kept until then; anything else (a
        timeout, a forgery, a second review) is refused, so no one can fill the Table with them."""
        if record is not None or event.action == "timed_out":
            await refuse(
                event, Refusal("not_pending", "no escalation of this request awaits review"), source, now
            )
            return
        signer = check_review(event, reviewers, appended)
        if isinstance(signer, Refusal):
            await refuse(event, signer, source, now)
            return
        log.warning("review %s of %s arrived before its escalation: kept", event.event_id, event.request_id)
        escalations[request_key] = _escalation_encoder.encode(EscalationRecord(early_review=value or b""))

    async def resend(sent: list[tuple[str, bytes, bytes]]) -> None:
        for out_topic, out_key, out_value in sent:
            await send(out_topic, out_key, out_value)

    async def redeliver(memo: DecidedRecord, state: BudgetState, tenant: bytes, request_key: bytes) -> None:
        """A request decided before: the same events again, and its budget effect if it was lost."""
        await resend(memo.sent)
        if state.version > memo.version_before:
            return  # its effect is in the state already
        reservation = decode_reservation(memo.reservation) if memo.reservation else None
        if reservation is not None:
            reservations[request_key] = encode_record(reservation)
            budgets[tenant] = encode_record(reserve(state, reservation))
        else:
            budgets[tenant] = encode_record(bump(state))

    timed_out: set[bytes] = set()

    @app.timer(interval=DEADLINE_SCAN_S)  # type: ignore[untyped-decorator]  # faust ships no type information
    async def end_overdue_reviews() -> None:
        """Put a timeout review on the topic for each escalation past its deadline: the agent then
        ends it in order with any review a person sends (whichever comes first wins)."""
        now = clock.now()
        now_us = int(now.timestamp() * 1_000_000)
        pending_now = list(escalations.items())
        timed_out.intersection_update(k for k, v in pending_now if not _escalation_decoder.decode(v).resolved)
        for key, raw in pending_now:
            pending = _escalation_decoder.decode(raw)
            if pending.resolved or not pending.request:
                continue
            if not pending.deadline_us or pending.deadline_us > now_us or key in timed_out:
                continue
            escalated = codec.decode(pending.decided, (RequestDecided,))
            assert isinstance(escalated, RequestDecided)
            review = ReviewRecorded(
                event_id=derive_id(escalated.request_id, escalated.tenant_id, "review-timeout"),
                request_id=escalated.request_id,
                tenant_id=escalated.tenant_id,
                occurred_at=now,
                producer=PRODUCER,
                causation_id=escalated.event_id,
                trace_id=escalated.trace_id,
                policy_digest=escalated.policy_digest,
                action="timed_out",
                reviewer=PRODUCER,
                reason="no review before the deadline",
                deadline=escalated.review_deadline,
            )
            await out_topics[topics.reviews].send(
                key=escalated.tenant_id.encode(), value=codec.encode(review)
            )
            timed_out.add(key)

    if follower is not None:

        @app.task  # type: ignore[untyped-decorator]  # faust ships no type information
        async def follow_governance() -> None:
            await follower.follow()

    @app.agent(inputs)
    async def decide(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            stamp = int(m.timestamp * 1000) if m.timestamp is not None else None
            await process(m.topic, m.partition, m.offset, m.key, m.value, stamp)

    return app, decide


def _early_review(record: EscalationRecord | None) -> ReviewRecorded | None:
    if record is None or not record.early_review:
        return None
    early = _codec.decode(record.early_review, (ReviewRecorded,))
    assert isinstance(early, ReviewRecorded)
    return early


_codec = AvroCodec()


def _observed(latency: Any, partition: int, deployment: str, strategy: str) -> LatencyObservation | None:
    w = decode_window(latency.get(_latency_key(partition, deployment, strategy)))
    if not w.samples:
        return None
    return LatencyObservation(
        deployment_id=deployment, strategy=strategy, p50_ms=w.p50_ms, p95_ms=w.p95_ms, samples=w.samples
    )


def _latency_key(partition: int, deployment: str, strategy: str) -> bytes:
    return f"{partition}\x1f{deployment}\x1f{strategy}".encode()
