"""Keys for a local run (demo, tests, benchmarks): the evidence signing pair, two reviewers in a trust
store, and a copy of the policy signed by both.

A real deployment configures its own (NEXUSCORE_EVIDENCE_SIGNING_KEY, NEXUSCORE_TRUST_STORE and a
policy signed by its reviewers) and keeps private keys away from the evidence they sign.
"""

from __future__ import annotations

import os
import shutil
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec

from nexuscore.kernel.signing import generate_keypair, load_private_key
from nexuscore.policy import (
    Role,
    TrustStore,
    add_signature,
    load_policy,
    save_trust_store,
    sign,
    signatures_path,
    trusted_key_entry,
)

REVIEWERS = ("alice@demo", "bob@demo")


class DevKeys(msgspec.Struct, frozen=True):
    evidence_private: Path
    evidence_public: Path
    trust_store: Path
    policy: Path  # the signed copy
    # An operator's private key (kill switches, promotions): alice holds the operator role too.
    operator: Path | None = None
    # A reviewer's private key (the demo's review desk signs its reviews with it): bob's.
    reviewer: Path | None = None


def dev_keys(directory: Path, policy_path: Path) -> DevKeys:
    """Make (or reuse, where configured in the environment) the keys and signatures of a local run."""
    directory.mkdir(parents=True, exist_ok=True)
    evidence_private = os.environ.get("NEXUSCORE_EVIDENCE_SIGNING_KEY")
    if evidence_private:
        private = Path(evidence_private)
        public = Path(os.environ.get("NEXUSCORE_EVIDENCE_PUBLIC_KEY", evidence_private))
    else:
        private, public = directory / "evidence-signing.pem", directory / "evidence-signing.pub"
        if not private.exists():
            generate_keypair(private, public)
    configured_trust = os.environ.get("NEXUSCORE_TRUST_STORE")
    if configured_trust:
        reviewer = os.environ.get("NEXUSCORE_REVIEWER_KEY")
        return DevKeys(
            private,
            public,
            Path(configured_trust),
            policy_path,
            _configured_operator(),
            Path(reviewer) if reviewer else None,
        )
    return demo_keys(directory, policy_path, private, public)


def demo_keys(
    directory: Path, policy_path: Path, private: Path | None = None, public: Path | None = None
) -> DevKeys:
    """Demo keys in ``directory`` whatever the environment says: the evidence signing pair (unless
    given), two reviewers in ``trust.yaml`` and ``policy_path`` copied in and signed by both (valid
    30 days). ``make compose-keys`` makes these for compose.yaml."""
    directory.mkdir(parents=True, exist_ok=True)
    if private is None or public is None:
        private, public = directory / "evidence-signing.pem", directory / "evidence-signing.pub"
        if not private.exists():
            generate_keypair(private, public)
    trust_store = directory / "trust.yaml"
    policy = directory / policy_path.name
    shutil.copyfile(policy_path, policy)
    signatures_path(policy).unlink(missing_ok=True)
    entries = []
    now = datetime.now(UTC)
    for name in REVIEWERS:
        stem = name.split("@")[0]
        key_path = directory / f"{stem}.pem"
        if not key_path.exists():
            generate_keypair(key_path, directory / f"{stem}.pub")
        key = load_private_key(key_path)
        roles: tuple[Role, ...] = (
            ("author", "reviewer", "operator") if stem == "alice" else ("author", "reviewer")
        )
        entries.append(trusted_key_entry(key.public_key(), name, roles))
        add_signature(
            signatures_path(policy),
            sign(
                load_policy(policy),
                policy.read_bytes(),
                key,
                signer=name,
                role="reviewer",
                now=now,
                valid_for=timedelta(days=30),
            ),
        )
    save_trust_store(trust_store, TrustStore(keys=tuple(entries)))
    return DevKeys(private, public, trust_store, policy, directory / "alice.pem", directory / "bob.pem")


def compose_keys(directory: Path, policy_path: Path) -> tuple[DevKeys, Path, str | None]:
    """Everything compose.yaml mounts: the demo keys, and a gateway key file holding one API key for
    acme-bank (made once; its secret is returned only when it is made, for the deployer to note)."""
    from nexuscore.gateway import KeyDefaults, add_key

    keys = demo_keys(directory, policy_path)
    gateway_keys = directory / "gateway-keys.json"
    if gateway_keys.exists():
        return keys, gateway_keys, None
    _, secret = add_key(gateway_keys, "acme-bank", KeyDefaults(), datetime.now(UTC))
    return keys, gateway_keys, secret


def _configured_operator() -> Path | None:
    configured = os.environ.get("NEXUSCORE_OPERATOR_KEY")
    return Path(configured) if configured else None


def main(argv: list[str]) -> int:
    """``python -m nexuscore._devkeys DIR``: demo keys and a gateway API key for compose.yaml in DIR
    (``make compose-keys``)."""
    from nexuscore.policy import DEFAULT_POLICY_PATH

    if len(argv) != 1:
        print("usage: python -m nexuscore._devkeys DIR", file=sys.stderr)
        return 2
    keys, gateway_keys, secret = compose_keys(Path(argv[0]), DEFAULT_POLICY_PATH)
    for path in (
        keys.evidence_private,
        keys.trust_store,
        keys.policy,
        signatures_path(keys.policy),
        gateway_keys,
    ):
        print(f"wrote {path}")
    if secret is not None:
        print(f"the gateway's demo API key for tenant acme-bank (shown once, stored hashed): {secret}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
