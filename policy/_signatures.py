"""Signed policies: detached Ed25519 signatures over a policy's digest, checked against a trust store.

A policy file ``p.yaml`` travels with ``p.yaml.sig.json``: the signatures of people (or pipelines)
whose public keys the trust store knows, each with a role, a signing time and an expiry. What a
signature covers is the canonical JSON of (purpose, the policy's digest, the sha256 of the file's
bytes, key id, role, signed_at, expires_at): the digest is what decisions stamp, and the file's hash
means that no byte of the reviewed file, comments included, changes without a new signature.

Loading refuses with exactly one reason, the first that applies: invalid content, unsigned, unknown
key, revoked key, expired, bad signature (``PolicyRefused.reason``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal, get_args

import msgspec
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from nexuscore.kernel import signing
from nexuscore.kernel.errors import PolicyError, PolicyRefused
from nexuscore.policy._model import RoutingPolicy, parse_policy
from nexuscore.policy._yaml import decode_document, load_yaml, read_document

PURPOSE = "nexuscore.policy.v1"
Role = Literal["author", "reviewer", "operator"]
ROLES: tuple[Role, ...] = get_args(Role)  # the one list: the CLI and the defaults take it from here
RefusalReason = Literal[
    "invalid_content",
    "unsigned",
    "unknown_key",
    "revoked_key",
    "expired",
    "bad_signature",
    "too_few_signatures",
]


class TrustedKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{16}$")]
    name: Annotated[str, Field(min_length=1)]
    roles: tuple[Role, ...] = Field(min_length=1)
    public_key: Annotated[str, Field(min_length=1)]  # PEM
    revoked_at: datetime | None = None

    def key(self) -> Ed25519PublicKey:
        loaded = serialization.load_pem_public_key(self.public_key.encode())
        if not isinstance(loaded, Ed25519PublicKey):
            raise PolicyError(f"trusted key {self.key_id} is not an Ed25519 key")
        return loaded


class TrustStore(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    keys: tuple[TrustedKey, ...] = ()

    def get(self, key_id: str) -> TrustedKey | None:
        return next((k for k in self.keys if k.key_id == key_id), None)


class PolicySignature(msgspec.Struct, frozen=True, kw_only=True):
    key_id: str
    signer: str
    role: str
    digest: str
    file_sha256: str
    signed_at: datetime
    expires_at: datetime
    signature: str = ""

    def message(self) -> bytes:
        body = {
            "purpose": PURPOSE,
            "digest": self.digest,
            "file_sha256": self.file_sha256,
            "key_id": self.key_id,
            "role": self.role,
            "signed_at": self.signed_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


class SignedPolicy(msgspec.Struct, frozen=True):
    """A policy whose signatures held: the ones that did, in file order."""

    policy: RoutingPolicy
    signatures: tuple[PolicySignature, ...]

    @property
    def signers(self) -> list[str]:
        return [f"{s.signer} ({s.role}, key {s.key_id})" for s in self.signatures]


def signatures_path(policy_path: Path) -> Path:
    return policy_path.with_name(policy_path.name + ".sig.json")


def load_trust_store(path: Path) -> TrustStore:
    try:
        document = read_document(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read trust store: {exc.strerror}") from exc
    data = load_yaml(decode_document(document, str(path)), str(path))
    if data is None:
        data = {}  # a trust store file just created, still empty, holds no keys yet
    if not isinstance(data, dict):
        raise PolicyError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return TrustStore.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PolicyError(f"{path}: invalid trust store: {problems}") from exc


def save_trust_store(path: Path, store: TrustStore) -> None:
    data = store.model_dump(mode="json", exclude_none=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=120), encoding="utf-8")


def trusted_key_entry(public: Ed25519PublicKey, name: str, roles: tuple[Role, ...]) -> TrustedKey:
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return TrustedKey(key_id=signing.key_id(public), name=name, roles=roles, public_key=pem.decode())


def sign(
    policy: RoutingPolicy,
    document: bytes,
    key: Ed25519PrivateKey,
    *,
    signer: str,
    role: Role,
    now: datetime,
    valid_for: timedelta,
) -> PolicySignature:
    unsigned = PolicySignature(
        key_id=signing.key_id(key.public_key()),
        signer=signer,
        role=role,
        digest=policy.digest,
        file_sha256=hashlib.sha256(document).hexdigest(),
        signed_at=now,
        expires_at=now + valid_for,
    )
    return msgspec.structs.replace(unsigned, signature=signing.sign(key, unsigned.message()))


def read_signatures(path: Path) -> list[PolicySignature]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read signatures: {exc.strerror}") from exc
    try:
        return msgspec.json.decode(raw, type=dict[str, list[PolicySignature]]).get("signatures", [])
    except msgspec.DecodeError as exc:
        raise PolicyRefused("bad_signature", f"{path}: unreadable signatures file: {exc}") from exc


def add_signature(path: Path, signature: PolicySignature) -> list[PolicySignature]:
    """Add (or replace, for the same key and digest) a signature in a signatures file."""
    kept = [
        s
        for s in read_signatures(path)
        if not (s.key_id == signature.key_id and s.digest == signature.digest)
    ]
    kept.append(signature)
    path.write_bytes(msgspec.json.format(msgspec.json.encode({"signatures": kept}), indent=2) + b"\n")
    return kept


def check_signatures(
    policy: RoutingPolicy,
    document: bytes,
    signatures: list[PolicySignature],
    trust: TrustStore,
    now: datetime,
    *,
    min_signers: int = 1,
    roles: tuple[str, ...] = ROLES,
    source: str = "policy",
) -> SignedPolicy:
    """The policy with the signatures that hold, or PolicyRefused with the first reason that applies."""
    valid: list[PolicySignature] = []
    refusals: list[tuple[RefusalReason, str]] = []
    file_sha256 = hashlib.sha256(document).hexdigest()
    for s in signatures:
        trusted = trust.get(s.key_id)
        if trusted is None:
            refusals.append(
                ("unknown_key", f"signed by key {s.key_id} ({s.signer}), which the trust store does not know")
            )
        elif trusted.revoked_at is not None and trusted.revoked_at <= now:
            refusals.append(
                (
                    "revoked_key",
                    f"signed by key {s.key_id} ({trusted.name}), revoked {trusted.revoked_at.isoformat()}",
                )
            )
        elif s.expires_at <= now:
            refusals.append(("expired", f"signature by {trusted.name} expired {s.expires_at.isoformat()}"))
        elif (
            s.digest != policy.digest
            or s.file_sha256 != file_sha256
            or not signing.verify(trusted.key(), s.message(), s.signature)
        ):
            if s.digest != policy.digest:
                covered = f"covers {s.digest[:19]}…, not this policy's {policy.digest[:19]}…"
            elif s.file_sha256 != file_sha256:
                covered = "covers another version of the file (changed after signing)"
            else:
                covered = "does not verify"
            refusals.append(("bad_signature", f"signature by {trusted.name} {covered}"))
        elif s.role not in trusted.roles or s.role not in roles:
            refusals.append(
                (
                    "bad_signature",
                    f"{trusted.name} signed as {s.role}, a role the trust store does not give them here",
                )
            )
        elif all(v.key_id != s.key_id for v in valid):
            valid.append(s)
    if len(valid) >= min_signers:
        return SignedPolicy(policy, tuple(valid))
    if refusals:
        reason, detail = refusals[0]
        raise PolicyRefused(reason, f"{source} refused ({reason}): {detail}")
    if not signatures:
        raise PolicyRefused("unsigned", f"{source} refused (unsigned): no signatures")
    raise PolicyRefused(
        "too_few_signatures",
        f"{source} refused (too_few_signatures): {len(valid)} valid signature(s) from distinct keys, {min_signers} required",
    )


def load_signed_policy(path: Path, trust: TrustStore, now: datetime, *, min_signers: int = 1) -> SignedPolicy:
    """Read a policy and its signatures file; refuse it unless enough trusted signatures hold."""
    try:
        document = read_document(path)
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read policy file: {exc.strerror}") from exc
    try:
        policy = parse_policy(decode_document(document, str(path)), str(path))
    except PolicyError as exc:
        raise PolicyRefused("invalid_content", f"{path} refused (invalid_content): {exc}") from exc
    sig_path = signatures_path(path)
    signatures = read_signatures(sig_path)
    if not signatures:
        raise PolicyRefused("unsigned", f"{path} refused (unsigned): no signatures in {sig_path.name}")
    return check_signatures(
        policy, document, signatures, trust, now, min_signers=min_signers, source=str(path)
    )
