"""The evidence plane: sealed Parquet tables projected from the log, DuckDB views and reports over
them, verification, inclusion and consistency proofs, and erasure."""

from nexuscore.projections._compact import CompactReport, compact
from nexuscore.projections._keys import FieldCipher, KeyStore, LocalKeyStore, erase
from nexuscore.projections._lineage import lineage_at
from nexuscore.projections._manifest import Manifest, committed_files
from nexuscore.projections._projector import UNASSIGNED, Projector
from nexuscore.projections._prove import check_consistency, check_proof, prove, prove_consistency
from nexuscore.projections._report import render_html
from nexuscore.projections._store import ALLOWED_RESIDENCY_FINDING, EvidenceStore, residency_breaches
from nexuscore.projections._tables import ROW_BUILDERS, SCHEMAS, TABLES, Row
from nexuscore.projections._verify import Finding, VerifyReport, verify
from nexuscore.projections._writer import SealedWriter, region_dir, write_table

__all__ = [
    "ALLOWED_RESIDENCY_FINDING",
    "ROW_BUILDERS",
    "Row",
    "render_html",
    "SCHEMAS",
    "TABLES",
    "UNASSIGNED",
    "CompactReport",
    "EvidenceStore",
    "FieldCipher",
    "Finding",
    "KeyStore",
    "LocalKeyStore",
    "Manifest",
    "Projector",
    "SealedWriter",
    "VerifyReport",
    "check_consistency",
    "check_proof",
    "committed_files",
    "compact",
    "erase",
    "lineage_at",
    "prove",
    "prove_consistency",
    "region_dir",
    "residency_breaches",
    "verify",
    "write_table",
]
