"""The fault run's stall measure: idle time is not a stall, waiting work without completions is."""

from __future__ import annotations

from tests.fault._stalls import stall_after, still_intervals


def test_work_waiting_without_completions_is_a_stall_measured_from_the_fault() -> None:
    intervals = still_intervals(arrivals=[0, 1, 2, 10, 10.1], completions=[0.5, 1.2, 2.1, 16, 16.05])
    assert (10, 16) in intervals
    assert abs(stall_after(10.05, intervals) - 5.95) < 1e-9


def test_idle_time_between_waves_is_not_a_stall() -> None:
    intervals = still_intervals(arrivals=[0, 1, 30], completions=[0.2, 1.1, 30.1])
    assert all(end - start < 0.5 for start, end in intervals)
    assert stall_after(5, intervals) == 0.0


def test_a_backlog_that_keeps_completing_is_not_a_stall() -> None:
    arrivals = [0.0] * 100
    completions = [0.01 * i for i in range(1, 101)]
    assert stall_after(0.0, still_intervals(arrivals, completions)) == 0.0


def test_work_arriving_after_the_fault_is_counted_from_its_arrival_not_from_the_fault() -> None:
    # The stage was killed while idle; the next work came 10 s later and waited 2 s.
    intervals = still_intervals(arrivals=[0, 10], completions=[0.1, 12])
    assert stall_after(1.0, intervals) == 2.0


def test_the_longest_wait_after_the_fault_is_the_stall() -> None:
    intervals = still_intervals(arrivals=[0, 0, 10], completions=[1, 8, 14.5])
    assert stall_after(0.0, intervals) == 7.0
