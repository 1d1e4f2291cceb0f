"""What the evidence commands decide beyond a query: where the content keys live, which policy
digests verify accepts, what counts as a residency breach, the report's verification note, proofs
checked against a trusted key, and erasure."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from cryptography.hazmat.primitives import serialization

from nexuscore import projections
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import load_private_key, load_public_key
from nexuscore.projections import (
    CompactReport,
    EvidenceStore,
    VerifyReport,
    check_consistency,
    check_proof,
    compact,
    erase,
    prove,
    prove_consistency,
    render_html,
    verify,
)
from nexuscore.services._keys import content_keys

# The one finding of `EvidenceStore.residency` that is allowed (kept for callers of this name).
ALLOWED_FINDING = projections.ALLOWED_RESIDENCY_FINDING


def open_store(evidence_dir: Path, keystore: Path | None = None) -> EvidenceStore:
    """The evidence under ``evidence_dir`` as DuckDB views, content decrypted with its keystore."""
    return EvidenceStore(evidence_dir, content_keys(evidence_dir, keystore))


def routing_summary(evidence_dir: Path) -> pa.Table:
    """Requests by tenant, tier and terminal state, with their actual cost (the demo's closing table)."""
    with EvidenceStore(evidence_dir) as store:
        return store.query(
            "SELECT tenant_id, coalesce(tier, '-') AS tier, state, count(*) AS requests, "
            "round(sum(coalesce(o.cost_micros, 0)) / 1e6, 4) AS cost_usd "
            "FROM terminal_states t LEFT JOIN decisions d USING (request_id, tenant_id) "
            "LEFT JOIN outcomes o USING (request_id, tenant_id) GROUP BY ALL ORDER BY ALL"
        )


def request_lineage(store: EvidenceStore, request_id: str, tenant: str | None = None) -> pa.Table:
    """Every event of one request, in order; an error if the evidence holds none."""
    table = store.lineage(request_id, tenant)
    if table.num_rows == 0:
        raise NexusError(f"no events of request {request_id!r} in the evidence under {store.root}")
    return table


def lineage_of(
    evidence_dir: Path, request_id: str, tenant: str | None = None, keystore: Path | None = None
) -> pa.Table:
    """``request_lineage`` without opening the store's views: what ``evidence lineage`` runs (a cold
    lookup reads the manifest and the few row groups that may hold the request, nothing else)."""
    table = projections.lineage_at(
        evidence_dir, request_id, tenant, keystore=content_keys(evidence_dir, keystore)
    )
    if table.num_rows == 0:
        raise NexusError(f"no events of request {request_id!r} in the evidence under {evidence_dir}")
    return table


def residency_breaches(residency: pa.Table) -> int:
    """Calls of the residency audit that are breaches (``nexuscore.projections.residency_breaches``)."""
    return projections.residency_breaches(residency)


def known_policy_digests(policies: Sequence[Path] = ()) -> set[str]:
    """The policy digests decisions may carry, besides those of the store's policy_events: the bundled
    policies and ``policies``."""
    # Imported here: the policy model (pydantic) is a quarter of a second of every evidence
    # command's start-up, and only verify needs it.
    from nexuscore.policy import DEFAULT_POLICY_PATH, load_policy

    bundled = sorted(DEFAULT_POLICY_PATH.parent.glob("*.yaml"))
    return {load_policy(p).digest for p in [*bundled, *policies]}


def verify_evidence(
    evidence_dir: Path,
    public_key: Path,
    *,
    policies: Sequence[Path] = (),
    until: datetime | None = None,
    keystore: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    deep: bool = False,
    since_heads: Sequence[Path] = (),
) -> VerifyReport:
    """Is the evidence complete and unaltered, its manifest signed by ``public_key``'s holder?
    ``deep`` also recomputes every row's Merkle leaf and every file's root; ``since_heads`` are
    earlier heads kept outside the folder, which the ledger must still extend."""
    key = load_public_key(public_key)
    kept = [read_kept_head(path) for path in since_heads]
    if not (evidence_dir / "manifest.jsonl").exists():
        raise NexusError(
            f"no evidence manifest under {evidence_dir} (run the projector or pass --evidence-dir)"
        )
    # verify() adds the digests in policy_events itself, from the files that pass its checks: a
    # store opened here would fail on a missing file before verify could name it.
    return verify(
        evidence_dir,
        key,
        known_policy_digests(policies),
        until=until,
        progress=progress,
        keystore=content_keys(evidence_dir, keystore),
        deep=deep,
        kept_heads=kept,
    )


def read_kept_head(path: Path) -> object:
    """A head file an auditor kept (``manifest.head.json`` as it was), as JSON; NexusError in one
    line if it cannot be read as one (its signature is verify's to judge)."""
    try:
        return json.loads(projections.read_regular(path, projections.MAX_HEAD_BYTES, links=True))
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
        raise NexusError(f"{path} is not a file: not a manifest.head.json") from exc
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a pipe or a device (its read would block or never end)
            raise NexusError(f"{path} is not a file: not a manifest.head.json") from exc
        raise NexusError(f"cannot read the kept head {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise NexusError(f"{path} is not JSON: not a manifest.head.json ({exc})") from exc


def verification_note(report: VerifyReport | None) -> str:
    """The line at the top of the HTML report: what verification found, or that there was none."""
    if report is None:
        return "Not verified (pass --public-key to verify before reporting)."
    if report.ok:
        return (
            f"Verified: {report.rows:,} events in {report.files:,} sealed files; manifest of "
            f"{report.signed_entries:,} entries signed by key {report.head.get('key_id')}."
        )
    problems = sum(f.fatal for f in report.findings)
    return f"VERIFICATION FAILED: {problems} problem(s); run nexuscore evidence verify."


def write_evidence_report(
    evidence_dir: Path, output: Path, verified: VerifyReport | None, now: datetime
) -> int:
    """Write the self-contained HTML report of the evidence to ``output``; return its size in bytes."""
    with EvidenceStore(evidence_dir) as store:
        page = render_html(store, now, verification_note(verified)).encode("utf-8")
    try:
        output.write_bytes(page)
    except OSError as exc:
        raise NexusError(f"cannot write {output}: {exc.strerror}") from exc
    return len(page)


def prove_request(
    evidence_dir: Path, request_id: str, tenant: str | None = None, public_key: Path | None = None
) -> dict[str, Any]:
    """An inclusion proof of a request's events against the signed head; with ``public_key``,
    checked against it first (an error if it does not hold)."""
    proof = prove(evidence_dir, request_id, tenant)
    if public_key is not None:
        key = load_public_key(public_key)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        problems = check_proof(proof, raw)
        if problems:
            raise NexusError("the proof does not hold: " + "; ".join(problems))
    return proof


def prove_growth(evidence_dir: Path, old_head_file: Path, public_key: Path | None = None) -> dict[str, Any]:
    """A consistency proof that the ledger only grew since the signed head in ``old_head_file``;
    with ``public_key``, both heads' signatures and the proof are checked first."""
    try:
        old_head = json.loads(old_head_file.read_bytes())
    except (OSError, ValueError) as exc:
        raise NexusError(f"cannot read the old head {old_head_file}: {exc}") from exc
    if not isinstance(old_head, dict):
        raise NexusError(f"{old_head_file} is not a signed head (a JSON object)")
    proof = prove_consistency(evidence_dir, old_head)
    if public_key is not None:
        key = load_public_key(public_key)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        problems = check_consistency(proof, raw)
        if problems:
            raise NexusError("the consistency proof does not hold: " + "; ".join(problems))
    return proof


def compact_evidence(evidence_dir: Path, signing_key: Path, now: datetime, file_rows: int) -> CompactReport:
    """Merge the evidence's small files into large ones, re-sealed with the evidence key; an error
    while a projector is writing the folder (compaction takes its lock)."""
    if file_rows < 1_000:
        raise NexusError(f"--file-rows must be at least 1,000 (got {file_rows})")
    return compact(evidence_dir, load_private_key(signing_key), now, file_rows=file_rows)


def erasure_scope(tenant: str, subject: str | None) -> str:
    """Whose content keys an erasure destroys, in words."""
    return f"tenant {tenant}" + (f", data subject {subject}" if subject else " (every data subject)")


def erase_content(
    evidence_dir: Path,
    signing_key: Path,
    tenant: str,
    subject: str | None,
    reason: str,
    now: datetime,
    keystore: Path | None = None,
) -> list[str]:
    """Destroy the content keys of a tenant (or one data subject), recorded first, signed, in the
    evidence folder; return their ids (an error if there were none)."""
    key = load_private_key(signing_key)
    erased = erase(evidence_dir, content_keys(evidence_dir, keystore), key, tenant, subject, now, reason)
    if not erased:
        raise NexusError(
            f"no content keys of {erasure_scope(tenant, subject)} in the keystore "
            "(nothing was ever stored, or already erased)"
        )
    return erased
