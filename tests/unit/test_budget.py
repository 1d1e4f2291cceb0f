"""Budget state transitions: reserve, settle, idempotence, windows."""

from __future__ import annotations

from nexuscore.core import EMPTY_STATE, decode_state, encode_state, reserve, settle


def test_reserve_then_settle_moves_the_estimate_to_the_actual_cost() -> None:
    s1 = reserve(EMPTY_STATE, "r1", "2026-11-25", "chat", 500)
    w = s1.window("2026-11-25")
    assert (w.tenant_reserved, w.feature_reserved["chat"], s1.version) == (500, 500, 1)
    s2, settlement = settle(s1, "r1", 320)
    assert settlement is not None and (settlement.reserved, settlement.actual) == (500, 320)
    w = s2.window("2026-11-25")
    assert (w.tenant_settled, w.tenant_reserved, w.feature_settled["chat"]) == (320, 0, 320)
    assert s2.version == 2 and not s2.open


def test_a_redelivered_reservation_is_not_held_twice() -> None:
    s1 = reserve(EMPTY_STATE, "r1", "2026-11-25", "chat", 500)
    s2 = reserve(s1, "r1", "2026-11-25", "chat", 500)
    assert s2.window("2026-11-25").tenant_reserved == 500


def test_settling_an_unknown_request_changes_nothing() -> None:
    s1 = reserve(EMPTY_STATE, "r1", "2026-11-25", "chat", 500)
    s2, settlement = settle(s1, "other", 100)
    assert settlement is None and s2 is s1


def test_old_windows_are_pruned_but_open_reservations_keep_theirs() -> None:
    s = reserve(EMPTY_STATE, "r1", "2026-11-20", "chat", 10)
    for day in ("2026-11-23", "2026-11-24", "2026-11-25"):
        s = reserve(s, f"r-{day}", day, "chat", 10)
        s, _ = settle(s, f"r-{day}", 10)
    assert set(s.windows) == {"2026-11-20", "2026-11-24", "2026-11-25"}
    s, _ = settle(s, "r1", 10)
    s = reserve(s, "r-late", "2026-11-25", "chat", 10)
    assert set(s.windows) == {"2026-11-24", "2026-11-25"}


def test_state_survives_its_table_encoding() -> None:
    s = reserve(EMPTY_STATE, "r1", "2026-11-25", "chat", 500)
    assert decode_state(encode_state(s)) == s
    assert decode_state(None) == EMPTY_STATE
