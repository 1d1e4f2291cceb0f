"""Where the tenants' content keys live: light enough for a running stage (no DuckDB, no store)."""

from __future__ import annotations

from pathlib import Path

from nexuscore.projections import LocalKeyStore


def content_keys(evidence_dir: Path, keystore: Path | None = None) -> LocalKeyStore:
    """The tenants' content keys: ``keystore``, or ``_keys`` inside the evidence folder."""
    return LocalKeyStore(keystore or evidence_dir / "_keys", erasures_from=evidence_dir)
