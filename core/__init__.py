"""The functional core: pure decisions and pure state transitions. No I/O, no clock, no randomness."""

from nexuscore.core._admit import MAX_PROMPT_BYTES, Rejection, admit, admit_size, estimate_input_tokens
from nexuscore.core._breaker import CLOSED as CLOSED_BREAKER
from nexuscore.core._breaker import Breaker, BreakerConfig, Transition
from nexuscore.core._breaker import admit as breaker_admit
from nexuscore.core._breaker import adopt as breaker_adopt
from nexuscore.core._breaker import record as breaker_record
from nexuscore.core._budget import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    Settlement,
    Window,
    bump,
    decode_reservation,
    decode_state,
    encode_record,
    release,
    reserve,
    settle,
)
from nexuscore.core._budget_stage import Budgeted, budget_stage
from nexuscore.core._controls import CachedAnswer, decode_answer, encode_answer
from nexuscore.core._decide import Decision, decide, decide_on_route
from nexuscore.core._decode_stage import Decoded, LatencyView, decode_stage
from nexuscore.core._ids import derive_id, envelope_from
from nexuscore.core._latency import LatencyWindow, decode_window, encode_window, observe
from nexuscore.core._plan import ESTIMATE_TOKENS_CAP, CutPoints, Observed, Outcome, PlanKey, Planner, Shape
from nexuscore.core._route import (
    Escalation,
    Route,
    RouteCache,
    RouteKey,
    estimate_complexity,
    route,
    route_key,
)
from nexuscore.core._steps import (
    answer_to_keep,
    decision_event,
    dispatch_event,
    on_outcome,
    on_request,
    on_review,
    refusal_event,
    shadow_event,
)
from nexuscore.core._timeout import DECIDER, TIMEOUT_REASON, judge_timeout, timeout_review

__all__ = [
    "CLOSED_BREAKER",
    "DECIDER",
    "TIMEOUT_REASON",
    "CutPoints",
    "ESTIMATE_TOKENS_CAP",
    "Observed",
    "Outcome",
    "Planner",
    "PlanKey",
    "Shape",
    "breaker_admit",
    "breaker_adopt",
    "breaker_record",
    "MAX_PROMPT_BYTES",
    "EMPTY_STATE",
    "Breaker",
    "Budgeted",
    "Decoded",
    "Escalation",
    "Route",
    "RouteCache",
    "RouteKey",
    "budget_stage",
    "decide_on_route",
    "decode_stage",
    "route",
    "route_key",
    "BreakerConfig",
    "CachedAnswer",
    "LatencyWindow",
    "Transition",
    "answer_to_keep",
    "bump",
    "decode_answer",
    "decode_window",
    "encode_answer",
    "encode_window",
    "observe",
    "on_review",
    "BudgetState",
    "Decision",
    "LatencyView",
    "Rejection",
    "Reservation",
    "Settlement",
    "Window",
    "admit",
    "admit_size",
    "decide",
    "decision_event",
    "decode_reservation",
    "decode_state",
    "derive_id",
    "dispatch_event",
    "encode_record",
    "envelope_from",
    "estimate_complexity",
    "estimate_input_tokens",
    "on_outcome",
    "on_request",
    "refusal_event",
    "release",
    "reserve",
    "settle",
    "shadow_event",
    "judge_timeout",
    "timeout_review",
]
