"""Staged promotion as a pure fold: which steps are allowed, and who decides for which tenant."""

from __future__ import annotations

import json
from datetime import timedelta

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.policy import (
    DEFAULT_POLICY_PATH,
    GovernanceState,
    SignedPolicy,
    TrustStore,
    judge,
    sign,
    sign_promotion,
    trusted_key_entry,
)
from nexuscore.policy._promotion import Registry, check_promotion, in_canary, replay_report_digest
from nexuscore.schemas import PolicyStageChanged
from nexuscore.streams import bootstrap_event
from tests.factories import POLICY, T0

ALICE, BOB, OPERATOR = (Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3))
TRUST = TrustStore(
    keys=(
        trusted_key_entry(ALICE.public_key(), "alice", ("reviewer",)),
        trusted_key_entry(BOB.public_key(), "bob", ("reviewer",)),
        trusted_key_entry(OPERATOR.public_key(), "olga", ("operator",)),
    )
)
DOCUMENT = DEFAULT_POLICY_PATH.read_bytes()
CANDIDATE_DOC = DOCUMENT.replace(b'version: "2026.11.1"', b'version: "2026.12.0"')
CANDIDATE = type(POLICY).model_validate({**POLICY.model_dump(mode="json"), "version": "2026.12.0"})


def signed(*keys: Ed25519PrivateKey, policy=CANDIDATE, document=CANDIDATE_DOC) -> SignedPolicy:  # type: ignore[no-untyped-def]
    sigs = tuple(
        sign(policy, document, k, signer="x", role="reviewer", now=T0, valid_for=timedelta(days=9))
        for k in keys
    )
    return SignedPolicy(policy, sigs)


def report_for(digest: str, breaches: int = 0) -> bytes:
    return json.dumps({"policy_digest": digest, "residency_breaches": breaches}).encode()


def test_each_stage_is_reached_only_from_the_one_before() -> None:
    one = signed(ALICE)
    empty = Registry()
    assert check_promotion(empty, one, "shadow") is not None
    assert check_promotion(empty, one, "draft") is None
    drafted = empty.apply(one, "draft")
    assert check_promotion(drafted, one, "draft") is not None
    assert check_promotion(drafted, one, "canary") is not None
    assert check_promotion(drafted, one, "shadow") is None
    assert "unknown stage" in str(check_promotion(drafted, one, "production"))


def test_canary_and_active_need_the_replay_report_of_this_exact_policy() -> None:
    both = signed(ALICE, BOB)
    shadowed = Registry().apply(both, "draft").apply(both, "shadow")
    good = report_for(CANDIDATE.digest)
    kw = {"canary_share": 0.2}
    assert "needs the replay report" in str(check_promotion(shadowed, both, "canary", **kw))
    assert "does not match" in str(
        check_promotion(
            shadowed, both, "canary", replay_report=good, replay_report_digest_claimed="sha256:00", **kw
        )
    )
    other = report_for(POLICY.digest)
    assert "not of" in str(
        check_promotion(shadowed, both, "canary", replay_report=other,
                        replay_report_digest_claimed=replay_report_digest(other), **kw)
    )  # fmt: skip
    breach = report_for(CANDIDATE.digest, breaches=3)
    assert "residency breach" in str(
        check_promotion(shadowed, both, "canary", replay_report=breach,
                        replay_report_digest_claimed=replay_report_digest(breach), **kw)
    )  # fmt: skip
    assert "share" in str(
        check_promotion(shadowed, both, "canary", replay_report=good,
                        replay_report_digest_claimed=replay_report_digest(good), canary_share=1.0)
    )  # fmt: skip
    ok = {"replay_report": good, "replay_report_digest_claimed": replay_report_digest(good)}
    assert check_promotion(shadowed, both, "canary", **ok, **kw) is None


def test_active_needs_two_distinct_reviewers_and_retires_the_old_active() -> None:
    good = report_for(CANDIDATE.digest)
    ok = {"replay_report": good, "replay_report_digest_claimed": replay_report_digest(good)}
    base = Registry().apply(SignedPolicy(POLICY, ()), "active")
    lone = signed(ALICE, ALICE)
    canaried = base.apply(lone, "draft").apply(lone, "shadow").apply(lone, "canary", 0.3)
    assert "2 distinct reviewers" in str(check_promotion(canaried, lone, "active", **ok))
    both = signed(ALICE, BOB)
    assert check_promotion(canaried, both, "active", **ok) is None
    promoted = canaried.apply(both, "active")
    assert promoted.active is not None and promoted.active.digest == CANDIDATE.digest
    assert promoted.canary is None and promoted.stages[POLICY.digest] == "retired"


def test_canary_tenants_are_chosen_by_a_stable_hash() -> None:
    tenants = [f"tenant-{i}" for i in range(2000)]
    chosen = [t for t in tenants if in_canary(t, CANDIDATE.digest, 0.25)]
    assert 400 < len(chosen) < 600
    assert chosen == [t for t in tenants if in_canary(t, CANDIDATE.digest, 0.25)]
    registry = Registry().apply(SignedPolicy(POLICY, ()), "active").apply(signed(ALICE), "canary", 0.25)
    assert {registry.for_tenant(t).stage for t in chosen} == {"canary"}
    assert {registry.for_tenant(t).stage for t in tenants if t not in chosen} == {"active"}


def test_a_decider_refuses_a_tampered_or_untrusted_promotion_and_keeps_its_policy() -> None:
    both = signed(ALICE, BOB, policy=POLICY, document=DOCUMENT)
    sigs = json.dumps({"signatures": [msgspec.to_builtins(s) for s in both.signatures]})
    boot = bootstrap_event(both, DOCUMENT, sigs, "decider", T0)
    state, refused = judge(GovernanceState(), boot, TRUST, T0)
    assert refused is None and state.registry.active is not None
    assert state.registry.active.digest == POLICY.digest
    draft = sign_promotion(msgspec.structs.replace(
        boot, event_id="d", from_stage="", to_stage="draft", reason="", policy_digest=CANDIDATE.digest,
        policy_version=CANDIDATE.version, actor="olga", occurred_at=T0 + timedelta(seconds=1),
        document=CANDIDATE_DOC.decode(), signatures=json.dumps(
            {"signatures": [msgspec.to_builtins(s) for s in signed(ALICE).signatures]}),
    ), OPERATOR)  # fmt: skip
    after, refused = judge(state, draft, TRUST, T0 + timedelta(seconds=2))
    assert refused is None and after.registry.stages[CANDIDATE.digest] == "draft"
    tampered = sign_promotion(
        msgspec.structs.replace(draft, document=CANDIDATE_DOC.decode().replace("0.0002", "0.0001")), OPERATOR
    )
    kept, refused = judge(state, tampered, TRUST, T0 + timedelta(seconds=2))
    assert kept is state and refused is not None and refused.code == "invalid"
    stranger = sign_promotion(msgspec.structs.replace(draft, signatures=json.dumps(
        {"signatures": [msgspec.to_builtins(s) for s in signed(Ed25519PrivateKey.generate()).signatures]})),
        OPERATOR)  # fmt: skip
    kept, refused = judge(state, stranger, TRUST, T0 + timedelta(seconds=2))
    assert kept is state and "unknown_key" in str(refused)
    assert isinstance(draft, PolicyStageChanged)
