"""The services behind the policy, control and run commands, called directly (no CLI, no broker,
no mocks): keys and trust stores as files, signatures, the decider's bootstrap step, the policies
replay may trust, and the policy history in the evidence."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import services
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import (
    GovernanceState,
    SignedPolicy,
    TrustStore,
    add_signature,
    load_signed_policy,
    save_trust_store,
    sign,
    signatures_path,
)
from nexuscore.schemas import PolicyStageChanged
from nexuscore.streams import bootstrap_event
from tests.factories import POLICY, T0, project
from tests.unit.test_governance_acts import ALICE, BOB, CANDIDATE, DOCUMENT, MALLORY, OPS, TRUST, step


def pem(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return path


def trust_file(tmp_path: Path, trust: TrustStore = TRUST) -> Path:
    path = tmp_path / "trust.yaml"
    save_trust_store(path, trust)
    return path


def signed_policy_file(tmp_path: Path, *reviewers: Ed25519PrivateKey) -> Path:
    """The default policy as a file, signed by ``reviewers`` (valid nine days from T0)."""
    path = tmp_path / "policy.yaml"
    path.write_bytes(DOCUMENT)
    for key in reviewers:
        signature = sign(
            POLICY, DOCUMENT, key, signer="x", role="reviewer", now=T0, valid_for=timedelta(days=9)
        )
        add_signature(signatures_path(path), signature)
    return path


def bootstrap(*reviewers: Ed25519PrivateKey) -> PolicyStageChanged:
    """The decider's bootstrap step of the default policy, signed by ``reviewers``."""
    sigs = [
        sign(POLICY, DOCUMENT, k, signer="x", role="reviewer", now=T0, valid_for=timedelta(days=9))
        for k in reviewers
    ]
    document = json.dumps({"signatures": [msgspec.to_builtins(s) for s in sigs]})
    return bootstrap_event(SignedPolicy(POLICY, tuple(sigs)), DOCUMENT, document, "decider", T0)


# --- keys and the trust store ---------------------------------------------------------------------


def test_a_new_key_is_trusted_once_in_known_roles_and_revoked_from_then_on(tmp_path: Path) -> None:
    key_id, private, public = services.create_signer_key("alice@bank", tmp_path / "keys")
    assert (private.name, public.name) == ("alice_at_bank.pem", "alice_at_bank.pub")
    store = tmp_path / "trust.yaml"
    assert services.trusted_keys(store) == ()
    with pytest.raises(NexusError, match="unknown role"):
        services.trust_key(store, public, "alice@bank", ["reviewer", "boss"])
    entry = services.trust_key(store, public, "alice@bank", ["reviewer", "operator"])
    assert entry.key_id == key_id and entry.roles == ("reviewer", "operator")
    with pytest.raises(NexusError, match="already holds key"):
        services.trust_key(store, public, "alice again", ["author"])
    revoked = services.revoke_key(store, key_id, T0)
    assert revoked.revoked_at == T0
    assert [k.revoked_at for k in services.trusted_keys(store)] == [T0]
    with pytest.raises(NexusError, match="no key 0000000000000000"):
        services.revoke_key(store, "0000000000000000", T0)


def test_a_signer_is_named_by_the_trust_store_in_the_role_asked(tmp_path: Path) -> None:
    store = trust_file(tmp_path)
    key, name = services.load_signer(pem(tmp_path / "ops.pem", OPS), store, "operator")
    assert name == "dana@ops" and key.public_key() == OPS.public_key()
    assert services.load_signer(tmp_path / "ops.pem", store, "operator", "dana@ops")[1] == "dana@ops"
    with pytest.raises(NexusError, match="not 'the-ceo'"):
        services.load_signer(tmp_path / "ops.pem", store, "operator", "the-ceo")
    with pytest.raises(NexusError, match="does not have the reviewer role"):
        services.load_signer(tmp_path / "ops.pem", store, "reviewer")
    with pytest.raises(NexusError, match="not in the trust store"):
        services.load_signer(pem(tmp_path / "mallory.pem", MALLORY), store, "operator")


def test_signing_adds_to_the_signatures_file_in_a_known_role(tmp_path: Path) -> None:
    path = signed_policy_file(tmp_path)
    key = pem(tmp_path / "alice.pem", ALICE)
    signature, every = services.sign_policy(path, key, "alice", "reviewer", T0, valid_days=3)
    assert signature.digest == POLICY.digest and signature.expires_at == T0 + timedelta(days=3)
    assert every == [signature]
    assert len(services.sign_policy(path, pem(tmp_path / "bob.pem", BOB), "bob", "reviewer", T0)[1]) == 2
    with pytest.raises(NexusError, match="unknown role"):
        services.sign_policy(path, key, "alice", "approver", T0)


# --- policies -------------------------------------------------------------------------------------


def test_the_differences_of_two_policies_name_each_field(tmp_path: Path) -> None:
    rows = services.differences_table(POLICY, CANDIDATE).to_pylist()
    assert rows == [{"path": "version", "old": '"2026.11.1"', "new": '"2026.12.0"'}]
    assert services.differences_table(POLICY, POLICY).num_rows == 0


def test_a_replay_report_over_the_limit_is_refused(tmp_path: Path) -> None:
    report = tmp_path / "replay.json"
    report.write_bytes(b"x" * 2048)
    assert services.read_limited(report, "replay report", limit=2048) == b"x" * 2048
    with pytest.raises(NexusError, match="is over"):
        services.read_limited(report, "replay report", limit=2047)
    with pytest.raises(NexusError, match="cannot read the replay report"):
        services.read_limited(tmp_path / "missing.json", "replay report")


def test_the_bootstrap_policy_needs_two_reviewers(tmp_path: Path) -> None:
    path = signed_policy_file(tmp_path, ALICE, BOB)
    signed = load_signed_policy(path, TRUST, T0)
    state, event = services.bootstrap_policy(GovernanceState(), path, signed, TRUST, T0)
    assert event.to_stage == "active" and event.document == DOCUMENT.decode()
    assert state.registry.active is not None and state.registry.active.digest == POLICY.digest
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    path = signed_policy_file(lonely, ALICE)
    with pytest.raises(NexusError, match="cannot be the bootstrap policy"):
        services.bootstrap_policy(GovernanceState(), path, load_signed_policy(path, TRUST, T0), TRUST, T0)


def test_a_kill_switch_names_its_scope_and_has_a_reason() -> None:
    event = services.kill_switch_event("tenant", "acme-bank", "off", "incident 42", OPS, "dana@ops", T0)
    assert (event.tenant_id, event.signature != "") == ("acme-bank", True)
    with pytest.raises(NexusError, match="a global switch has none"):
        services.kill_switch_event("global", "acme-bank", "off", "incident 42", OPS, "dana@ops", T0)
    with pytest.raises(NexusError, match="needs a reason"):
        services.kill_switch_event("global", "", "off", "  ", OPS, "dana@ops", T0)
    with pytest.raises(NexusError, match="--scope must be one of"):
        services.kill_switch_event("planet", "", "off", "why", OPS, "dana@ops", T0)


# --- what the evidence says about policies ----------------------------------------------------------


def test_replay_trusts_the_recorded_policies_whose_signatures_hold(tmp_path: Path) -> None:
    project(tmp_path, [bootstrap(ALICE, BOB)], trust=TRUST)
    found, skipped = services.recorded_policies(tmp_path, TRUST)
    assert list(found) == [POLICY.digest] and skipped == []
    strangers = TrustStore(keys=tuple(k for k in TRUST.keys if k.name == "dana@ops"))
    found, skipped = services.recorded_policies(tmp_path, strangers)
    assert found == {} and len(skipped) == 1


def test_the_policy_history_names_signers_and_shows_refused_steps(tmp_path: Path) -> None:
    evidence = tmp_path / "evidence"
    project(
        evidence, [bootstrap(ALICE, BOB), step("draft", T0 + timedelta(minutes=1), key=None)], trust=TRUST
    )
    rows = services.policy_history(evidence).to_pylist()
    assert [r["status"].split(" ")[0] for r in rows] == ["accepted", "refused"]
    assert rows[0]["to_stage"] == "active" and rows[0]["from_stage"] == "-"
    assert rows[1]["status"].startswith("refused (unsigned)")
    named = services.policy_history(evidence, trust_file(tmp_path)).to_pylist()
    assert named[0]["signers"] == "alice, bob"
