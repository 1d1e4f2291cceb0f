"""RFC 6962 Merkle trees, checked against the RFC's recursive definition."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexuscore.projections._merkle import (
    EMPTY_ROOT,
    Frontier,
    audit_path,
    leaf_hash,
    node_hash,
    root,
    root_from_path,
)


def mth(leaves: list[bytes]) -> bytes:
    """MTH from RFC 6962 section 2.1, word for word."""
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path_rfc(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) from RFC 6962 section 2.1.1."""
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*path_rfc(m, leaves[:k]), mth(leaves[k:])]
    return [*path_rfc(m - k, leaves[k:]), mth(leaves[:k])]


LEAVES = [f"event {i}".encode() for i in range(70)]


@pytest.mark.parametrize("n", range(70))
def test_root_path_and_frontier_match_the_rfc_for_every_size(n: int) -> None:
    leaves = LEAVES[:n]
    hashes = [leaf_hash(x) for x in leaves]
    assert root(hashes) == mth(leaves)
    frontier = Frontier()
    for h in hashes:
        frontier.append(h)
    assert frontier.root() == mth(leaves) and frontier.size == n
    for m in range(n):
        path = audit_path(m, hashes)
        assert path == path_rfc(m, leaves)
        assert root_from_path(hashes[m], m, n, path) == mth(leaves)


def test_the_empty_tree_and_a_single_leaf_have_the_rfc_values() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    # sha256(0x00): the root of one empty leaf, as in Certificate Transparency's test data.
    assert root([leaf_hash(b"")]).hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    assert node_hash(b"a", b"b") == hashlib.sha256(b"\x01ab").digest()


@given(st.integers(2, 200), st.data())
def test_a_path_proves_nothing_for_another_leaf_index_or_tree_size(n: int, data: st.DataObject) -> None:
    hashes = [leaf_hash(x.to_bytes(4, "big")) for x in range(n)]
    top = root(hashes)
    m = data.draw(st.integers(0, n - 1))
    path = audit_path(m, hashes)
    other = data.draw(st.integers(0, n - 1).filter(lambda i: i != m))
    assert root_from_path(hashes[other], m, n, path) != top
    with pytest.raises(ValueError):
        root_from_path(hashes[m], n, n, path)
