"""Signed policies: who may sign, what a signature covers, and every way a policy is refused."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore.kernel.errors import PolicyRefused
from nexuscore.policy import (
    DEFAULT_POLICY_PATH,
    TrustStore,
    add_signature,
    load_policy,
    load_signed_policy,
    sign,
    signatures_path,
    trusted_key_entry,
)
from nexuscore.policy._diff import policy_diff
from tests.factories import T0

ALICE, BOB, MALLORY = (Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3))
DOCUMENT = DEFAULT_POLICY_PATH.read_bytes()
TRUST = TrustStore(
    keys=(
        trusted_key_entry(ALICE.public_key(), "alice", ("author", "reviewer")),
        trusted_key_entry(BOB.public_key(), "bob", ("reviewer",)),
    )
)


def signed_copy(tmp_path: Path, *keys: Ed25519PrivateKey, document: bytes = DOCUMENT, **kw: object) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_bytes(document)
    signatures_path(path).unlink(missing_ok=True)
    policy = load_policy(path)
    for key, name in zip(keys, ("alice", "bob", "mallory"), strict=False):
        options = {"signer": name, "role": "reviewer", "now": T0, "valid_for": timedelta(days=30)} | kw
        add_signature(signatures_path(path), sign(policy, document, key, **options))  # type: ignore[arg-type]
    return path


def refusal(path: Path, trust: TrustStore = TRUST, at: object = None, min_signers: int = 1) -> str:
    with pytest.raises(PolicyRefused) as caught:
        load_signed_policy(path, trust, at or T0 + timedelta(hours=1), min_signers=min_signers)  # type: ignore[arg-type]
    assert caught.value.reason in str(caught.value)
    return caught.value.reason


def test_a_policy_signed_by_a_trusted_reviewer_loads(tmp_path: Path) -> None:
    signed = load_signed_policy(signed_copy(tmp_path, ALICE), TRUST, T0 + timedelta(hours=1))
    assert signed.policy.digest == load_policy(DEFAULT_POLICY_PATH).digest
    assert signed.signers == [f"alice (reviewer, key {TRUST.keys[0].key_id})"]


def test_each_refusal_has_its_one_reason(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_bytes(DOCUMENT)
    assert refusal(path) == "unsigned"
    assert refusal(signed_copy(tmp_path, MALLORY)) == "unknown_key"
    revoked = TrustStore(keys=(TRUST.keys[0].model_copy(update={"revoked_at": T0}), TRUST.keys[1]))
    assert refusal(signed_copy(tmp_path, ALICE), revoked) == "revoked_key"
    assert refusal(signed_copy(tmp_path, ALICE), at=T0 + timedelta(days=31)) == "expired"
    assert refusal(signed_copy(tmp_path, BOB, role="author")) == "bad_signature"  # bob is no author
    path = signed_copy(tmp_path, ALICE)
    path.write_bytes(DOCUMENT.replace(b"version:", b"versio:"))
    assert refusal(path) == "invalid_content"


def test_promotion_needs_two_distinct_signers(tmp_path: Path) -> None:
    assert refusal(signed_copy(tmp_path, ALICE), min_signers=2) == "too_few_signatures"
    twice = signed_copy(tmp_path, ALICE)
    add_signature(signatures_path(twice), sign(load_policy(twice), DOCUMENT, ALICE, signer="alice", role="author",
                                               now=T0, valid_for=timedelta(days=1)))  # fmt: skip
    assert refusal(twice, min_signers=2) == "too_few_signatures"
    both = load_signed_policy(signed_copy(tmp_path, ALICE, BOB), TRUST, T0, min_signers=2)
    assert len(both.signatures) == 2


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(DOCUMENT) - 1), st.integers(1, 255))
def test_every_single_byte_change_to_a_signed_policy_is_refused(
    tmp_path: Path, position: int, xor: int
) -> None:
    path = signed_copy(tmp_path, ALICE)
    changed = bytearray(DOCUMENT)
    changed[position] ^= xor
    path.write_bytes(bytes(changed))
    assert refusal(path) in {"bad_signature", "invalid_content"}


def test_a_diff_names_each_changed_field_by_id() -> None:
    old = load_policy(DEFAULT_POLICY_PATH)
    data = old.model_dump(mode="json")
    data["deployments"][0]["input_usd_per_1k"] = "0.0003"
    data["tenants"] = data["tenants"][1:]
    new = type(old).model_validate(data)
    changes = {path: (a, b) for path, a, b in policy_diff(old, new)}
    first, gone = old.deployments[0].id, old.tenants[0].id
    assert changes[f"deployments[{first}].input_usd_per_1k"] == ("0.0002", "0.0003")
    assert changes[f"tenants[{gone}]"][1] is None
    assert policy_diff(old, old) == []
