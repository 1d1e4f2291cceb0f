"""Signed human acts: kill switches, promotion steps and reviews.

Every act a person makes on a running pipeline is an event anyone with a producer credential could
also write. So each is signed by an Ed25519 key of the deciders' trust store, of the role the act
needs (operator: kill switches and promotion steps; reviewer: reviews), over the fields that say
what it acts on (scope and target; digest, version and stages; request, tenant and escalation) and
when it was signed. An act is taken only while fresh: signed at most ``FRESHNESS`` before the broker
appended it (the topic's LogAppendTime, which a producer cannot set), and never after. Whether it is
newer than the last act applied to the same thing is the governance fold's business
(``nexuscore.policy.judge``) and, for reviews, the decider's.

A refusal is a ``Refusal``: a stable code an auditor can count by, and one sentence.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.kernel import signing
from nexuscore.policy._signatures import Role, TrustedKey, TrustStore
from nexuscore.schemas import KillSwitchChanged, PolicyStageChanged, ReviewRecorded

# How long a signed act may take to reach the log, and how far ahead of the broker's clock a
# signer's clock may run.
FRESHNESS = timedelta(minutes=15)
CLOCK_SKEW = timedelta(minutes=2)
TIMEOUT_TOLERANCE = timedelta(seconds=5)

RefusalCode = Literal[
    "unsigned",
    "unknown_key",
    "wrong_role",
    "revoked_key",
    "bad_signature",
    "actor_mismatch",
    "stale",
    "replayed",
    "not_newer",
    "invalid",
    "refused_step",
    "not_pending",
    "not_due",
    "wrong_escalation",
    "internal_error",
]


# Refusals anyone can judge from the message and the trust store alone (the projector records them
# from the topic); the others depend on a decider's state, and the decider records them.
SIGNER_CODES = frozenset(
    {"unsigned", "unknown_key", "wrong_role", "revoked_key", "bad_signature", "actor_mismatch", "stale"}
)


class Refusal(msgspec.Struct, frozen=True):
    code: RefusalCode
    reason: str

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


def _message(purpose: str, body: dict[str, object]) -> bytes:
    return msgspec.json.encode({"purpose": purpose, **body}, order="sorted")


def kill_switch_message(event: KillSwitchChanged) -> bytes:
    """The bytes an operator signs: every field that decides what the switch does, and when."""
    return _message(
        "nexuscore-kill-switch-v1",
        {
            "event_id": event.event_id,
            "scope": event.scope,
            "target": event.target,
            "mode": event.mode,
            "actor": event.actor,
            "reason": event.reason,
            "occurred_at": event.occurred_at.isoformat(),
            "key_id": event.key_id,
        },
    )


def promotion_message(event: PolicyStageChanged) -> bytes:
    """The bytes an operator signs for a promotion step: the policy, the step, the replay report
    relied on (by digest: the report's own bytes travel in the event and are hashed), and when."""
    return _message(
        "nexuscore-promotion-v1",
        {
            "event_id": event.event_id,
            "policy_digest": event.policy_digest,
            "policy_version": event.policy_version,
            "from_stage": event.from_stage,
            "to_stage": event.to_stage,
            "canary_share": event.canary_share,
            "replay_report_digest": event.replay_report_digest,
            "actor": event.actor,
            "reason": event.reason,
            "occurred_at": event.occurred_at.isoformat(),
            "key_id": event.key_id,
        },
    )


def review_message(event: ReviewRecorded) -> bytes:
    """The bytes a reviewer signs: which request of which tenant, which escalation (its decision's
    event id, ``causation_id``), the action, the reason, who, and when."""
    return _message(
        "nexuscore-review-v1",
        {
            "event_id": event.event_id,
            "request_id": event.request_id,
            "tenant_id": event.tenant_id,
            "causation_id": event.causation_id,
            "action": event.action,
            "reviewer": event.reviewer,
            "reason": event.reason,
            "occurred_at": event.occurred_at.isoformat(),
            "key_id": event.key_id,
        },
    )


def sign_kill_switch(event: KillSwitchChanged, key: Ed25519PrivateKey) -> KillSwitchChanged:
    keyed = msgspec.structs.replace(event, key_id=signing.key_id(key.public_key()), signature="")
    return msgspec.structs.replace(keyed, signature=signing.sign(key, kill_switch_message(keyed)))


def sign_promotion(event: PolicyStageChanged, key: Ed25519PrivateKey) -> PolicyStageChanged:
    keyed = msgspec.structs.replace(event, key_id=signing.key_id(key.public_key()), signature="")
    return msgspec.structs.replace(keyed, signature=signing.sign(key, promotion_message(keyed)))


def sign_review(event: ReviewRecorded, key: Ed25519PrivateKey) -> ReviewRecorded:
    keyed = msgspec.structs.replace(event, key_id=signing.key_id(key.public_key()), signature="")
    return msgspec.structs.replace(keyed, signature=signing.sign(key, review_message(keyed)))


def check_signer(
    key_id: str, signature: str, message: bytes, role: Role, trust: TrustStore, now: datetime
) -> TrustedKey | Refusal:
    """The trusted key that signed ``message`` in ``role``, or why not."""
    if not key_id or not signature:
        return Refusal("unsigned", f"not signed: a key of the {role} role must sign it")
    trusted = trust.get(key_id)
    if trusted is None:
        return Refusal("unknown_key", f"signed by key {key_id[:16]}, which the trust store does not know")
    if role not in trusted.roles:
        return Refusal("wrong_role", f"key {key_id} ({trusted.name}) is not a {role}'s")
    if trusted.revoked_at is not None and trusted.revoked_at <= now:
        return Refusal(
            "revoked_key", f"key {key_id} ({trusted.name}) was revoked {trusted.revoked_at.isoformat()}"
        )
    if not signing.verify(trusted.key(), message, signature):
        return Refusal(
            "bad_signature", f"the signature of key {key_id} ({trusted.name}) does not match the act"
        )
    return trusted


def check_fresh(signed_at: datetime, appended_at: datetime) -> Refusal | None:
    """An act must reach the log soon after it was signed, and not before."""
    if signed_at > appended_at + CLOCK_SKEW:
        return Refusal(
            "stale", f"signed at {signed_at.isoformat()}, after the log took it ({appended_at.isoformat()})"
        )
    if signed_at < appended_at - FRESHNESS:
        return Refusal(
            "stale",
            f"signed at {signed_at.isoformat()}, more than {int(FRESHNESS.total_seconds() // 60)} minutes "
            f"before the log took it ({appended_at.isoformat()}): an old act replayed?",
        )
    return None


def check_act(
    key_id: str,
    signature: str,
    message: bytes,
    role: Role,
    actor: str,
    trust: TrustStore,
    signed_at: datetime,
    appended_at: datetime,
) -> TrustedKey | Refusal:
    """Signed by a trusted key of ``role`` whose name is the recorded ``actor``, and fresh."""
    signer = check_signer(key_id, signature, message, role, trust, appended_at)
    if isinstance(signer, Refusal):
        return signer
    if actor != signer.name:
        return Refusal("actor_mismatch", f"the act names {actor!r}, but key {key_id} is {signer.name!r}'s")
    return check_fresh(signed_at, appended_at) or signer


def check_review(event: ReviewRecorded, trust: TrustStore, appended_at: datetime) -> TrustedKey | Refusal:
    """A person's review (approved or denied): a reviewer's fresh signature, in their own name."""
    return check_act(
        event.key_id,
        event.signature,
        review_message(event),
        "reviewer",
        event.reviewer,
        trust,
        event.occurred_at,
        appended_at,
    )


def judge_review(
    review: ReviewRecorded,
    escalation_id: str,
    deadline: datetime | None,
    trust: TrustStore,
    appended_at: datetime,
) -> Refusal | None:
    """May this review end the escalation whose decision is ``escalation_id``? (None: it may.)

    A person's approval or denial needs a reviewer's fresh signature in their own name, over this
    very escalation. A timeout is the deciders' own and unsigned, so anyone could write one: it is
    taken only once the log's clock has passed the deadline, when it does what the decider would.
    """
    if review.causation_id != escalation_id:
        return Refusal(
            "wrong_escalation",
            f"the review answers escalation {review.causation_id or '(none)'}, the pending one is {escalation_id}",
        )
    if review.action == "timed_out":
        # The decider posts a timeout once its own clock passes the deadline; the broker's clock
        # may run a little behind it.
        if deadline is None or appended_at + TIMEOUT_TOLERANCE < deadline:
            return Refusal(
                "not_due", f"a timeout before the deadline ({deadline.isoformat() if deadline else 'none'})"
            )
        return None
    signer = check_review(review, trust, appended_at)
    return signer if isinstance(signer, Refusal) else None
