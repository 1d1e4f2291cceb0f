"""The deciders' own review of an escalation whose deadline passed, and how a reader tells one from
a forgery.

A timeout is unsigned (no person acts), so anyone who can write on the reviews topic can write one.
What makes it the deciders' is that it is exactly what a decider writes: its id derived from the
request, the decider as producer and reviewer, the fixed reason, appended after its deadline. The
decider judges it against the escalation it holds as well (``policy.judge_review``: the pending
escalation's own deadline); the projector, which holds no escalations, has these checks only, so a
forgery of another shape goes to ``refusals``, not ``reviews``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from nexuscore.core._ids import derive_id
from nexuscore.policy import Refusal
from nexuscore.schemas import RequestDecided, ReviewRecorded

DECIDER = "nexuscore.decider"
TIMEOUT_REASON = "no review before the deadline"
# The decider posts a timeout once its own clock passes the deadline; the broker's may lag a little.
TIMEOUT_TOLERANCE = timedelta(seconds=5)


def timeout_review(escalated: RequestDecided, now: datetime) -> ReviewRecorded:
    """The decider's own review of an escalation whose deadline passed."""
    return ReviewRecorded(
        event_id=timeout_id(escalated.request_id, escalated.tenant_id),
        request_id=escalated.request_id,
        tenant_id=escalated.tenant_id,
        occurred_at=now,
        producer=DECIDER,
        causation_id=escalated.event_id,
        trace_id=escalated.trace_id,
        policy_digest=escalated.policy_digest,
        action="timed_out",
        reviewer=DECIDER,
        reason=TIMEOUT_REASON,
        deadline=escalated.review_deadline,
    )


def timeout_id(request_id: str, tenant_id: str) -> str:
    return derive_id(request_id, tenant_id, "review-timeout")


def judge_timeout(review: ReviewRecorded, appended_at: datetime) -> Refusal | None:
    """Is ``review`` (a ``timed_out`` one) a timeout as the deciders write it, appended after the
    deadline it names? (None: it is.)"""
    if (
        review.event_id != timeout_id(review.request_id, review.tenant_id)
        or review.producer != DECIDER
        or review.reviewer != DECIDER
        or review.reason != TIMEOUT_REASON
    ):
        return Refusal("invalid", "a timeout that is not the deciders' (its id, author or reason differ)")
    if review.deadline is None or appended_at + TIMEOUT_TOLERANCE < review.deadline:
        deadline = review.deadline.isoformat() if review.deadline else "none"
        return Refusal("not_due", f"a timeout appended before its deadline ({deadline})")
    return None
