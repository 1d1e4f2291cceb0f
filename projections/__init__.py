"""The evidence plane: sealed Parquet tables projected from the log, DuckDB views and reports over
them, verification, inclusion and consistency proofs, and erasure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexuscore.kernel.lazy import lazy_exports
from nexuscore.projections._keys import FieldCipher, KeyStore, LocalKeyStore, erase
from nexuscore.projections._manifest import MAX_HEAD_BYTES, Manifest, committed_files, read_regular
from nexuscore.projections._tables import ROW_BUILDERS, SCHEMAS, TABLES, Row
from nexuscore.projections._writer import SealedWriter, region_dir, write_table

if TYPE_CHECKING:
    from nexuscore.projections._compact import CompactReport, compact
    from nexuscore.projections._lineage import lineage_at
    from nexuscore.projections._projector import UNASSIGNED, Projector, use_system_allocator
    from nexuscore.projections._prove import check_consistency, check_proof, prove, prove_consistency
    from nexuscore.projections._report import render_html
    from nexuscore.projections._store import ALLOWED_RESIDENCY_FINDING, EvidenceStore, residency_breaches
    from nexuscore.projections._verify import Finding, VerifyReport, verify

# Loaded on first use: the projector brings the decider's core, the policy model and aiokafka, and
# compaction and verify their process pools, about half a second of CPU that a query or a lineage
# (``evidence residency``, ``evidence lineage``: a fresh process each) does not need; the store and
# lineage bring DuckDB, about 15 MB that the projector (and every stage) does not need resident.
_LAZY = {
    "lineage_at": "_lineage",
    "ALLOWED_RESIDENCY_FINDING": "_store",
    "EvidenceStore": "_store",
    "residency_breaches": "_store",
    "CompactReport": "_compact",
    "compact": "_compact",
    "UNASSIGNED": "_projector",
    "Projector": "_projector",
    "use_system_allocator": "_projector",
    "check_consistency": "_prove",
    "check_proof": "_prove",
    "prove": "_prove",
    "prove_consistency": "_prove",
    "render_html": "_report",
    "Finding": "_verify",
    "VerifyReport": "_verify",
    "verify": "_verify",
}


__getattr__ = lazy_exports(__name__, globals(), _LAZY)


__all__ = [
    "MAX_HEAD_BYTES",
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
    "use_system_allocator",
    "verify",
    "write_table",
    "read_regular",
]
