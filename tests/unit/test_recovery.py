"""What a decider's successor decides again after a crash, and in which order: the inputs of the
decisions it finds published beyond the durable state, in the order those decisions went out."""

from __future__ import annotations

from nexuscore.policy import Registry, SignedPolicy, default_policy
from nexuscore.schemas import (
    ActRefused,
    BudgetSettled,
    EscalationResolved,
    Event,
    InferenceRequested,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
)
from nexuscore.streams import PolicyHolder
from nexuscore.streams._governance import EARLIER_STATES
from nexuscore.streams._recovery import Cause, InputKind, cause_of, causes, replay_order
from tests.factories import POLICY, replace, run_history, with_budgets

KIND_OF: dict[type[Event], InputKind] = {
    InferenceRequested: InputKind.REQUEST,
    OutcomeRecorded: InputKind.OUTCOME,
    ReviewRecorded: InputKind.REVIEW,
}
OUTPUTS = (RequestDecided, RequestRejected, BudgetSettled, EscalationResolved)


def _never(_: Cause) -> bool:
    return False


def test_the_causes_of_published_decisions_are_their_inputs_in_the_order_they_were_decided() -> None:
    history = run_history(default_policy(), 300, seed=5)
    inputs = [e for e in history if type(e) in KIND_OF]
    order = causes([e for e in history if isinstance(e, OUTPUTS)], _never)
    # Every request, outcome and review made a decision here: all of them, in their order.
    assert [(c.kind, c.event_id) for c in order] == [(KIND_OF[type(e)], e.event_id) for e in inputs]
    assert {c.kind for c in order} == set(InputKind)
    assert all(c.tenant_id and c.request_id for c in order)


def test_a_cause_comes_once_and_those_the_state_holds_are_left_out() -> None:
    history = run_history(default_policy(), 60, seed=6)
    outputs = [e for e in history if isinstance(e, OUTPUTS)]
    everything = causes(outputs, _never)
    durable = set(everything[: len(everything) // 2])
    again = causes(outputs + outputs, lambda c: c in durable)  # published twice: a crash during recovery
    assert again == everything[len(everything) // 2 :]


def test_outputs_that_change_no_state_name_no_cause() -> None:
    history = run_history(default_policy(), 60, seed=7)
    settled = next(e for e in history if isinstance(e, BudgetSettled))
    refused = ActRefused(
        event_id="x", request_id="r", tenant_id="acme-bank", occurred_at=settled.occurred_at,
        producer="nexuscore.decider", causation_id="review-1", act="review", act_event_id="review-1",
        source_topic="reviews", source_partition=0, source_offset=1, key_id="k", claimed_actor="eve",
        code="unknown_key", reason="not a reviewer's key",
    )  # fmt: skip
    assert cause_of(refused) is None
    assert cause_of(replace(settled, causation_id="")) is None
    assert cause_of(settled) == Cause(
        InputKind.OUTCOME,
        settled.tenant_id,
        settled.request_id,
        settled.causation_id,
        settled.policy_digest or "",
    )


def _cause(kind: InputKind, event_id: str, tenant: str = "acme-bank") -> Cause:
    return Cause(kind, tenant, f"r-{event_id}", event_id)


def _of(event_id: str, tenant: str = "acme-bank") -> tuple[str, str]:
    return (tenant, event_id)


REQ, OUT = InputKind.REQUEST, InputKind.OUTCOME


def test_records_are_replayed_in_the_causes_order_each_topic_in_log_order() -> None:
    records = {
        REQ: [(_of("r1"), "R1"), (_of("r2"), "R2"), (None, "garbled"), (_of("r3"), "R3"), (_of("r4"), "R4")],
        OUT: [(_of("o1"), "O1"), (_of("o2"), "O2")],
        InputKind.REVIEW: [],
    }
    order = [_cause(REQ, "r1"), _cause(OUT, "o1"), _cause(REQ, "r3"), _cause(OUT, "o2")]
    replay, missing = replay_order(order, records)
    # r2 and the record that does not decode were decided before r3 (no decision of theirs was
    # published); r4 comes after every cause: it is new, and is left to be decided as it comes.
    assert [r for r, _ in replay] == ["R1", "O1", "R2", "garbled", "R3", "O2"]
    # each decided under its cause's policy: those before a cause under that cause's
    assert [c.event_id for _, c in replay] == ["r1", "o1", "r3", "r3", "r3", "o2"]
    assert missing == 0


def test_a_cause_not_read_again_is_counted_and_the_rest_keep_their_order() -> None:
    records = {REQ: [(_of("r1"), "R1"), (_of("r2"), "R2"), (_of("r1"), "R1 again")], OUT: [(_of("o2"), "O2")]}
    order = [_cause(OUT, "o1"), _cause(REQ, "r2"), _cause(OUT, "o2"), _cause(REQ, "r1")]
    replay, missing = replay_order(order, records)
    # o1 was durable already (not read again). r1 lies before r2 in its topic: it went with r2's
    # stretch, before it, and cannot also take its own later place.
    assert [r for r, _ in replay] == ["R1", "R2", "O2"]
    assert missing == 2


def test_an_input_is_found_by_its_tenant_and_event_id_not_the_event_id_alone() -> None:
    """Event ids are the producers' choice: another tenant's request may carry the same one."""
    records = {REQ: [(_of("e1", "globex-insurance"), "theirs"), (_of("e1"), "ours")], OUT: []}
    replay, missing = replay_order([_cause(REQ, "e1")], records)
    assert [r for r, _ in replay] == ["theirs", "ours"]  # ours decided after theirs, as the log had it
    assert missing == 0
    replay, _ = replay_order([_cause(REQ, "e1", "globex-insurance")], records)
    assert [r for r, _ in replay] == ["theirs"]


def test_a_decision_is_made_again_under_the_policy_that_made_it_while_it_is_remembered() -> None:
    first, second = (with_budgets(POLICY, usd, usd) for usd in ("0.0003", "0.0001"))
    holder = PolicyHolder(Registry().apply(SignedPolicy(first, ()), "active"))
    holder.registry = Registry().apply(SignedPolicy(second, ()), "active")  # a promotion
    with holder.pinned(first.digest, "acme-bank") as known:
        assert known and holder.registry.for_tenant("acme-bank").digest == first.digest
        # the governance log's next act is judged on where the log is, not on the pin
        assert holder.current.registry.for_tenant("acme-bank").digest == second.digest
    assert holder.registry.for_tenant("acme-bank").digest == second.digest  # the pin ends with it
    with holder.pinned("sha256:never-served", "acme-bank") as known:
        assert not known and holder.registry.for_tenant("acme-bank").digest == second.digest
    with holder.pinned("", "acme-bank") as known:  # an output naming no policy: nothing to pin
        assert known and holder.registry.for_tenant("acme-bank").digest == second.digest
    for i in range(EARLIER_STATES):  # as many promotions again: the first is forgotten
        holder.registry = Registry().apply(
            SignedPolicy(with_budgets(POLICY, f"0.{i + 2:04d}", "0.0001"), ()), "active"
        )
    with holder.pinned(first.digest, "acme-bank") as known:
        assert not known
