"""The decider's steps: retries and redeliveries of the same request decide once."""

from __future__ import annotations

from nexuscore.core import EMPTY_STATE, on_request
from nexuscore.schemas import DispatchRequested, RequestDecided
from tests.factories import POLICY, T0, replace, request


def test_a_request_retried_under_a_new_event_id_gets_the_same_decision_ids() -> None:
    first = request(request_id="r-1", event_id="e-1")
    retry = replace(first, event_id="e-2")
    _, _, a = on_request(EMPTY_STATE, first, POLICY, "d", T0)
    _, _, b = on_request(EMPTY_STATE, retry, POLICY, "d", T0)
    assert [e.event_id for e in a] == [e.event_id for e in b]


def test_a_redelivered_request_is_decided_the_same_way_without_holding_the_budget_twice() -> None:
    req = request(feature="credit-memo", task_type="credit_decision", risk_class="high")
    state, held, first = on_request(EMPTY_STATE, req, POLICY, "d", T0)
    assert held is not None
    again_state, again_held, again = on_request(state, req, POLICY, "d", T0, held)
    assert again_state == state and again_held == held
    assert [e.event_id for e in again] == [e.event_id for e in first]
    a, b = first[0], again[0]
    assert isinstance(a, RequestDecided) and isinstance(b, RequestDecided)
    assert (a.verdict, a.budget, a.routing) == (b.verdict, b.budget, b.routing)
    assert isinstance(again[1], DispatchRequested) and again[1] == first[1]
