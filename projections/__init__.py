"""The evidence plane: Parquet tables projected from the log, DuckDB views over them."""

from nexuscore.projections._projector import Projector, write_table
from nexuscore.projections._store import EvidenceStore
from nexuscore.projections._tables import SCHEMAS, TABLES

__all__ = ["SCHEMAS", "TABLES", "EvidenceStore", "Projector", "write_table"]
