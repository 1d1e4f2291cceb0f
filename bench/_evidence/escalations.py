"""How the synthetic store's escalated requests end: a reviewer's signed denial, or the deadline.

Every escalated decision needs a terminal state, as in the live pipeline (``core`` resolves an
escalation with an ``EscalationResolved`` once a review, or the decider's own timeout, arrives):
half of them are denied by a person, whose review carries the key id of a reviewer key (the
table keeps the key id of the signing key, as the projector does: the signature stays on the topic),
the others time out with the decider's own unsigned review (as ``streams`` writes it). Each gets one ``reviews`` row (topic
``reviews``) and one ``resolutions`` row (topic ``decisions``), after its decision.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench._evidence.synthetic import MS, const, hex_ids, take, ts
from nexuscore.kernel import signing

REVIEW_DELAY_US = 20 * 60 * 1_000_000  # a person answers within 20 minutes
TIMEOUT_US = 24 * 3600 * 1_000_000  # the deadline passes a day after the escalation
DECIDER = "nexuscore.decider"
REVIEWER = "bench-reviewer"


@functools.cache
def reviewer_key() -> Ed25519PrivateKey:
    """A fixed reviewer key (the store is deterministic per seed)."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"nexuscore bench reviewer").digest())


def escalation_tables(b: Any) -> None:
    """Add ``reviews`` and ``resolutions`` to the chunk builder ``b`` (a ``_ChunkBuilder``)."""
    e = np.flatnonzero(b.escalated)  # index into decisions
    n, er = len(e), b.d[e]  # their requests
    denied = b.rng.random(n) < 0.5
    t_dec = b.t_dec[e]
    t_rev = np.where(denied, t_dec + REVIEW_DELAY_US, t_dec + TIMEOUT_US)
    rev_id = hex_ids(b.rng, n)
    key_id = signing.key_id(reviewer_key().public_key())
    reviewer = take([DECIDER, REVIEWER], denied.astype(np.int64))
    reason = take(["no review before the deadline", "denied: not for a model"], denied.astype(np.int64))
    common = _envelope(b, e, er)
    b.cols["reviews"] = {
        **common(
            rev_id,
            t_rev,
            take([DECIDER, "nexuscore.review"], denied.astype(np.int64)),
            b.dec_id.take(pa.array(e)),
        ),
        "action": take(["timed_out", "denied"], denied.astype(np.int64)),
        "reviewer": reviewer,
        "reason": reason,
        "deadline": ts(t_dec + TIMEOUT_US),
        "key_id": take(["", key_id], denied.astype(np.int64)),
    }
    t_res = t_rev + 1 * MS
    b.cols["resolutions"] = {
        **common(hex_ids(b.rng, n), t_res, const(DECIDER, n), rev_id),
        "feature": take(b.feature_arr, er),
        "resolution": take(["timed_out", "denied"], denied.astype(np.int64)),
        "review_event_id": rev_id,
        "reviewer": reviewer,
        "review_reason": reason,
        "verdict_reason": take(
            ["no review before the deadline", f"denied by {REVIEWER}"], denied.astype(np.int64)
        ),
        "policy_version": const(b.gen.version, n),
        "budget_action": const("not_applicable", n),
        "state_version": pa.array(b.version[e] + 1),
        "reasons": pa.array([[]] * n, type=_reasons_type()),
    }
    b.times["reviews"], b.tenant_of["reviews"] = t_rev, b.tenant[er]
    b.times["resolutions"], b.tenant_of["resolutions"] = t_res, b.tenant[er]


def _envelope(b: Any, e: np.ndarray, er: np.ndarray) -> Any:
    def columns(
        ids: pa.Array, at: np.ndarray, producer: pa.Array, causation: pa.Array
    ) -> dict[str, pa.Array]:
        return {
            "event_id": ids,
            "request_id": take(b.req_id, er),
            "tenant_id": take(b.tenant_arr, er),
            "occurred_at": ts(at),
            "producer": producer,
            "causation_id": causation,
            "trace_id": take(b.trace, er),
            "policy_digest": const(b.gen.digest, len(e)),
        }

    return columns


@functools.cache
def _reasons_type() -> pa.DataType:
    from nexuscore.projections import SCHEMAS

    return SCHEMAS["resolutions"].field("reasons").type
