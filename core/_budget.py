"""Budget state per tenant and its pure transitions (reserve on decision, settle on outcome).

One tenant's state lives in one Kafka partition (topics are keyed by tenant), so its transitions
are applied strictly in order: no two requests of a tenant can race for the same budget.

The state holds totals only; each open reservation is its own small record (keyed by request in
the decider's second Table), so that writing the state costs the same however many requests are in
flight.
"""

from __future__ import annotations

import msgspec


class Window(msgspec.Struct, frozen=True, kw_only=True):
    """Spend in one UTC day: settled (actual) and reserved (estimated, outcome pending)."""

    day: str
    tenant_settled: int = 0
    tenant_reserved: int = 0
    feature_settled: dict[str, int] = msgspec.field(default_factory=dict)
    feature_reserved: dict[str, int] = msgspec.field(default_factory=dict)

    @property
    def tenant_committed(self) -> int:
        return self.tenant_settled + self.tenant_reserved

    def feature_committed(self, feature: str) -> int:
        return self.feature_settled.get(feature, 0) + self.feature_reserved.get(feature, 0)


class Reservation(msgspec.Struct, frozen=True, kw_only=True):
    """An estimate held against one day's budgets until the request's outcome settles it."""

    day: str
    feature: str
    amount: int
    # For the offline cache: which prompt this call answers, and whether its answer may be kept.
    prompt_sha256: str = ""
    cacheable: bool = False


class BudgetState(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's budget totals. ``version`` counts the transitions applied, for ordered replay."""

    version: int = 0
    windows: dict[str, Window] = msgspec.field(default_factory=dict)

    def window(self, day: str) -> Window:
        return self.windows.get(day) or Window(day=day)


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    day: str
    feature: str
    reserved: int
    actual: int
    tenant_spent: int
    feature_spent: int


EMPTY_STATE = BudgetState()

_encoder = msgspec.msgpack.Encoder()
_state_decoder = msgspec.msgpack.Decoder(BudgetState)
_reservation_decoder = msgspec.msgpack.Decoder(Reservation)


def encode_record(record: BudgetState | Reservation) -> bytes:
    """A budget state or a reservation, as its Table stores it (msgpack)."""
    return _encoder.encode(record)


def decode_state(data: bytes | None) -> BudgetState:
    return EMPTY_STATE if not data else _state_decoder.decode(data)


def decode_reservation(data: bytes | None) -> Reservation | None:
    return None if not data else _reservation_decoder.decode(data)


def _with_window(state: BudgetState, window: Window) -> BudgetState:
    windows = dict(state.windows)
    windows[window.day] = window
    # Keep the two newest days, plus any day that still has reservations to settle.
    keep = set(sorted(windows)[-2:]) | {d for d, w in windows.items() if w.tenant_reserved}
    return BudgetState(version=state.version + 1, windows={d: w for d, w in windows.items() if d in keep})


def reserve(state: BudgetState, reservation: Reservation) -> BudgetState:
    """Hold the reservation's amount against its day's tenant and feature budgets."""
    w = state.window(reservation.day)
    fr = dict(w.feature_reserved)
    fr[reservation.feature] = fr.get(reservation.feature, 0) + reservation.amount
    window = msgspec.structs.replace(
        w, tenant_reserved=w.tenant_reserved + reservation.amount, feature_reserved=fr
    )
    return _with_window(state, window)


def release(state: BudgetState, reservation: Reservation) -> BudgetState:
    """The state as it was before ``reservation`` was made (the version is kept)."""
    w = state.window(reservation.day)
    fr = dict(w.feature_reserved)
    fr[reservation.feature] = fr.get(reservation.feature, 0) - reservation.amount
    window = msgspec.structs.replace(
        w, tenant_reserved=w.tenant_reserved - reservation.amount, feature_reserved=fr
    )
    return BudgetState(version=state.version, windows={**state.windows, window.day: window})


def bump(state: BudgetState) -> BudgetState:
    """A decision that reserved nothing still advances the version, so replay can order it."""
    return msgspec.structs.replace(state, version=state.version + 1)


def settle(state: BudgetState, reservation: Reservation, actual: int) -> tuple[BudgetState, Settlement]:
    """Replace a reservation by the actual cost."""
    w = state.window(reservation.day)
    f = reservation.feature
    fr = dict(w.feature_reserved)
    fr[f] = fr.get(f, 0) - reservation.amount
    fs = dict(w.feature_settled)
    fs[f] = fs.get(f, 0) + actual
    window = Window(
        day=w.day,
        tenant_settled=w.tenant_settled + actual,
        tenant_reserved=w.tenant_reserved - reservation.amount,
        feature_settled=fs,
        feature_reserved=fr,
    )
    settlement = Settlement(
        day=w.day,
        feature=f,
        reserved=reservation.amount,
        actual=actual,
        tenant_spent=window.tenant_settled,
        feature_spent=fs[f],
    )
    return _with_window(state, window), settlement
