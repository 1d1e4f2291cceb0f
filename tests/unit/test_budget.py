"""Budget state transitions: reserve, settle, windows, encoding."""

from __future__ import annotations

from nexuscore.core import (
    EMPTY_STATE,
    Reservation,
    decode_reservation,
    decode_state,
    encode_record,
    reserve,
    settle,
)

DAY = "2026-11-25"


def test_reserve_then_settle_moves_the_estimate_to_the_actual_cost() -> None:
    r = Reservation(day=DAY, feature="chat", amount=500)
    s1 = reserve(EMPTY_STATE, r)
    w = s1.window(DAY)
    assert (w.tenant_reserved, w.feature_reserved["chat"], w.tenant_committed, s1.version) == (
        500,
        500,
        500,
        1,
    )
    s2, settlement = settle(s1, r, 320)
    assert (settlement.reserved, settlement.actual, settlement.tenant_spent) == (500, 320, 320)
    w = s2.window(DAY)
    assert (w.tenant_settled, w.tenant_reserved, w.feature_settled["chat"], w.feature_reserved["chat"]) == (
        320,
        0,
        320,
        0,
    )
    assert s2.version == 2


def test_reservations_settle_into_their_own_day() -> None:
    yesterday = Reservation(day="2026-11-24", feature="chat", amount=100)
    s = reserve(reserve(EMPTY_STATE, yesterday), Reservation(day=DAY, feature="chat", amount=50))
    s, _ = settle(s, yesterday, 90)
    assert s.window("2026-11-24").tenant_settled == 90
    assert s.window(DAY).tenant_settled == 0 and s.window(DAY).tenant_reserved == 50


def test_old_windows_are_pruned_but_days_with_open_reservations_are_kept() -> None:
    old = Reservation(day="2026-11-20", feature="chat", amount=10)
    s = reserve(EMPTY_STATE, old)
    for day in ("2026-11-23", "2026-11-24", DAY):
        r = Reservation(day=day, feature="chat", amount=10)
        s, _ = settle(reserve(s, r), r, 10)
    assert set(s.windows) == {"2026-11-20", "2026-11-24", DAY}
    s, _ = settle(s, old, 10)
    assert set(s.windows) == {"2026-11-24", DAY}


def test_state_and_reservations_survive_their_table_encoding() -> None:
    r = Reservation(day=DAY, feature="chat", amount=500)
    s = reserve(EMPTY_STATE, r)
    assert decode_state(encode_record(s)) == s
    assert decode_state(None) == EMPTY_STATE
    assert decode_reservation(encode_record(r)) == r
    assert decode_reservation(None) is None
