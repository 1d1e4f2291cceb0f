"""Policy governance as operators and signers do it: keys and the trust store, signatures, the
differences between two policies, a promotion step judged before it is published, and the
history of every step in the evidence."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import cast

import pyarrow as pa

from nexuscore.kernel.clock import SystemClock
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import generate_keypair, load_private_key, load_public_key
from nexuscore.policy import (
    ROLES,
    PolicySignature,
    Registry,
    Role,
    RoutingPolicy,
    TrustedKey,
    TrustStore,
    add_signature,
    judge,
    load_policy,
    load_trust_store,
    policy_diff,
    save_trust_store,
    sign,
    signatures_path,
    trusted_key_entry,
)
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import PolicyStageChanged
from nexuscore.services._acts import promotion_event
from nexuscore.streams import GovernanceFollower, PolicyHolder, publish_governance
from nexuscore.transport import Topics, ensure_topics

# A replay report is a summary, not the changes themselves: anything bigger is not one.
MAX_REPORT_BYTES = 16 * 1024 * 1024
HISTORY_SCHEMA = pa.schema(
    [
        ("occurred_at", pa.timestamp("us", tz="UTC")),
        *(
            (n, pa.string())
            for n in (
                "policy_version",
                "policy_digest",
                "from_stage",
                "to_stage",
                "actor",
                "signers",
                "replay_report_digest",
            )
        ),
        ("canary_share", pa.float64()),
        ("reason", pa.string()),
        ("status", pa.string()),
    ]
)


def checked_roles(roles: list[str]) -> tuple[Role, ...]:
    """``roles`` as trust-store roles; an error naming any that is not one."""
    bad = [r for r in roles if r not in ROLES]
    if bad:
        raise NexusError(f"unknown role(s) {', '.join(bad)}: use {', '.join(ROLES)}")
    return cast(tuple[Role, ...], tuple(roles))


def create_signer_key(name: str, out: Path) -> tuple[str, Path, Path]:
    """A new Ed25519 key pair for ``name`` under ``out``: (key id, private PEM, public PEM), the
    files named after the holder (``alice@bank`` -> ``alice_at_bank.pem``)."""
    stem = name.replace("@", "_at_").replace("/", "_")
    private, public = out / f"{stem}.pem", out / f"{stem}.pub"
    return generate_keypair(private, public), private, public


def trusted_keys(trust_store: Path) -> tuple[TrustedKey, ...]:
    """The keys of a trust store file; none while the file does not exist yet."""
    return load_trust_store(trust_store).keys if trust_store.exists() else ()


def trust_key(trust_store: Path, public_key: Path, name: str, roles: list[str]) -> TrustedKey:
    """Add a public key to the trust store file (created if absent) as ``name`` in ``roles``."""
    checked = checked_roles(roles)
    entry = trusted_key_entry(load_public_key(public_key), name, checked)
    keys = trusted_keys(trust_store)
    if any(k.key_id == entry.key_id for k in keys):
        raise NexusError(f"{trust_store} already holds key {entry.key_id}")
    save_trust_store(trust_store, TrustStore(keys=(*keys, entry)))
    return entry


def revoke_key(trust_store: Path, key_id: str, now: datetime) -> TrustedKey:
    """Revoke a key of the trust store from ``now`` on; return its entry as it now reads."""
    store = load_trust_store(trust_store)
    key = store.get(key_id)
    if key is None:
        raise NexusError(f"{trust_store}: no key {key_id}")
    revoked = key.model_copy(update={"revoked_at": now})
    save_trust_store(trust_store, TrustStore(keys=tuple(revoked if k is key else k for k in store.keys)))
    return revoked


def sign_policy(
    path: Path, key: Path, signer: str, role: str, now: datetime, valid_days: int = 180
) -> tuple[PolicySignature, list[PolicySignature]]:
    """Sign the policy file at ``path`` as ``signer`` in ``role``: the new signature and every one now
    in its signatures file (``FILE.sig.json``)."""
    (checked,) = checked_roles([role])
    policy = load_policy(path)
    signature = sign(
        policy,
        path.read_bytes(),
        load_private_key(key),
        signer=signer,
        role=checked,
        now=now,
        valid_for=timedelta(days=valid_days),
    )
    return signature, add_signature(signatures_path(path), signature)


def differences_table(old: RoutingPolicy, new: RoutingPolicy) -> pa.Table:
    """Every field that differs between two policies (path, old and new value as JSON)."""
    rows = [
        {
            "path": path,
            "old": json.dumps(x) if x is not None else "(absent)",
            "new": json.dumps(y) if y is not None else "(absent)",
        }
        for path, x, y in policy_diff(old, new)
    ]
    schema = pa.schema([("path", pa.string()), ("old", pa.string()), ("new", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def read_limited(path: Path, what: str, limit: int = MAX_REPORT_BYTES) -> bytes:
    """The bytes of ``path``, at most ``limit`` of them (an error naming ``what`` otherwise)."""
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise NexusError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise NexusError(f"the {what} {path} is over {limit // (1024 * 1024)} MiB")
    return data


def promote(
    path: Path,
    to: str,
    *,
    key: Path,
    trust_store: Path,
    bootstrap: str,
    namespace: str = "",
    replay_report: Path | None = None,
    canary_share: float = 0.0,
    reason: str = "",
) -> PolicyStageChanged:
    """One promotion step of the policy at ``path``, signed with the operator's ``key``, judged
    against the governance log as every decider will judge it, then published on it."""
    clock = SystemClock()
    trust = load_trust_store(trust_store)
    report = read_limited(replay_report, "replay report") if replay_report is not None else b""
    topics = Topics(namespace)
    asyncio.run(ensure_topics(bootstrap, topics))
    holder = PolicyHolder(Registry())
    asyncio.run(GovernanceFollower(bootstrap, topics, trust, clock, holder).catch_up())
    now = clock.now()
    event = promotion_event(path, to, key, trust, holder.registry, report, canary_share, reason, now)
    _, refused = judge(holder.state, event, trust, now)
    if refused is not None:
        raise NexusError(
            f"promotion of {event.policy_version} ({event.policy_digest[:19]}…) to {to} refused: {refused}"
        )
    asyncio.run(publish_governance(bootstrap, topics, event))
    return event


def policy_history(evidence_dir: Path, trust_store: Path | None = None) -> pa.Table:
    """Every policy step in the evidence, oldest first: accepted ones with their signers (named from
    ``trust_store`` when given), refused ones as refused with the code and reason."""
    names = {k.key_id: k.name for k in load_trust_store(trust_store).keys} if trust_store else {}
    with EvidenceStore(evidence_dir) as store:
        rows = store.query(
            "SELECT occurred_at, policy_version, policy_digest, from_stage, to_stage, actor, signers, "
            "replay_report_digest, canary_share, reason, 'accepted' AS status, src_offset "
            "FROM policy_events UNION ALL "
            "SELECT occurred_at, NULL, policy_digest, NULL, NULL, claimed_actor, [], NULL, NULL, NULL, "
            "'refused (' || code || '): ' || reason, src_offset FROM refusals WHERE act = 'policy_stage' "
            "ORDER BY occurred_at, src_offset"
        ).to_pylist()
    for r in rows:
        r["signers"] = ", ".join(names.get(k, k) for k in r["signers"])
        r["from_stage"] = r["from_stage"] or "-"
    return pa.Table.from_pylist(rows, schema=HISTORY_SCHEMA)
