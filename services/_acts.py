"""The signed acts of people on a running pipeline: a review of an escalation, a promotion step, a
kill switch; and the one way each is put on its topic.

Each is a signed event on Kafka (``review_recorded.v1`` on the reviews topic, keyed by tenant so
that it reaches the decider holding the request; ``policy_stage_changed.v1`` and
``kill_switch_changed.v1`` on the governance topic), signed with the person's key of the right role
(``nexuscore.policy.sign_*``), so they are taken up without a restart, refused when forged or stale,
and recorded as evidence either way.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import cast

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.core import derive_id
from nexuscore.kernel import signing
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import (
    MODES,
    SCOPES,
    Registry,
    Role,
    TrustStore,
    load_policy,
    load_trust_store,
    read_signatures,
    replay_report_digest,
    sign_kill_switch,
    sign_promotion,
    sign_review,
    signatures_path,
)
from nexuscore.schemas import (
    AvroCodec,
    KillSwitchChanged,
    PolicyStageChanged,
    ReviewRecorded,
    SwitchMode,
    SwitchScope,
)
from nexuscore.streams import POLICY_KEY
from nexuscore.transport import Topics, new_producer, start_client


def load_signer(
    key_path: Path, trust_path: Path, role: Role, claimed: str = ""
) -> tuple[Ed25519PrivateKey, str]:
    """The private key at ``key_path`` and the trust store's name for it in ``role``; ``claimed``,
    when given, must be that name (an act is recorded in the key's name, never in a typed one)."""
    key = signing.load_private_key(key_path)
    name = signer_name(key, load_trust_store(trust_path), role)
    if claimed and claimed != name:
        raise NexusError(f"--key is {name}'s key in the trust store, not {claimed!r}'s")
    return key, name


def signer_name(key: Ed25519PrivateKey, trust: TrustStore, role: Role) -> str:
    """The trust store's name for ``key`` in ``role``: the actor every act records."""
    key_id = signing.key_id(key.public_key())
    trusted = trust.get(key_id)
    if trusted is None:
        raise NexusError(f"key {key_id} is not in the trust store: the deciders would refuse the act")
    if role not in trusted.roles:
        raise NexusError(f"key {key_id} ({trusted.name}) does not have the {role} role in the trust store")
    return trusted.name


def review_event(
    request_id: str,
    tenant_id: str,
    escalation_id: str,
    action: str,
    reason: str,
    key: Ed25519PrivateKey,
    reviewer: str,
    now: datetime,
) -> ReviewRecorded:
    """A reviewer's signed decision on one escalation (``escalation_id``: its decision's event id)."""
    if action not in ("approved", "denied"):
        raise NexusError(f"a review approves or denies, not {action!r}")
    if not reason.strip():
        raise NexusError("a review needs a reason (--reason): it goes into the evidence")
    unsigned = ReviewRecorded(
        event_id=derive_id(tenant_id, request_id, "review", action, reviewer, now.isoformat()),
        request_id=request_id,
        tenant_id=tenant_id,
        occurred_at=now,
        producer="nexuscore.review",
        causation_id=escalation_id,
        action=action,  # type: ignore[arg-type]  # checked above
        reviewer=reviewer,
        reason=reason,
    )
    return sign_review(unsigned, key)


def kill_switch_event(
    scope: str, target: str, mode: str, reason: str, key: Ed25519PrivateKey, actor: str, now: datetime
) -> KillSwitchChanged:
    """An operator's signed kill switch: ``mode`` (off, offline, on) for ``scope`` and ``target``."""
    if scope not in SCOPES:
        raise NexusError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if mode not in MODES:
        raise NexusError(f"the mode must be one of {', '.join(MODES)}, not {mode!r}")
    if (scope == "global") != (target == ""):
        raise NexusError("--target names the tenant or feature; a global switch has none")
    if not reason.strip():
        raise NexusError("a kill switch needs a reason (--reason): it goes into the evidence")
    unsigned = KillSwitchChanged(
        event_id=derive_id("kill-switch", scope, target, mode, actor, now.isoformat()),
        request_id="",
        tenant_id=target if scope == "tenant" else "",
        occurred_at=now,
        producer="nexuscore.control",
        scope=cast(SwitchScope, scope),  # checked above
        target=target,
        mode=cast(SwitchMode, mode),  # checked above
        actor=actor,
        reason=reason,
    )
    return sign_kill_switch(unsigned, key)


def promotion_event(
    path: Path,
    to: str,
    key_path: Path,
    trust: TrustStore,
    registry: Registry,
    report: bytes,
    canary_share: float,
    reason: str,
    now: datetime,
) -> PolicyStageChanged:
    """One promotion step of the policy file at ``path``, signed by the operator's key."""
    key = signing.load_private_key(key_path)
    actor = signer_name(key, trust, "operator")
    try:
        document = path.read_bytes()
    except OSError as exc:
        raise NexusError(f"cannot read the policy {path}: {exc.strerror}") from exc
    policy = load_policy(path)
    signatures = read_signatures(signatures_path(path))
    unsigned = PolicyStageChanged(
        event_id=derive_id("policy", policy.digest, to, now.isoformat()),
        request_id="",
        tenant_id="",
        occurred_at=now,
        producer="nexuscore.cli",
        policy_digest=policy.digest,
        policy_version=policy.version,
        from_stage=registry.stages.get(policy.digest, ""),
        to_stage=to,
        actor=actor,
        signers=[x.key_id for x in signatures],
        replay_report_digest=replay_report_digest(report) if report else "",
        reason=reason,
        document=document.decode("utf-8"),
        signatures=json.dumps({"signatures": [msgspec.to_builtins(x) for x in signatures]}),
        replay_report=report.decode("utf-8", "replace"),
        canary_share=canary_share,
    )
    return sign_promotion(unsigned, key)


async def publish(
    bootstrap: str,
    topics: Topics,
    event: ReviewRecorded | KillSwitchChanged,
    *more: ReviewRecorded | KillSwitchChanged,
) -> None:
    """Put reviews on the reviews topic (keyed by tenant: each reaches the decider holding its
    request) and kill switches on the governance topic (one key: all in order), through one producer."""
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    codec = AvroCodec()
    try:
        sent = []
        for act in (event, *more):
            if isinstance(act, ReviewRecorded):
                topic, key = topics.reviews, act.tenant_id.encode()
            else:
                topic, key = topics.governance, POLICY_KEY
            sent.append(await producer.send(topic, codec.encode(act), key=key))
        for future in sent:
            await future
    finally:
        await producer.stop()
