"""The decider's handlers driven directly, with plain dicts as its Tables: no faust, no broker.

This is the interface every path goes through (requests, reviews, outcomes, the deadline timer);
the faust agent only hands it messages."""

from __future__ import annotations

from datetime import timedelta

import pytest

from nexuscore.kernel.clock import FixedClock
from nexuscore.policy import Registry, SignedPolicy
from nexuscore.schemas import (
    ActRefused,
    DispatchRequested,
    EscalationResolved,
    RequestDecided,
    ReviewRecorded,
)
from nexuscore.streams import Decider, DeciderTables, PolicyHolder
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
