"""The decider's handlers driven directly, with plain dicts as its Tables: no faust, no broker.

This is the interface every path goes through (requests, reviews, outcomes, the deadline timer);
the faust agent only hands it messages."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from nexuscore.core import decode_window, encode_window, observe
from nexuscore.core._latency import EMPTY_WINDOW, MIN_SAMPLES
from nexuscore.kernel.clock import FixedClock
from nexuscore.policy import Registry, SignedPolicy
from nexuscore.schemas import (
    ActRefused,
    DispatchRequested,
    EscalationResolved,
    RequestDecided,
    ReviewRecorded,
)
from nexuscore.streams import Decider, DeciderTables, PolicyHolder, Retention
from nexuscore.transport import DeciderTable
from tests.component.test_decider_agent import CODEC, TOPICS, TRUST, RecordingSink, _outcome, _review
from tests.factories import POLICY, T0, request

pytestmark = pytest.mark.component


def _decider() -> tuple[Decider, RecordingSink, FixedClock]:
    clock, sink = FixedClock(T0), RecordingSink()
    tables = DeciderTables(**{t.value: {} for t in DeciderTable})
    holder = PolicyHolder(Registry().apply(SignedPolicy(POLICY, ()), "active"))
    return Decider(tables, holder, clock, sink, topics=TOPICS, reviewers=TRUST), sink, clock


async def _put(decider: Decider, topic: str, event: object, offset: int, at_ms: int | None = None) -> None:
    key = event.tenant_id.encode()  # type: ignore[attr-defined]
    await decider.process(topic, 0, offset, key, CODEC.encode(event), at_ms)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_the_deadline_timer_ends_an_unreviewed_escalation_as_timed_out() -> None:
    decider, sink, clock = _decider()
    await _put(decider, TOPICS.requests, request(request_id="crit", risk_class="critical"), 0)
    [(_, _, escalated)] = sink.of(RequestDecided)
    await decider.overdue_reviews()
    assert not sink.of(ReviewRecorded)  # not yet due
    clock.at = escalated.review_deadline + timedelta(seconds=1)
    await decider.overdue_reviews()
    await decider.overdue_reviews()  # once per escalation, however often the timer fires
    [(topic, _, timeout)] = sink.of(ReviewRecorded)
    assert topic == TOPICS.reviews and timeout.action == "timed_out"
    await _put(decider, TOPICS.reviews, timeout, 0, int(clock.at.timestamp() * 1000))
    [(_, _, resolved)] = sink.of(EscalationResolved)
    assert resolved.resolution == "timed_out" and not sink.of(DispatchRequested)


@pytest.mark.asyncio
async def test_requests_reviews_and_outcomes_through_the_one_interface() -> None:
    decider, sink, _ = _decider()
    await _put(decider, TOPICS.requests, request(request_id="plain"), 0)
    await _put(decider, TOPICS.requests, request(request_id="crit", risk_class="critical"), 1)
    await _put(decider, TOPICS.reviews, _review("crit", "approved"), 0, int(T0.timestamp() * 1000))
    dispatches = [d for _, _, d in sink.of(DispatchRequested)]
    assert [d.request_id for d in dispatches] == ["plain", "crit"]
    for n, d in enumerate(dispatches):
        await _put(decider, TOPICS.outcomes, _outcome(d), n)
    assert decider.t.reservations == {}  # both settled
    assert len(decider.t.decided) == 2 and len(decider.t.escalations) == 1


@pytest.mark.asyncio
async def test_a_signed_review_of_a_request_decided_without_escalation_is_refused() -> None:
    decider, sink, _ = _decider()
    await _put(decider, TOPICS.requests, request(request_id="plain"), 0)
    await _put(decider, TOPICS.reviews, _review("plain", "approved"), 0, int(T0.timestamp() * 1000))
    [(_, _, refused)] = sink.of(ActRefused)
    assert refused.code == "not_pending" and decider.t.escalations == {}


# --- retention: how long a request is remembered ---------------------------------------------------

WINDOW = timedelta(minutes=15)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _remembering(window: timedelta = WINDOW) -> tuple[Decider, RecordingSink]:
    decider, sink, _ = _decider()
    retention = Retention({"decided": window, "escalations": window, "answers": window})
    tables = DeciderTables(**{t.value: {} for t in DeciderTable})
    # As on the default runtime: a request recognised gets nothing sent again.
    remembering = Decider(
        tables, decider.holder, decider.clock, sink, topics=TOPICS, reviewers=TRUST,
        retention=retention, keep_outputs=False,
    )  # fmt: skip
    return remembering, sink


@pytest.mark.asyncio
async def test_a_settled_request_is_forgotten_once_older_than_the_window() -> None:
    decider, sink = _remembering()
    await _put(decider, TOPICS.requests, request(request_id="old"), 0, _ms(T0))
    [(_, _, dispatch)] = sink.of(DispatchRequested)
    await _put(decider, TOPICS.outcomes, _outcome(dispatch), 0, _ms(T0 + timedelta(seconds=1)))
    await _put(
        decider, TOPICS.requests, request(request_id="new"), 1, _ms(T0 + WINDOW - timedelta(seconds=1))
    )
    assert decider.forget_old() == 0  # not old enough yet
    await _put(
        decider, TOPICS.requests, request(request_id="newer"), 2, _ms(T0 + WINDOW + timedelta(seconds=1))
    )
    assert decider.forget_old() >= 1
    remembered = {k.split(b"\x1f")[1] for k in decider.t.decided}
    assert remembered == {b"new", b"newer"}


@pytest.mark.asyncio
async def test_a_resubmission_within_the_window_gets_the_first_decision_and_later_a_second_one() -> None:
    decider, sink = _remembering()
    await _put(decider, TOPICS.requests, request(request_id="r"), 0, _ms(T0))
    [(_, _, dispatch)] = sink.of(DispatchRequested)
    await _put(decider, TOPICS.outcomes, _outcome(dispatch), 0, _ms(T0 + timedelta(seconds=1)))
    await _put(decider, TOPICS.requests, request(request_id="r"), 1, _ms(T0 + timedelta(minutes=10)))
    decider.forget_old()
    assert len(sink.of(RequestDecided)) == 1  # recognised: not decided again
    await _put(
        decider, TOPICS.requests, request(request_id="other"), 2, _ms(T0 + WINDOW + timedelta(seconds=5))
    )
    decider.forget_old()
    await _put(decider, TOPICS.requests, request(request_id="r"), 3, _ms(T0 + WINDOW + timedelta(seconds=6)))
    assert [d.request_id for _, _, d in sink.of(RequestDecided)].count("r") == 2  # past the window


@pytest.mark.asyncio
async def test_an_open_reservation_and_a_pending_escalation_outlive_the_window() -> None:
    decider, sink = _remembering()
    await _put(decider, TOPICS.requests, request(request_id="unsettled"), 0, _ms(T0))
    await _put(decider, TOPICS.requests, request(request_id="crit", risk_class="critical"), 1, _ms(T0))
    late = T0 + 3 * WINDOW
    await _put(decider, TOPICS.requests, request(request_id="late"), 2, _ms(late))
    decider.forget_old()
    keys = {k.split(b"\x1f")[1] for k in decider.t.decided}
    assert {b"unsettled", b"crit"} <= keys and len(decider.t.escalations) == 1
    # Settled and resolved, they go one window after they were last found needed.
    [(_, _, first)] = [d for d in sink.of(DispatchRequested) if d[2].request_id == "unsettled"]
    await _put(decider, TOPICS.outcomes, _outcome(first), 1, _ms(late))
    await _put(decider, TOPICS.reviews, _review("crit", "denied", at=late), 0, _ms(late))
    assert sink.of(EscalationResolved)
    await _put(
        decider, TOPICS.requests, request(request_id="later"), 3, _ms(late + WINDOW + timedelta(seconds=1))
    )
    decider.forget_old()
    # ("late" and "later" hold open reservations: they stay.)
    assert {k.split(b"\x1f")[1] for k in decider.t.decided} == {b"late", b"later"}
    assert decider.t.escalations == {}


@pytest.mark.asyncio
async def test_a_decision_reads_the_latency_window_the_table_holds_now_not_one_decoded_before() -> None:
    # The decider keeps each window decoded; a value put in the table another way (a restore from
    # the changelog) must be the one the next decision reads.
    decider, sink, _ = _decider()
    await _put(decider, TOPICS.requests, request(request_id="w-0", data_classification="confidential"), 0)
    await _put(decider, TOPICS.outcomes, _outcome(sink.of(DispatchRequested)[-1][2], latency_ms=9000.0), 0)
    [(key, value)] = decider.t.latency.items()
    assert decode_window(value).samples == 1
    restored = EMPTY_WINDOW
    for n in range(MIN_SAMPLES + 5):
        restored = observe(restored, 2.0, T0 + timedelta(seconds=n))
    decider.t.latency[key] = encode_window(restored)
    await _put(decider, TOPICS.requests, request(request_id="w-1", data_classification="confidential"), 1)
    last = sink.of(RequestDecided)[-1][2]
    [seen] = [o for o in last.decode.observations if o.samples == MIN_SAMPLES + 5]
    assert (seen.p50_ms, seen.p95_ms) == (2, 2)
