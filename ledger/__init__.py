"""The ledger's Merkle trees (RFC 6962 / RFC 9162, sha256): pure functions over leaf hashes, no I/O.

Three parts, as in transparency-dev/merkle:

- hashing (``leaf_hash``, ``node_hash``, ``EMPTY_ROOT``): the RFC 6962 hasher;
- building, by whoever holds every leaf (the log): ``root``, ``audit_path`` (an inclusion proof),
  ``consistency_proof`` (the old tree is a prefix of the new one), and ``Frontier``, the right
  edge of a growing tree that keeps its root current in O(log n);
- verifying, by whoever holds only a root (an auditor): ``root_from_path``, ``verify_inclusion``,
  ``verify_consistency``.

Evidence uses it twice: the rows of each sealed file are the leaves of the file's tree, and the
lines of ``manifest.jsonl`` are the leaves of the tree whose root the signed head carries.
"""

from nexuscore.ledger._frontier import Frontier
from nexuscore.ledger._hash import EMPTY_ROOT, HASH_SIZE, leaf_hash, node_hash
from nexuscore.ledger._tree import audit_path, consistency_proof, root
from nexuscore.ledger._verify import root_from_path, verify_consistency, verify_inclusion

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "audit_path",
    "consistency_proof",
    "leaf_hash",
    "node_hash",
    "root",
    "root_from_path",
    "verify_consistency",
    "verify_inclusion",
]
