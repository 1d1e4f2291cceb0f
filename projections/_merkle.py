"""Moved to ``nexuscore.ledger`` (its own package); these names stay here only for the modules that
still import them from the old place. Import from ``nexuscore.ledger``."""

from nexuscore.ledger import EMPTY_ROOT, Frontier, audit_path, leaf_hash, node_hash, root, root_from_path

__all__ = ["EMPTY_ROOT", "Frontier", "audit_path", "leaf_hash", "node_hash", "root", "root_from_path"]
