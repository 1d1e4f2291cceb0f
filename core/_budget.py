"""Budget state per tenant and its pure transitions (reserve on decision, settle on outcome).

One tenant's state lives in one Kafka partition (topics are keyed by tenant), so its transitions
are applied strictly in order: no two requests of a tenant can race for the same budget.
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
    day: str
    feature: str
    amount: int


class BudgetState(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's budget state. ``version`` counts the transitions applied, for ordered replay."""

    version: int = 0
    windows: dict[str, Window] = msgspec.field(default_factory=dict)
    open: dict[str, Reservation] = msgspec.field(default_factory=dict)

    def window(self, day: str) -> Window:
        return self.windows.get(day) or Window(day=day)


EMPTY_STATE = BudgetState()

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(BudgetState)


def encode_state(state: BudgetState) -> bytes:
    return _encoder.encode(state)


def decode_state(data: bytes | None) -> BudgetState:
    return EMPTY_STATE if not data else _decoder.decode(data)


def _with_window(state: BudgetState, window: Window, open_: dict[str, Reservation]) -> BudgetState:
    windows = dict(state.windows)
    windows[window.day] = window
    # Keep the two newest days, plus any day that still has reservations to settle.
    keep = set(sorted(windows)[-2:]) | {r.day for r in open_.values()}
    return BudgetState(
        version=state.version + 1,
        windows={d: w for d, w in windows.items() if d in keep},
        open=open_,
    )


def reserve(state: BudgetState, request_id: str, day: str, feature: str, amount: int) -> BudgetState:
    """Hold ``amount`` against the day's tenant and feature budgets until the outcome settles it."""
    if request_id in state.open:
        # A redelivered decision must not hold the budget twice.
        return msgspec.structs.replace(state, version=state.version + 1)
    w = state.window(day)
    fr = dict(w.feature_reserved)
    fr[feature] = fr.get(feature, 0) + amount
    window = msgspec.structs.replace(w, tenant_reserved=w.tenant_reserved + amount, feature_reserved=fr)
    open_ = dict(state.open)
    open_[request_id] = Reservation(day=day, feature=feature, amount=amount)
    return _with_window(state, window, open_)


def bump(state: BudgetState) -> BudgetState:
    """A decision that reserved nothing still advances the version, so replay can order it."""
    return msgspec.structs.replace(state, version=state.version + 1)


class Settlement(msgspec.Struct, frozen=True, kw_only=True):
    day: str
    feature: str
    reserved: int
    actual: int
    tenant_spent: int
    feature_spent: int


def settle(state: BudgetState, request_id: str, actual: int) -> tuple[BudgetState, Settlement | None]:
    """Replace a reservation by the actual cost. Unknown request ids (duplicates) change nothing."""
    reservation = state.open.get(request_id)
    if reservation is None:
        return state, None
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
    open_ = {k: v for k, v in state.open.items() if k != request_id}
    settlement = Settlement(
        day=w.day,
        feature=f,
        reserved=reservation.amount,
        actual=actual,
        tenant_spent=window.tenant_settled,
        feature_spent=fs[f],
    )
    return _with_window(state, window, open_), settlement
