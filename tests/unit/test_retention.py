"""The decider's retention: rows older than their table's window are forgotten unless still needed,
by the inputs' time, oldest first; restored rows count from when they were written."""

from __future__ import annotations

from datetime import timedelta

import pytest

from nexuscore.streams import DeciderTables, Retention
from nexuscore.transport import DeciderTable

S = 1_000_000  # microseconds


def _tables(window_s: int = 10) -> tuple[Retention, DeciderTables]:
    retention = Retention({"decided": timedelta(seconds=window_s), "answers": timedelta(seconds=1)})
    tables = retention.wrap(DeciderTables(**{t.value: {} for t in DeciderTable}))
    return retention, tables


def _write(retention: Retention, tables: DeciderTables, at_s: int, key: bytes) -> None:
    retention.saw(at_s * S)
    tables.decided[key] = b"memo"


def test_rows_older_than_the_window_go_and_younger_ones_stay() -> None:
    retention, tables = _tables()
    for at, key in ((0, b"a"), (5, b"b"), (12, b"c")):
        _write(retention, tables, at, key)
    assert retention.sweep(lambda *_: False) == 1  # at 12 s, only "a" (0 s) is older than 10 s
    assert set(tables.decided) == {b"b", b"c"}


def test_a_row_still_needed_stays_and_is_looked_at_again_a_window_later() -> None:
    retention, tables = _tables()
    _write(retention, tables, 0, b"open")
    _write(retention, tables, 11, b"x")
    looked: list[bytes] = []
    retention.sweep(lambda _t, key, _v: looked.append(key) or True)
    assert looked == [b"open"] and b"open" in tables.decided
    retention.saw(20 * S)
    assert retention.sweep(lambda *_: False) == 0  # not before 21 s
    retention.saw(22 * S)
    assert retention.sweep(lambda *_: False) == 2 and not tables.decided


def test_time_never_goes_back_and_a_rewrite_keeps_the_first_time() -> None:
    retention, tables = _tables()
    _write(retention, tables, 10, b"a")
    retention.saw(3 * S)  # an input of an earlier broker time (another partition)
    tables.decided[b"a"] = b"settled"  # rewritten: still counts from 10 s
    retention.saw(19 * S)
    assert retention.sweep(lambda *_: False) == 0
    retention.saw(21 * S)
    assert retention.sweep(lambda *_: False) == 1


def test_restored_rows_are_merged_in_time_order() -> None:
    retention, tables = _tables()
    _write(retention, tables, 30, b"new")
    tables.decided.update({b"old": b"m", b"older": b"m"})  # as a restore puts them
    retention.restored("decided", [(25 * S, b"old"), (5 * S, b"older")])
    retention.restored("budgets", [(0, b"acme-bank")])  # a table without a window: nothing to do
    assert retention.sweep(lambda *_: False) == 1 and set(tables.decided) == {b"new", b"old"}


def test_each_table_has_its_own_window() -> None:
    retention, tables = _tables()
    retention.saw(0)
    tables.answers[b"prompt"] = b"answer"
    tables.decided[b"r"] = b"memo"
    retention.saw(2 * S)
    retention.sweep(lambda *_: False)
    assert not tables.answers and b"r" in tables.decided


def test_a_window_on_a_table_that_does_not_grow_per_request_is_refused() -> None:
    with pytest.raises(ValueError, match="budgets"):
        Retention({"budgets": timedelta(seconds=1)})


@pytest.mark.parametrize("option", ["--dedupe-window-s", "--answer-window-s"])
@pytest.mark.parametrize("value", ["0", "-5", "abc", "nan", "inf", "1e12"])
def test_a_window_outside_one_second_to_a_week_is_refused_before_anything_starts(
    option: str, value: str
) -> None:
    from typer.testing import CliRunner

    from nexuscore.cli import app
    from nexuscore.policy import DEFAULT_POLICY_PATH

    policy = str(DEFAULT_POLICY_PATH)
    args = ["run", "decider", "--bootstrap", "127.0.0.1:1", "--policy", policy, "-t", policy, option, value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and option in " ".join(result.output.split())
