"""The decider's handlers: one per input type, over its state, calling the pure core.

``Decider`` is the decision agent without its runtime: ``process`` takes one message (topic,
partition, offset, key, value, the broker's timestamp), decodes it inside a boundary, and hands it
to ``on_request``, ``on_review`` or ``on_outcome``; ``overdue_reviews`` is the deadline timer's
work. State lives in ``DeciderTables`` (faust Tables in production, plain dicts in a test) and
outputs go to a ``Sink``, so a component test drives every path through this one interface.

A tenant's requests, outcomes and reviews are keyed by tenant and reach one instance in log order,
so its budget entry is never raced. Outputs of one input go out in order: the decision before the
dispatch that acts on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, MutableMapping
from datetime import datetime
from typing import Protocol

import msgspec
from aiokafka.errors import KafkaError

from nexuscore.core import (
    DECIDER,
    BudgetState,
    LatencyWindow,
    Reservation,
    answer_to_keep,
    bump,
    decode_answer,
    decode_reservation,
    decode_state,
    decode_window,
    encode_answer,
    encode_record,
    encode_window,
    judge_timeout,
    observe,
    on_outcome,
    on_request,
    on_review,
    refusal_event,
    reserve,
    shadow_event,
    timeout_review,
)
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError
from nexuscore.observe import Headers, Tally, output_span, with_trace
from nexuscore.policy import SIGNER_CODES, Refusal, TrustStore, check_review, judge_review
from nexuscore.schemas import (
    AvroCodec,
    BudgetSettled,
    DispatchRequested,
    Event,
    InferenceRequested,
    LatencyObservation,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
)
from nexuscore.streams._governance import PolicyHolder
from nexuscore.streams._records import (
    DecidedRecord,
    EscalationRecord,
    Sent,
    decided_record,
    early_review,
    encode_decided,
    encode_escalation,
    escalation_record,
)
from nexuscore.streams._recovery import Cause, InputKind
from nexuscore.streams._retention import Retention
from nexuscore.transport import DeciderTable, Topics, appended_at, dead_letter, decode_tenant_event

log = logging.getLogger(__name__)
PRODUCER = DECIDER
_ANY_INPUT = (InferenceRequested, OutcomeRecorded, ReviewRecorded)
# The decider's span over one input, named by its first output (anything else answers a review).
_SPAN_NAMES: dict[type[Event], str] = {
    RequestDecided: "decide",
    RequestRejected: "decide",
    BudgetSettled: "settle",
}
Table = MutableMapping[bytes, bytes]


class Sink(Protocol):
    """Where the agent's output goes: Kafka topics in production, a recorder in component tests.
    ``headers`` (the trace context) are passed only to a sink the agent was told takes them."""

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None: ...


# How each Table's values are read: a changelog's value that does not read is not restored.
ROW_CHECKS: dict[str, Callable[[bytes], object]] = {
    DeciderTable.BUDGETS: decode_state,
    DeciderTable.RESERVATIONS: decode_reservation,
    DeciderTable.ESCALATIONS: escalation_record,
    DeciderTable.LATENCY: decode_window,
    DeciderTable.ANSWERS: decode_answer,
    DeciderTable.DECIDED: decided_record,
}


class DeciderTables(msgspec.Struct, frozen=True):
    """The decider's state (names: ``nexuscore.transport.DeciderTable``). faust writes a key's
    changes to the changelog partition of the event being processed, so every key is written from
    one input partition only: the tenant's (latency windows are per input partition for that)."""

    budgets: Table  # tenant -> budget state
    reservations: Table  # tenant/request -> open reservation
    escalations: Table  # tenant/request -> escalation awaiting review, or resolved marker
    latency: Table  # partition/deployment/strategy -> latency window
    answers: Table  # offline cache: tenant/policy/model/prompt -> answer
    decided: Table  # tenant/request -> the decision as it went out


class Input(msgspec.Struct, frozen=True):
    """Where an input came from and when the broker took it."""

    topic: str
    partition: int
    offset: int
    value: bytes
    appended: datetime
    # The time decisions take: the broker's timestamp, so that deciding the same input again after
    # a crash gives the same decision (every input topic uses LogAppendTime: no producer sets it).
    now: datetime

    @property
    def source(self) -> tuple[str, int, int]:
        return (self.topic, self.partition, self.offset)


def request_key(event: Event) -> bytes:
    """Request ids come from clients and are unique per tenant only: scope them by tenant."""
    return event.tenant_id.encode() + b"\x1f" + event.request_id.encode()


class Decider:
    """The decision agent's handlers (see the module docstring)."""

    def __init__(
        self,
        tables: DeciderTables,
        holder: PolicyHolder,
        clock: Clock,
        sink: Sink,
        *,
        topics: Topics,
        reviewers: TrustStore,
        keep_outputs: bool = True,
        trace_headers: bool = False,
        retention: Retention | None = None,
    ) -> None:
        # How long requests are remembered (None: for ever; the runtime then restores everything).
        self.retention = retention
        self.t = tables if retention is None else retention.wrap(tables)
        # Whether an input's outputs are kept with its record, to send again if the input comes
        # again: needed when outputs may still be unsent once the state is written (faust
        # publishes on commit); not when the runtime acknowledges outputs before writing state.
        self.keep_outputs = keep_outputs
        self.holder = holder
        self.clock = clock
        self.sink = sink
        self.topics = topics
        self.reviewers = reviewers
        self.codec = AvroCodec()
        self.expected: dict[str, tuple[type[Event], ...]] = {
            topics.requests: (InferenceRequested,),
            topics.outcomes: (OutcomeRecorded,),
            topics.reviews: (ReviewRecorded,),
        }
        self.timed_out: set[bytes] = set()
        # What this agent produced since its runtime's last batch, for the metrics (off: nothing kept).
        self.tally = Tally("decider")
        # Whether outputs carry a W3C traceparent header (the sink must take ``headers``).
        self.trace_headers = trace_headers
        # Each latency window decoded once per value its table holds (``window``).
        self._windows: dict[bytes, tuple[bytes | None, LatencyWindow]] = {}

    # --- the boundary ---------------------------------------------------------------------------

    async def process(
        self,
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
            event = decode_tenant_event(self.codec, key, value, self.expected.get(topic, _ANY_INPUT))
        except DecodeError as exc:
            await self.reject(topic, partition, offset, key, value, str(exc))
            return
        if isinstance(event, InferenceRequested):
            event = with_trace(event)  # a request without a valid trace id gets its derived one
        appended = appended_at(timestamp_ms, self.clock.now())
        if self.retention is not None:
            self.retention.saw(int(appended.timestamp() * 1_000_000))
        source = Input(topic, partition, offset, value or b"", appended, appended)
        try:
            await self.handle(event, source)
        except (KafkaError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001  # no input may stop the decider
            log.exception("could not process %s[%d]@%d", topic, partition, offset)
            await self.reject(
                topic, partition, offset, key, value, f"internal error: {type(exc).__name__}: {exc}"
            )

    async def handle(self, event: Event, source: Input) -> None:
        if isinstance(event, InferenceRequested):
            await self.on_request(event, source)
        elif isinstance(event, ReviewRecorded):
            await self.on_review(event, source)
        else:
            assert isinstance(event, OutcomeRecorded)
            await self.on_outcome(event, source)

    async def reject(
        self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None, reason: str
    ) -> None:
        dl = dead_letter(topic, partition, offset, key, value, reason, PRODUCER, self.clock.now())
        self.tally.add(dl)
        await self.sink.send(self.topics.deadletter, topic.encode(), self.codec.encode(dl))

    async def refuse(
        self, act: ReviewRecorded, refusal: Refusal, source: tuple[str, int, int], now: datetime
    ) -> None:
        log.warning("review %s of %s refused: %s", act.event_id, act.request_id, refusal)
        if refusal.code in SIGNER_CODES:
            return  # the projector records these from the reviews topic: one refusal per act
        refused = refusal_event(act, refusal, source, PRODUCER, now)
        self.tally.add(refused)
        await self.sink.send(self.topics.decisions, act.tenant_id.encode(), self.codec.encode(refused))

    # --- requests -------------------------------------------------------------------------------

    async def on_request(self, event: InferenceRequested, source: Input) -> None:
        key, tenant = request_key(event), event.tenant_id.encode()
        state = decode_state(self.t.budgets.get(tenant))
        memo = decided_record(self.t.decided.get(key))
        if memo is not None:
            await self.redeliver(memo, state, tenant, key)
            return
        held = decode_reservation(self.t.reservations.get(key))
        new_state, reservation, out = self.decide(state, event, held, source)
        decided = out[0]
        if isinstance(decided, RequestDecided) and decided.verdict == "escalated":
            new_state, reservation = await self.escalate(event, decided, new_state, reservation, out, source)
        sent = await self.emit(out, tenant)
        # Outputs are published when the input's offset is committed, after every Table change
        # before it is on the broker (see nexuscore.streams._faust). The Tables are still not
        # updated atomically with each other: the decision record goes first, the budget last.
        if held is None:
            reserved = encode_record(reservation) if reservation is not None else b""
            self.t.decided[key] = encode_decided(
                DecidedRecord(
                    sent=self.kept(sent),
                    version_before=state.version,
                    reservation=reserved,
                    escalated=isinstance(decided, RequestDecided) and decided.verdict == "escalated",
                )
            )
            if reservation is not None:
                self.t.reservations[key] = encode_record(reservation)
        elif reservation is None:
            del self.t.reservations[key]  # decided again without the reservation it held
        if new_state is not state:
            self.t.budgets[tenant] = encode_record(new_state)

    def decide(
        self, state: BudgetState, event: InferenceRequested, held: Reservation | None, source: Input
    ) -> tuple[BudgetState, Reservation | None, list[Event]]:
        """The pure core, under the policy serving this tenant (and the shadow, if any)."""
        registry = self.holder.registry
        serving = registry.for_tenant(event.tenant_id)
        new_state, reservation, out = on_request(
            state, event, serving.policy, PRODUCER, source.now, held, serving.stage,
            controls=self.holder.controls,
            latency=lambda d, s: self.observed(source.partition, d, s),
            answers=lambda k: decode_answer(self.t.answers.get(k)),
        )  # fmt: skip
        if registry.shadow is not None:
            decided = out[0]
            assert isinstance(decided, RequestDecided | RequestRejected)
            shadow = shadow_event(state, event, registry.shadow.policy, decided, PRODUCER, source.now, held)
            out.append(shadow)
        return new_state, reservation, out

    async def escalate(
        self,
        event: InferenceRequested,
        decided: RequestDecided,
        state: BudgetState,
        reservation: Reservation | None,
        out: list[Event],
        source: Input,
    ) -> tuple[BudgetState, Reservation | None]:
        """Keep an escalation for review, or apply the review that arrived before it (after a
        crash, a request can be decided again after the review its first decision prompted)."""
        key = request_key(event)
        record = escalation_record(self.t.escalations.get(key))
        if record is not None and record.resolved:
            return state, reservation
        early = early_review(record)
        # Its signature and freshness were checked when it arrived; what it answers, now.
        refused = early and judge_review(
            early, decided.event_id, decided.review_deadline, self.reviewers, early.occurred_at
        )
        if early is not None and not refused:
            state, reservation, resolved = self.review(state, event, decided, early, source)
            out.extend(resolved)
            self.t.escalations[key] = encode_escalation(
                EscalationRecord(resolved=True, resolved_by=early.event_id)
            )
            return state, reservation
        if early is not None and isinstance(refused, Refusal):
            await self.refuse(early, refused, ("early-review", source.partition, source.offset), source.now)
        deadline = decided.review_deadline
        self.t.escalations[key] = encode_escalation(
            EscalationRecord(
                request=source.value,
                decided=self.codec.encode(decided),
                deadline_us=int(deadline.timestamp() * 1_000_000) if deadline else 0,
            )
        )
        return state, reservation

    async def redeliver(self, memo: DecidedRecord, state: BudgetState, tenant: bytes, key: bytes) -> None:
        """A request decided before: the same events again, and its budget effect if it was lost."""
        await self.resend(memo.sent)
        if state.version > memo.version_before:
            return  # its effect is in the state already
        reservation = decode_reservation(memo.reservation) if memo.reservation else None
        if reservation is not None:
            self.t.reservations[key] = encode_record(reservation)
            self.t.budgets[tenant] = encode_record(reserve(state, reservation))
        else:
            self.t.budgets[tenant] = encode_record(bump(state))

    # --- reviews --------------------------------------------------------------------------------

    async def on_review(self, event: ReviewRecorded, source: Input) -> None:
        if event.action == "timed_out" and (refused := judge_timeout(event, source.appended)) is not None:
            # Not a timeout as the deciders write it: the projector records the refusal from the
            # reviews topic (one refusal per act), as it does for a review's signature.
            log.warning("review %s of %s refused: %s", event.event_id, event.request_id, refused)
            return
        key, tenant = request_key(event), event.tenant_id.encode()
        record = escalation_record(self.t.escalations.get(key))
        if record is not None and record.resolved:
            if record.resolved_by == event.event_id:
                await self.resend(record.sent)  # the same review again: its outputs may not be out
            else:
                await self.refuse(
                    event,
                    Refusal("not_pending", "the escalation was resolved already"),
                    source.source,
                    source.now,
                )
            return
        if record is None or not record.request:
            await self.hold_early_review(event, record, source)
            return
        request = with_trace(self.codec.decode(record.request, (InferenceRequested,)))
        escalated = self.codec.decode(record.decided, (RequestDecided,))
        assert isinstance(request, InferenceRequested) and isinstance(escalated, RequestDecided)
        refused = judge_review(
            event, escalated.event_id, escalated.review_deadline, self.reviewers, source.appended
        )
        if refused is not None:
            await self.refuse(event, refused, source.source, source.now)
            return
        state = decode_state(self.t.budgets.get(tenant))
        new_state, reservation, out = self.review(state, request, escalated, event, source)
        sent = await self.emit(out, tenant)
        self.t.escalations[key] = encode_escalation(
            EscalationRecord(resolved=True, resolved_by=event.event_id, sent=self.kept(sent))
        )
        if reservation is not None:
            self.t.reservations[key] = encode_record(reservation)
        if new_state is not state:
            self.t.budgets[tenant] = encode_record(new_state)

    def review(
        self,
        state: BudgetState,
        request: InferenceRequested,
        escalated: RequestDecided,
        event: ReviewRecorded,
        source: Input,
    ) -> tuple[BudgetState, Reservation | None, list[Event]]:
        return on_review(
            state, request, escalated, event, self.holder.registry.for_tenant(event.tenant_id).policy,
            PRODUCER, source.now, controls=self.holder.controls,
            latency=lambda d, s: self.observed(source.partition, d, s),
        )  # fmt: skip

    async def hold_early_review(
        self, event: ReviewRecorded, record: EscalationRecord | None, source: Input
    ) -> None:
        """A review of an escalation not (yet) known here: after a crash its request may be decided
        again after this review. The first signed one is kept until then; anything else (a
        timeout, a forgery, a second review) is refused, so no one can fill the Table with them."""
        memo = decided_record(self.t.decided.get(request_key(event)))
        if record is not None or event.action == "timed_out" or (memo is not None and not memo.escalated):
            why = Refusal("not_pending", "no escalation of this request awaits review")
            await self.refuse(event, why, source.source, source.now)
            return
        signer = check_review(event, self.reviewers, source.appended)
        if isinstance(signer, Refusal):
            await self.refuse(event, signer, source.source, source.now)
            return
        log.warning("review %s of %s arrived before its escalation: kept", event.event_id, event.request_id)
        self.t.escalations[request_key(event)] = encode_escalation(
            EscalationRecord(early_review=source.value)
        )

    # --- outcomes -------------------------------------------------------------------------------

    async def on_outcome(self, event: OutcomeRecorded, source: Input) -> None:
        key, tenant = request_key(event), event.tenant_id.encode()
        held = decode_reservation(self.t.reservations.get(key))
        memo = decided_record(self.t.decided.get(key))
        if held is None and memo is not None and memo.settled_by == event.event_id:
            await self.resend(memo.settlement)  # the same outcome again: its settlement may not be out
            return
        state = decode_state(self.t.budgets.get(tenant))
        new_state, out = on_outcome(state, held, event, PRODUCER, source.now)
        kept = answer_to_keep(event, held)
        if kept is not None:
            self.t.answers[kept[0]] = encode_answer(kept[1])
        if held is not None and event.status == "answered" and not event.cached and event.decode_strategy:
            at = _latency_key(source.partition, event.deployment_id, event.decode_strategy)
            window = observe(self.window(at), event.latency_ms, source.now)
            self.t.latency[at] = data = encode_window(window)
            self._windows[at] = (data, window)
        sent = await self.emit(out, tenant)
        if held is not None:
            if memo is not None:
                settled = msgspec.structs.replace(memo, settled_by=event.event_id, settlement=self.kept(sent))
                self.t.decided[key] = encode_decided(settled)
            del self.t.reservations[key]
        if new_state is not state:
            self.t.budgets[tenant] = encode_record(new_state)

    # --- the deadline timer ---------------------------------------------------------------------

    async def overdue_reviews(self) -> None:
        """Put a timeout review on the topic for each escalation past its deadline: the agent then
        ends it in order with any review a person sends (whichever comes first wins)."""
        now = self.clock.now()
        now_us = int(now.timestamp() * 1_000_000)
        pending_now = [(k, escalation_record(v)) for k, v in list(self.t.escalations.items())]
        self.timed_out.intersection_update(k for k, r in pending_now if r is not None and not r.resolved)
        for key, pending in pending_now:
            if pending is None or pending.resolved or not pending.request or key in self.timed_out:
                continue
            if not pending.deadline_us or pending.deadline_us > now_us:
                continue
            escalated = self.codec.decode(pending.decided, (RequestDecided,))
            assert isinstance(escalated, RequestDecided)
            review = timeout_review(escalated, now)
            await self.sink.send(self.topics.reviews, escalated.tenant_id.encode(), self.codec.encode(review))
            self.timed_out.add(key)

    # --- recovery -------------------------------------------------------------------------------

    def holds(self, cause: Cause) -> bool:
        """Whether the state holds the effect of the input ``cause`` names (it was made durable, or
        decided since): a request's decision, an outcome's settlement, a review's resolution."""
        key = cause.tenant_id.encode() + b"\x1f" + cause.request_id.encode()
        if cause.kind == InputKind.REQUEST:
            return self.t.decided.get(key) is not None
        if cause.kind == InputKind.OUTCOME:
            memo = decided_record(self.t.decided.get(key))
            return memo is not None and memo.settled_by == cause.event_id
        record = escalation_record(self.t.escalations.get(key))
        return record is not None and record.resolved and record.resolved_by == cause.event_id

    # --- memory ---------------------------------------------------------------------------------

    def forget_old(self) -> int:
        """Forget the requests older than their window (see ``nexuscore.streams._retention``);
        how many rows were forgotten."""
        return 0 if self.retention is None else self.retention.sweep(self.still_needed)

    def still_needed(self, table: str, key: bytes, value: bytes) -> bool:
        """Whether an old row must stay: its reservation is open, or its escalation awaits review."""
        if table == DeciderTable.ANSWERS:
            return False  # a cache
        if table == DeciderTable.DECIDED and key in self.t.reservations:
            return True  # the outcome that settles it is still to come
        pending = escalation_record(self.t.escalations.get(key))
        return pending is not None and bool(pending.request) and not pending.resolved

    # --- shared ---------------------------------------------------------------------------------

    async def emit(self, out: list[Event], tenant: bytes) -> Sent:
        """Send one input's outputs in order (the decision before the dispatch that acts on it)."""
        sent: Sent = []
        self.tally.extend(out)
        if self.trace_headers and out:
            return await self.send_traced(out, tenant)
        for e in out:
            if isinstance(e, DispatchRequested):
                sent.append((self.topics.dispatch, e.request_id.encode(), self.codec.encode(e)))
            elif isinstance(e, OutcomeRecorded):
                sent.append((self.topics.outcomes, tenant, self.codec.encode(e)))
            else:
                sent.append((self.topics.decisions, tenant, self.codec.encode(e)))
        await self.resend(sent)
        return sent

    async def send_traced(self, out: list[Event], tenant: bytes) -> Sent:
        """``emit`` with the trace context: every output carries the traceparent of the decider's
        span over their input."""
        first = out[0]
        name = _SPAN_NAMES.get(type(first), "review")
        span = output_span("decider", f"nexuscore.{name}", first)
        self.tally.span(span)
        sent: Sent = [_destination(self.topics, e, tenant, self.codec.encode(e)) for e in out]
        for topic, key, value in sent:
            await self.sink.send(topic, key, value, headers=span.headers)
        return sent

    def kept(self, sent: Sent) -> Sent:
        return sent if self.keep_outputs else []

    async def resend(self, sent: Sent) -> None:
        for topic, key, value in sent:
            await self.sink.send(topic, key, value)

    def window(self, key: bytes) -> LatencyWindow:
        """The latency window under ``key``, decoded once per value the table holds: a decision
        reads one per deployment and strategy of its chain (7.6 µs each at 200 samples), an outcome
        changes one. The memo holds the value it decoded, so that ``is`` cannot match another."""
        data = self.t.latency.get(key)
        decoded = self._windows.get(key)
        if decoded is not None and decoded[0] is data:
            return decoded[1]
        window = decode_window(data)
        self._windows[key] = (data, window)
        return window

    def observed(self, partition: int, deployment: str, strategy: str) -> LatencyObservation | None:
        w = self.window(_latency_key(partition, deployment, strategy))
        if not w.samples:
            return None
        return LatencyObservation(
            deployment_id=deployment, strategy=strategy, p50_ms=w.p50_ms, p95_ms=w.p95_ms, samples=w.samples
        )


def _destination(topics: Topics, e: Event, tenant: bytes, value: bytes) -> tuple[str, bytes, bytes]:
    """Where ``emit`` sends an output: dispatches keyed by request, the rest by tenant."""
    if isinstance(e, DispatchRequested):
        return (topics.dispatch, e.request_id.encode(), value)
    if isinstance(e, OutcomeRecorded):
        return (topics.outcomes, tenant, value)
    return (topics.decisions, tenant, value)


def _latency_key(partition: int, deployment: str, strategy: str) -> bytes:
    return f"{partition}\x1f{deployment}\x1f{strategy}".encode()
