"""The functional core: pure decisions and pure state transitions. No I/O, no clock, no randomness."""

from nexuscore.core._budget import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    Settlement,
    Window,
    decode_reservation,
    decode_state,
    encode_record,
    release,
    reserve,
    settle,
)
from nexuscore.core._decide import (
    Decision,
    Rejection,
    admit,
    decide,
    estimate_complexity,
    estimate_input_tokens,
)
from nexuscore.core._ids import derive_id, envelope_from
from nexuscore.core._steps import decision_event, dispatch_event, on_outcome, on_request, shadow_event

__all__ = [
    "EMPTY_STATE",
    "BudgetState",
    "Decision",
    "Rejection",
    "Reservation",
    "Settlement",
    "Window",
    "admit",
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
    "release",
    "reserve",
    "settle",
    "shadow_event",
]
