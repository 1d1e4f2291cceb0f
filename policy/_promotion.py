"""Staged promotion: draft -> shadow -> canary -> active, as a pure fold over governance events.

Each step is a ``policy_stage_changed.v1`` event carrying the policy file, its signatures and, from
canary on, the replay report it relied on. ``check_promotion`` says whether a step may happen;
``Registry.apply`` folds an accepted step in; ``Registry.for_tenant`` says which policy decides a
tenant's requests (canary tenants are chosen by a stable hash of tenant and policy digest).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import msgspec

from nexuscore.policy._model import RoutingPolicy
from nexuscore.policy._signatures import SignedPolicy

STAGES = ("draft", "shadow", "canary", "active")
REVIEWERS_FOR_ACTIVE = 2


class Serving(msgspec.Struct, frozen=True):
    policy: RoutingPolicy
    stage: str
    signers: tuple[str, ...] = ()
    canary_share: float = 0.0

    @property
    def digest(self) -> str:
        return self.policy.digest


class Registry(msgspec.Struct, frozen=True):
    """Which policy holds which stage; ``stages`` remembers every digest ever promoted."""

    stages: dict[str, str] = msgspec.field(default_factory=dict)
    active: Serving | None = None
    canary: Serving | None = None
    shadow: Serving | None = None

    def for_tenant(self, tenant_id: str) -> Serving:
        if self.canary is not None and in_canary(tenant_id, self.canary.digest, self.canary.canary_share):
            return self.canary
        if self.active is None:
            raise LookupError("no active policy")
        return self.active

    def apply(self, signed: SignedPolicy, to_stage: str, canary_share: float = 0.0) -> Registry:
        serving = Serving(signed.policy, to_stage, tuple(s.key_id for s in signed.signatures), canary_share)
        digest = signed.policy.digest
        stages = {**self.stages, digest: to_stage}
        fields: dict[str, Any] = {"stages": stages}
        # A policy holds one stage at a time: moving on vacates the stage it held.
        for stage in ("active", "canary", "shadow"):
            held = getattr(self, stage)
            if held is not None and held.digest == digest:
                fields[stage] = None
        if to_stage in ("active", "canary", "shadow"):
            fields[to_stage] = serving
        if to_stage == "active" and self.active is not None and self.active.digest != digest:
            stages[self.active.digest] = "retired"
        return msgspec.structs.replace(self, **fields)


def in_canary(tenant_id: str, digest: str, share: float) -> bool:
    """Stable: the same tenant is in or out of a given policy's canary on every decider, every time."""
    h = hashlib.sha256(f"{digest}\x1f{tenant_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < share


def replay_report_digest(report: bytes) -> str:
    return "sha256:" + hashlib.sha256(report).hexdigest()


def check_promotion(
    registry: Registry,
    signed: SignedPolicy,
    to_stage: str,
    *,
    replay_report: bytes = b"",
    replay_report_digest_claimed: str = "",
    canary_share: float = 0.0,
) -> str | None:
    """Why this step may not happen (one sentence), or None if it may."""
    digest = signed.policy.digest
    if to_stage not in STAGES:
        return f"unknown stage {to_stage!r} (stages: {', '.join(STAGES)})"
    current = registry.stages.get(digest)
    expected_from = STAGES[STAGES.index(to_stage) - 1] if to_stage != "draft" else None
    if current != expected_from:
        where = f"is {current}" if current else "was never promoted"
        need = f"from {expected_from}" if expected_from else "as a new policy"
        return f"{digest[:19]}… {where}; {to_stage} is reached only {need}"
    if to_stage == "canary" and not 0.0 < canary_share < 1.0:
        return f"a canary share must be between 0 and 1, not {canary_share}"
    if to_stage in ("canary", "active"):
        if not replay_report:
            return f"promotion to {to_stage} needs the replay report of this exact policy"
        if replay_report_digest(replay_report) != replay_report_digest_claimed:
            return "the replay report does not match the digest the promotion names"
        try:
            report = json.loads(replay_report)
        except ValueError:
            return "the replay report is not JSON"
        if report.get("policy_digest") != digest:
            return f"the replay report is of {str(report.get('policy_digest'))[:19]}…, not of {digest[:19]}…"
        if report.get("residency_breaches", 0):
            return f"the replay report shows {report['residency_breaches']} residency breach(es)"
    if to_stage == "active":
        reviewers = {s.key_id for s in signed.signatures if s.role == "reviewer"}
        if len(reviewers) < REVIEWERS_FOR_ACTIVE:
            return (
                f"promotion to active needs signatures of {REVIEWERS_FOR_ACTIVE} distinct reviewers, "
                f"it has {len(reviewers)}"
            )
    return None
