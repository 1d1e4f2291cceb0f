"""The RFC 6962 hasher: what a leaf and an inner node hash to (sha256, with domain separation).

leaf hash = SHA-256(0x00 || leaf bytes); node hash = SHA-256(0x01 || left || right); the root of
the empty tree is SHA-256 of nothing. The prefixes keep a leaf from passing for a node.
"""

from __future__ import annotations

import hashlib

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(leaf: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()
