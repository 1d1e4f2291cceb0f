"""API keys: a key names one tenant and the request defaults of one application.

The file holds only each secret's sha256 (secrets are ``nxk_`` and 43 URL-safe characters: 256 bits,
so an unsalted hash is not worth attacking); it is written atomically with mode 0600. A secret is
shown once, when made. ``KeyRing`` re-reads the file when it changes, so a revocation takes effect
on the running gateway at its next request.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from datetime import datetime
from pathlib import Path

import msgspec

from nexuscore.kernel.errors import NexusError
from nexuscore.schemas import DataClassification, RiskClass

SECRET_PREFIX = "nxk_"  # noqa: S105  # the prefix that marks a secret, not a secret


class KeyDefaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a request through this key gets unless it says otherwise (body ``metadata`` or
    ``X-Nexus-*`` headers). The unset classification and risk are the cautious ones: confidential
    data stays in the tenant's home region, and medium risk is never routed as trivial."""

    feature: str = ""
    task_type: str = "chat"
    risk_class: RiskClass = "medium"
    data_classification: DataClassification = "confidential"
    latency_slo_ms: int | None = None


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    key_id: str
    tenant_id: str
    sha256: str
    created_at: datetime
    revoked_at: datetime | None = None
    defaults: KeyDefaults = KeyDefaults()


class KeyFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    keys: list[ApiKey] = msgspec.field(default_factory=list)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def read_keys(path: Path) -> KeyFile:
    """The key file (none yet: no keys)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return KeyFile()
    except OSError as exc:
        raise NexusError(f"{path}: cannot read the key file: {exc.strerror}") from exc
    try:
        return msgspec.json.decode(data, type=KeyFile)
    except msgspec.DecodeError as exc:
        raise NexusError(f"{path}: not a gateway key file: {exc}") from exc


def write_keys(path: Path, keys: KeyFile) -> None:
    """Replace the file atomically; only its owner may read it (it says which key is whose)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(msgspec.json.format(msgspec.json.encode(keys), indent=2) + b"\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.chmod(path, 0o600)


def add_key(path: Path, tenant_id: str, defaults: KeyDefaults, now: datetime) -> tuple[ApiKey, str]:
    """A new key for ``tenant_id``: the record kept and the secret (shown once, never stored)."""
    if not tenant_id or not tenant_id.isprintable() or len(tenant_id) > 200:
        raise NexusError(f"tenant id {tenant_id!r} is empty, too long or not printable")
    if defaults.latency_slo_ms is not None and not 1 <= defaults.latency_slo_ms <= 3_600_000:
        raise NexusError("--latency-slo-ms must be between 1 and 3600000")
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        key_id="key_" + secrets.token_hex(6), tenant_id=tenant_id, sha256=secret_hash(secret),
        created_at=now, defaults=defaults,
    )  # fmt: skip
    current = read_keys(path)
    write_keys(path, KeyFile([*current.keys, key]))
    return key, secret


def revoke_key(path: Path, key_id: str, now: datetime) -> ApiKey:
    current = read_keys(path)
    found = next((k for k in current.keys if k.key_id == key_id), None)
    if found is None:
        raise NexusError(f"no key {key_id!r} in {path}")
    revoked = found if found.revoked_at else msgspec.structs.replace(found, revoked_at=now)
    write_keys(path, KeyFile([revoked if k.key_id == key_id else k for k in current.keys]))
    return revoked


class KeyRing:
    """The live keys of a running gateway, by secret hash, re-read whenever the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._by_hash: dict[str, ApiKey] = {}
        self.refresh()

    def refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = (0, 0)
        if stamp == self._stamp:
            return
        keys = read_keys(self.path)
        self._by_hash = {k.sha256: k for k in keys.keys if k.revoked_at is None}
        self._stamp = stamp

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The key a ``Bearer`` secret belongs to, if it is live."""
        if not authorization or not authorization.startswith("Bearer "):
            return None
        secret = authorization[len("Bearer ") :].strip()
        if not secret.startswith(SECRET_PREFIX) or len(secret) > 200:
            return None
        with contextlib.suppress(NexusError):  # a broken file: keep the keys last read
            self.refresh()
        return self._by_hash.get(secret_hash(secret))
