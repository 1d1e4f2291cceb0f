"""Envelope encryption of evidence content (prompts, responses) with a key per tenant or data subject.

Each scope (a tenant, or one data subject of a tenant) has a data key; data keys are stored wrapped
(AES-256-GCM) by a key-encryption key, and erasing a scope destroys its data key: what was encrypted
under it can no longer be read, while the ciphertext, and so every seal over it, stays as it was.

``KeyStore`` is the seam: ``LocalKeyStore`` keeps the keys in a JSON file, guarded by a lock file so
that an erasure and a running projector never undo each other; a KMS can implement the same four
methods. ``erase`` is how keys are meant to go: it records the erasure, signed, in the evidence
folder first, so that ``verify`` can tell an erasure from a keystore that lost keys.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nexuscore.kernel import signing
from nexuscore.kernel.errors import EvidenceError, KeyStoreError
from nexuscore.projections._manifest import (
    ERASURES,
    Manifest,
    exclusive,
    read_erasures,
    read_head,
    read_regular,
    record_erasure,
)

log = logging.getLogger(__name__)

NONCE_BYTES = 12


class KeyStore(Protocol):
    def data_key(self, tenant: str, subject: str | None, now: datetime) -> tuple[str, bytes]:
        """The current (key id, data key) of a scope, created on first use and durable on return."""
        ...

    def lookup(self, key_id: str) -> bytes | None:
        """A data key by id; None once it has been erased (or never existed)."""
        ...

    def erased_at(self, key_id: str) -> str | None: ...

    def erase(
        self,
        tenant: str,
        subject: str | None,
        now: datetime,
        reason: str,
        record: Callable[[list[str]], None] | None = None,
    ) -> list[str]:
        """Destroy the data keys of a tenant (every subject too) or of one subject; return their ids.

        ``record`` is called with the ids before any is destroyed (and not at all when none is).
        """
        ...


def _scope(tenant: str, subject: str | None) -> str:
    return f"{tenant}\x1f{subject or ''}"


class LocalKeyStore:
    """Data keys in ``keystore.json``, wrapped by the 32-byte key-encryption key in ``master.key``."""

    def __init__(self, directory: Path, erasures_from: Path | None = None) -> None:
        self.directory = directory
        # The evidence folder whose erasure ledger rules these keys: the keystore's own parent
        # when it is ``<evidence>/_keys``; given, for a keystore kept elsewhere.
        self.erasures_from = erasures_from if erasures_from is not None else directory.parent
        self.path = directory / "keystore.json"
        self._lock_path = directory / ".keystore.lock"
        self._kek_path = directory / "master.key"
        self._doc: dict[str, Any] = {"keys": {}, "active": {}, "erased": {}}
        self._mtime = -1.0
        self._plain: dict[str, bytes] = {}
        self._kek_cipher: AESGCM | None = None
        # The erasure ledger's key ids, and the (mtime, size) they were read at.
        self._erasures: tuple[tuple[int, int], dict[str, str]] = ((-1, -1), {})

    # --- persistence -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot open the keystore under {self.directory}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._reload(force=True)
            yield
        finally:
            os.close(fd)

    def _kek(self, create: bool = False) -> AESGCM:
        if self._kek_cipher is not None:
            return self._kek_cipher
        if not self._kek_path.exists():
            if not create:
                # A reader must not mint a new master key over keys wrapped by the lost one.
                raise KeyStoreError(f"{self._kek_path} is missing: the data keys cannot be unwrapped")
            fd = os.open(self._kek_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
                f.flush()
                os.fsync(f.fileno())
        try:
            # A pipe or a device in its place would block or never end: a key is a regular file.
            key = read_regular(self._kek_path, 33, links=True)
        except OSError as exc:
            raise KeyStoreError(f"cannot read {self._kek_path}: {exc.strerror}") from exc
        if len(key) != 32:
            raise KeyStoreError(f"{self._kek_path} is not a 32-byte key")
        self._kek_cipher = AESGCM(key)
        return self._kek_cipher

    def _reload(self, force: bool = False) -> None:
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if not force and mtime == self._mtime:
            return
        try:
            self._doc = _parts(json.loads(read_regular(self.path, links=True).decode("utf-8")), self.path)
        except (OSError, ValueError) as exc:
            raise KeyStoreError(f"cannot read the keystore {self.path}: {exc}") from exc
        self._mtime = mtime
        # Keys erased by another process must stop working here too.
        self._plain = {k: v for k, v in self._plain.items() if k in self._doc["keys"]}

    def _save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(self._doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._mtime = self.path.stat().st_mtime

    def refresh(self) -> None:
        """Pick up erasures made by other processes (a stat of the keystore and one of the erasure
        ledger when nothing changed)."""
        self._reload()
        erased = self._recorded_erased()
        self._plain = {k: v for k, v in self._plain.items() if k not in erased}

    # --- KeyStore ---------------------------------------------------------------------------------

    def data_key(self, tenant: str, subject: str | None, now: datetime) -> tuple[str, bytes]:
        key_id = self._doc["active"].get(_scope(tenant, subject))
        if key_id is not None and (key := self.lookup(key_id)) is not None:
            return key_id, key
        with self._locked():
            key_id = self._doc["active"].get(_scope(tenant, subject))
            if key_id is None or key_id not in self._doc["keys"] or key_id in self._recorded_erased():
                key_id = secrets.token_hex(8)
                key = AESGCM.generate_key(bit_length=256)
                nonce = secrets.token_bytes(NONCE_BYTES)
                wrapped = nonce + self._kek(create=True).encrypt(nonce, key, key_id.encode())
                self._doc["keys"][key_id] = {
                    "tenant": tenant,
                    "subject": subject,
                    "created_at": now.isoformat(),
                    "wrapped": base64.b64encode(wrapped).decode("ascii"),
                }
                self._doc["active"][_scope(tenant, subject)] = key_id
                self._save()
        found = self.lookup(key_id)
        assert found is not None
        return key_id, found

    def lookup(self, key_id: str) -> bytes | None:
        key = self._plain.get(key_id)  # (unwrapped after the check below; ``refresh`` prunes it)
        if key is not None:
            return key
        if key_id in self._recorded_erased():
            return None  # erased by record: a keystore put back from before the erasure changes nothing
        self._reload()
        entry = self._doc["keys"].get(key_id)
        if entry is None:
            return None
        try:
            wrapped = base64.b64decode(entry["wrapped"], validate=True)
            key = self._kek().decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], key_id.encode())
        except (InvalidTag, KeyError, TypeError, ValueError) as exc:
            raise KeyStoreError(f"data key {key_id} does not unwrap with {self._kek_path}") from exc
        self._plain[key_id] = key
        return key

    def erased_at(self, key_id: str) -> str | None:
        self._reload()
        entry = self._doc["erased"].get(key_id)
        if isinstance(entry, dict):
            return str(entry.get("erased_at", "at an unknown time"))
        return self._recorded_erased().get(key_id)

    def _recorded_erased(self) -> dict[str, str]:
        """The key ids the erasure ledger of ``erasures_from`` names (``<evidence>/erasures.jsonl``),
        with when. They stay erased whatever the keystore
        holds: the ledger is written before the keys are destroyed, and a keystore restored from
        before an erasure (a backup, or someone undoing it) must not make the content readable again.
        Every record counts, signed or not: one can only hide content this way, and ``verify``
        names a record whose signature fails."""
        path = self.erasures_from / ERASURES
        try:
            info = path.stat()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise KeyStoreError(f"cannot read {path}: {exc.strerror}") from exc
        if self._erasures[0] != (info.st_mtime_ns, info.st_size):
            try:
                lines = read_erasures(self.erasures_from)
            except EvidenceError as exc:
                raise KeyStoreError(str(exc)) from exc
            self._erasures = ((info.st_mtime_ns, info.st_size), _erased_ids(lines))
        return self._erasures[1]

    def erase(
        self,
        tenant: str,
        subject: str | None,
        now: datetime,
        reason: str,
        record: Callable[[list[str]], None] | None = None,
    ) -> list[str]:
        with self._locked():
            doomed = [
                k
                for k, e in self._doc["keys"].items()
                if e["tenant"] == tenant and (subject is None or e["subject"] == subject)
            ]
            if doomed and record is not None:
                record(doomed)
            for k in doomed:
                e = self._doc["keys"].pop(k)
                self._doc["erased"][k] = {
                    "tenant": tenant,
                    "subject": e["subject"],
                    "erased_at": now.isoformat(),
                    "reason": reason,
                }
                self._plain.pop(k, None)
            self._doc["active"] = {s: k for s, k in self._doc["active"].items() if k not in doomed}
            if doomed:
                self._save()
        return doomed


def _erased_ids(lines: list[bytes]) -> dict[str, str]:
    """Key id -> when it was erased, from the erasure ledger's readable records."""
    erased: dict[str, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        ids = record.get("key_ids") if isinstance(record, dict) else None
        if isinstance(ids, list):
            when = str(record.get("erased_at", "at an unknown time"))
            erased.update((k, when) for k in ids if isinstance(k, str))
    return erased


def _parts(doc: object, path: Path) -> dict[str, Any]:
    """The keystore document with its three parts, each a JSON object (missing ones empty)."""
    if not isinstance(doc, dict):
        raise KeyStoreError(f"the keystore {path} is not a JSON object")
    parts = {name: doc.get(name, {}) for name in ("keys", "active", "erased")}
    if not all(isinstance(part, dict) for part in parts.values()):
        raise KeyStoreError(f"the keystore {path} is malformed (keys, active and erased must be objects)")
    return parts


def erase(
    root: Path,
    keys: KeyStore,
    signing_key: Ed25519PrivateKey,
    tenant: str,
    subject: str | None,
    now: datetime,
    reason: str,
) -> list[str]:
    """``nexuscore evidence erase``: destroy the content keys of a tenant (or one data subject) after
    recording their ids, signed with the evidence signing key, in the evidence folder at ``root``."""
    if not root.is_dir():
        raise KeyStoreError(f"no evidence at {root}: the erasure must be recorded beside it")
    signer = signing.key_id(signing_key.public_key())
    head = read_head(root)
    if head is not None and head.get("key_id") != signer:
        # Signed with another key, the record would not convince ``verify``: the keys would look lost.
        raise KeyStoreError(
            f"key {signer} does not sign this evidence (its manifest is signed by {head.get('key_id')})"
        )

    def record(key_ids: list[str]) -> None:
        entry = {
            "tenant": tenant,
            "subject": subject,
            "key_ids": sorted(key_ids),
            "erased_at": now.isoformat(),
        }
        record_erasure(root, signing_key, {**entry, "reason": reason})

    erased = keys.erase(tenant, subject, now, reason, record)
    _seal_erasures(root, signing_key, now)
    return erased


def _seal_erasures(root: Path, signing_key: Ed25519PrivateKey, now: datetime) -> None:
    """Seal the erasure ledger in the manifest now, unless a projector is writing it (it then
    seals it with its next commit): until sealed, deleting the record goes unseen by ``verify``."""
    try:
        with exclusive(root, "seal the erasure"):
            Manifest(root, signing_key).commit([], now)  # a checkpoint of no partitions
    except EvidenceError as exc:
        log.warning(
            "the erasure is not sealed in the manifest yet (%s); a projector seals it with its next flush",
            exc,
        )


class FieldCipher:
    """AES-256-GCM over one field of one event, with a nonce derived from (event id, field).

    Deterministic on purpose: re-projecting the same event after a crash yields the same bytes, so
    the projection depends on the log alone. A nonce repeats only for the same event and field,
    which carry the same plaintext.
    """

    def __init__(self, keys: KeyStore) -> None:
        self.keys = keys
        self._aead: dict[str, tuple[AESGCM, bytes]] = {}

    def encrypt(
        self, tenant: str, subject: str | None, event_id: str, field: str, text: str, now: datetime
    ) -> tuple[str, bytes]:
        key_id, key = self.keys.data_key(tenant, subject, now)
        cached = self._aead.get(key_id)
        if cached is None or cached[1] is not key:
            cached = self._aead[key_id] = (AESGCM(key), key)
        aad = f"{event_id}\x1f{field}".encode()
        nonce = hmac.new(key, aad, hashlib.sha256).digest()[:NONCE_BYTES]
        return key_id, nonce + cached[0].encrypt(nonce, text.encode(), aad)

    def encrypt_many(
        self, field: str, items: Sequence[tuple[str, str | None, str, str]], now: datetime
    ) -> list[tuple[str, bytes]]:
        """``encrypt`` over (tenant, subject, event id, text) items: the same bytes, each scope's key
        looked up once per call, and the nonce's HMAC one-shot."""
        scopes: dict[tuple[str, str | None], tuple[str, bytes, AESGCM]] = {}
        suffix = f"\x1f{field}".encode()
        digest, out = hmac.digest, []
        for tenant, subject, event_id, text in items:
            scope = scopes.get((tenant, subject))
            if scope is None:
                key_id, key = self.keys.data_key(tenant, subject, now)
                cached = self._aead.get(key_id)
                if cached is None or cached[1] is not key:
                    cached = self._aead[key_id] = (AESGCM(key), key)
                scope = scopes[(tenant, subject)] = (key_id, key, cached[0])
            aad = event_id.encode() + suffix
            nonce = digest(scope[1], aad, "sha256")[:NONCE_BYTES]
            out.append((scope[0], nonce + scope[2].encrypt(nonce, text.encode(), aad)))
        return out

    def decrypt(self, key_id: str, event_id: str, field: str, blob: bytes) -> str | None:
        """The plaintext, or None when the key has been erased."""
        key = self.keys.lookup(key_id)
        if key is None:
            return None
        aad = f"{event_id}\x1f{field}".encode()
        try:
            return AESGCM(key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], aad).decode()
        except InvalidTag as exc:
            raise KeyStoreError(f"{field} of event {event_id} does not decrypt with key {key_id}") from exc
