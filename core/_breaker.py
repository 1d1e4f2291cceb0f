"""A circuit breaker per deployment, as a pure state machine (closed, open, half-open).

closed     calls flow; ``failure_threshold`` consecutive failures open it.
open       no calls until ``open_until``; then the next call is a probe (half-open).
half_open  one probe in flight: success closes it, failure opens it again for the cool-down.

Workers share openings through Kafka (``circuit_state_changed.v1``): ``adopt`` takes another
worker's opening so that every worker avoids a deployment one of them found failing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

import msgspec

State = Literal["closed", "open", "half_open"]


class BreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    failure_threshold: int = 5
    cool_down_s: float = 10.0


class Breaker(msgspec.Struct, frozen=True, kw_only=True):
    state: State = "closed"
    consecutive_failures: int = 0
    open_until: datetime | None = None


class Transition(msgspec.Struct, frozen=True, kw_only=True):
    """A change of state, to be published and recorded as evidence."""

    from_state: State
    to_state: State
    reason: str
    breaker: Breaker


CLOSED = Breaker()


def admit(b: Breaker, now: datetime) -> tuple[bool, Breaker, Transition | None]:
    """May a call go to this deployment now? An open breaker past its cool-down lets one probe in."""
    if b.state == "closed":
        return True, b, None
    if b.state == "open" and b.open_until is not None and now >= b.open_until:
        probing = Breaker(state="half_open", consecutive_failures=b.consecutive_failures)
        return (
            True,
            probing,
            Transition(
                from_state="open",
                to_state="half_open",
                reason="cool-down over: one probe call",
                breaker=probing,
            ),
        )
    return False, b, None


def record(
    b: Breaker, ok: bool, now: datetime, config: BreakerConfig, error: str = ""
) -> tuple[Breaker, Transition | None]:
    """Fold one call's result into the breaker."""
    if ok:
        if b.state == "closed" and b.consecutive_failures == 0:
            return b, None
        closed = CLOSED
        if b.state == "closed":
            return closed, None
        return closed, Transition(
            from_state=b.state, to_state="closed", reason="probe call succeeded", breaker=closed
        )
    failures = b.consecutive_failures + 1
    if b.state == "half_open" or (b.state == "closed" and failures >= config.failure_threshold):
        opened = Breaker(
            state="open",
            consecutive_failures=failures,
            open_until=now + timedelta(seconds=config.cool_down_s),
        )
        why = "probe call failed" if b.state == "half_open" else f"{failures} consecutive failures"
        return opened, Transition(
            from_state=b.state, to_state="open", reason=f"{why}: {error}"[:300], breaker=opened
        )
    if b.state == "open":
        return b, None  # a call admitted before another worker's opening arrived
    return Breaker(state=b.state, consecutive_failures=failures, open_until=b.open_until), None


def adopt(b: Breaker, to_state: State, open_until: datetime | None) -> Breaker:
    """Take up another worker's transition: its openings (and the closing after a good probe)."""
    if to_state == "open" and open_until is not None:
        if b.state == "open" and b.open_until is not None and b.open_until >= open_until:
            return b
        return Breaker(state="open", consecutive_failures=b.consecutive_failures, open_until=open_until)
    if to_state == "closed" and b.state != "closed":
        return CLOSED
    return b
