"""The governance fold under attack: forged, replayed, stale and malformed acts are refused with a
stable code, and the state they would have changed stays as it was. Each test names the finding of
the "Trust under attack" issue it guards."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.policy import (
    DEFAULT_POLICY_PATH,
    FRESHNESS,
    GovernanceState,
    SignedPolicy,
    TrustStore,
    judge,
    sign,
    sign_kill_switch,
    sign_promotion,
    trusted_key_entry,
)
from nexuscore.schemas import KillSwitchChanged, PolicyStageChanged
from nexuscore.streams import bootstrap_event
from tests.factories import POLICY, T0

OPS, ALICE, BOB, MALLORY = (Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (11, 12, 13, 14))
TRUST = TrustStore(
    keys=(
        trusted_key_entry(OPS.public_key(), "dana@ops", ("operator",)),
        trusted_key_entry(ALICE.public_key(), "alice", ("reviewer",)),
        trusted_key_entry(BOB.public_key(), "bob", ("reviewer",)),
    )
)
DOCUMENT = DEFAULT_POLICY_PATH.read_bytes()
CANDIDATE_DOC = DOCUMENT.replace(b'version: "2026.11.1"', b'version: "2026.12.0"')
CANDIDATE = type(POLICY).model_validate({**POLICY.model_dump(mode="json"), "version": "2026.12.0"})


def switch(
    mode: str, at: datetime, *, key: Ed25519PrivateKey = OPS, actor: str = "dana@ops", target: str = ""
) -> KillSwitchChanged:
    event = KillSwitchChanged(
        event_id=f"k-{mode}-{at.isoformat()}", request_id="", tenant_id="", occurred_at=at, producer="t",
        scope="tenant" if target else "global", target=target, mode=mode, actor=actor, reason="incident 42",
    )  # fmt: skip
    return sign_kill_switch(event, key)


def active_state() -> GovernanceState:
    sigs = [
        sign(POLICY, DOCUMENT, k, signer="x", role="reviewer", now=T0, valid_for=timedelta(days=9))
        for k in (ALICE, BOB)
    ]
    boot = bootstrap_event(
        SignedPolicy(POLICY, tuple(sigs)),
        DOCUMENT,
        json.dumps({"signatures": [msgspec.to_builtins(s) for s in sigs]}),
        "decider",
        T0,
    )
    state, refused = judge(GovernanceState(), boot, TRUST, T0)
    assert refused is None
    return state


def step(
    to: str, at: datetime, *, key: Ed25519PrivateKey | None = OPS, **changes: object
) -> PolicyStageChanged:
    sigs = [
        sign(CANDIDATE, CANDIDATE_DOC, k, signer="x", role="reviewer", now=T0, valid_for=timedelta(days=9))
        for k in (ALICE, BOB)
    ]
    event = PolicyStageChanged(
        event_id=f"p-{to}-{at.isoformat()}", request_id="", tenant_id="", occurred_at=at, producer="cli",
        policy_digest=CANDIDATE.digest, policy_version=CANDIDATE.version, from_stage="", to_stage=to,
        actor="dana@ops", document=CANDIDATE_DOC.decode(),
        signatures=json.dumps({"signatures": [msgspec.to_builtins(s) for s in sigs]}),
    )  # fmt: skip
    event = msgspec.structs.replace(event, **changes)  # type: ignore[arg-type]
    return sign_promotion(event, key) if key is not None else event


def test_a_replayed_older_kill_switch_is_refused_and_the_newer_one_holds() -> None:
    # Finding 2: re-publishing an old signed "on" lifted a live global "off".
    t = T0
    on, off = switch("on", t), switch("off", t + timedelta(minutes=1))
    state, _ = judge(GovernanceState(), on, TRUST, t)
    state, refused = judge(state, off, TRUST, t + timedelta(minutes=1))
    assert refused is None and state.controls.for_request("acme-bank", "f") is not None
    again, refused = judge(state, on, TRUST, t + timedelta(minutes=2))
    assert again is state and refused is not None and refused.code == "not_newer"
    same, refused = judge(state, off, TRUST, t + timedelta(minutes=2))
    assert same is state and refused is not None and refused.code == "replayed"


def test_a_signed_act_that_reaches_the_log_long_after_signing_is_stale() -> None:
    late = T0 + FRESHNESS + timedelta(seconds=1)
    state, refused = judge(GovernanceState(), switch("off", T0), TRUST, late)
    assert refused is not None and refused.code == "stale" and not state.controls.switches
    future, refused = judge(GovernanceState(), switch("off", T0 + timedelta(hours=1)), TRUST, T0)
    assert refused is not None and refused.code == "stale"


@pytest.mark.parametrize(
    ("key", "actor", "code"),
    [
        (MALLORY, "dana@ops", "unknown_key"),
        (ALICE, "alice", "wrong_role"),
        (OPS, "someone-else", "actor_mismatch"),
    ],
)
def test_a_kill_switch_needs_an_operators_key_in_the_operators_own_name(
    key: Ed25519PrivateKey, actor: str, code: str
) -> None:
    state, refused = judge(GovernanceState(), switch("off", T0, key=key, actor=actor), TRUST, T0)
    assert refused is not None and refused.code == code and not state.controls.switches


def test_a_promotion_needs_the_operators_signature() -> None:
    # Finding 4: anyone who could write to the topic moved a candidate to active with a made-up report.
    state = active_state()
    unsigned = step("draft", T0 + timedelta(seconds=1), key=None)
    kept, refused = judge(state, unsigned, TRUST, T0 + timedelta(seconds=1))
    assert kept is state and refused is not None and refused.code == "unsigned"
    forged = step("draft", T0 + timedelta(seconds=1), key=MALLORY)
    kept, refused = judge(state, forged, TRUST, T0 + timedelta(seconds=1))
    assert kept is state and refused is not None and refused.code == "unknown_key"
    tampered = msgspec.structs.replace(step("draft", T0 + timedelta(seconds=1)), to_stage="shadow")
    kept, refused = judge(state, tampered, TRUST, T0 + timedelta(seconds=1))
    assert refused is not None and refused.code == "bad_signature"


def test_a_promotion_must_name_the_documents_version_and_move_one_stage_from_where_it_is() -> None:
    state = active_state()
    t = T0 + timedelta(seconds=1)
    wrong_version = step("draft", t, policy_version="9.9.9")
    _, refused = judge(state, wrong_version, TRUST, t)
    assert refused is not None and refused.code == "invalid" and "version" in refused.reason
    skipping = step("active", t, from_stage="canary")
    _, refused = judge(state, skipping, TRUST, t)
    assert refused is not None and refused.code == "refused_step"
    drafted, refused = judge(state, step("draft", t), TRUST, t)
    assert refused is None and drafted.registry.stages[CANDIDATE.digest] == "draft"
    replay, refused = judge(drafted, step("draft", t), TRUST, t + timedelta(seconds=1))
    assert replay is drafted and refused is not None and refused.code == "replayed"
    older, refused = judge(drafted, step("shadow", t - timedelta(seconds=1), from_stage="draft"), TRUST, t)
    assert older is drafted and refused is not None and refused.code == "not_newer"


def test_a_governance_act_whose_document_is_5000_levels_deep_is_refused_not_a_crash() -> None:
    # Finding 1: one unsigned message like this stopped every decider for good.
    deep = "a: " + "[" * 5000 + "]" * 5000
    for event in (step("draft", T0, key=None, document=deep), step("draft", T0, document=deep)):
        state, refused = judge(GovernanceState(), event, TRUST, T0)
        assert refused is not None and state == GovernanceState()
