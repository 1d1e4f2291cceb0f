"""The ledger (``nexuscore.ledger``): RFC 6962 trees and RFC 9162 proofs, checked three ways.

- against the RFCs' own recursive definitions (``mth``, ``path_rfc``, ``proof_rfc`` below, word
  for word), for every tree of up to 70 leaves, and against values published with Certificate
  Transparency's reference code;
- against frozen golden vectors, ``ledger_vectors.json``: roots, inclusion paths and consistency
  proofs over 13 fixed leaves, and tampered ones that must fail. They were made once from the RFC
  definitions (``python -m tests.unit.test_ledger`` writes them again); a change of any byte the
  library produces fails here;
- by property tests: a consistency proof holds for any old size up to the new one, and fails once
  a leaf the old head covers is changed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexuscore.ledger import (
    EMPTY_ROOT,
    Frontier,
    audit_path,
    consistency_proof,
    leaf_hash,
    node_hash,
    root,
    root_from_path,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).with_name("ledger_vectors.json")


# --- the RFCs' definitions ----------------------------------------------------------------------


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


def proof_rfc(m: int, leaves: list[bytes]) -> list[bytes]:
    """PROOF(m, D[n]) from RFC 9162 section 2.1.4.1 (empty for m = 0 and m = n)."""

    def subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
        n = len(d)
        if m == n:
            return [] if b else [mth(d)]
        k = 1 << ((n - 1).bit_length() - 1)
        if m <= k:
            return [*subproof(m, d[:k], b), mth(d[k:])]
        return [*subproof(m - k, d[k:], False), mth(d[:k])]

    return [] if m in (0, len(leaves)) else subproof(m, leaves, True)


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
        assert verify_inclusion(hashes[m], m, n, path, mth(leaves))


@pytest.mark.parametrize("n", range(70))
def test_consistency_proofs_match_the_rfc_for_every_pair_of_sizes(n: int) -> None:
    leaves = LEAVES[:n]
    hashes = [leaf_hash(x) for x in leaves]
    for m in range(n + 1):
        proof = consistency_proof(m, hashes)
        assert proof == proof_rfc(m, leaves)
        assert verify_consistency(m, n, mth(leaves[:m]), mth(leaves), proof)
    with pytest.raises(ValueError):
        consistency_proof(n + 1, hashes)


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
    assert not verify_inclusion(hashes[other], m, n, path, top)
    with pytest.raises(ValueError):
        root_from_path(hashes[m], n, n, path)


@given(st.integers(1, 300), st.data())
def test_a_log_that_only_grew_is_consistent_and_one_with_a_changed_old_leaf_is_not(
    n: int, data: st.DataObject
) -> None:
    hashes = [leaf_hash(x.to_bytes(4, "big")) for x in range(n)]
    m = data.draw(st.integers(0, n), label="old size")
    old_root = root(hashes[:m])
    assert verify_consistency(m, n, old_root, root(hashes), consistency_proof(m, hashes))
    if m == 0:
        return
    j = data.draw(st.integers(0, m - 1), label="changed leaf")
    tampered = [*hashes]
    tampered[j] = leaf_hash(b"rewritten")
    # The log's honest proof of its rewritten history cannot connect it to the old head...
    assert not verify_consistency(m, n, old_root, root(tampered), consistency_proof(m, tampered))
    # ...nor can the old proof vouch for the rewritten head.
    assert not verify_consistency(m, n, old_root, root(tampered), consistency_proof(m, hashes))
    # A leaf the old head did not cover is the log's to append: changing it is growth, not a rewrite.
    if m < n:
        later = [*hashes]
        later[data.draw(st.integers(m, n - 1), label="appended leaf")] = leaf_hash(b"appended")
        assert verify_consistency(m, n, old_root, root(later), consistency_proof(m, later))


def test_consistency_edge_cases() -> None:
    hashes = [leaf_hash(bytes([i])) for i in range(5)]
    r5, r3 = root(hashes), root(hashes[:3])
    assert verify_consistency(0, 5, EMPTY_ROOT, r5, [])
    assert not verify_consistency(0, 5, r3, r5, [])  # a size-0 head has the empty root
    assert not verify_consistency(0, 5, EMPTY_ROOT, r5, [r3])
    assert verify_consistency(5, 5, r5, r5, [])
    assert not verify_consistency(5, 5, r5, r3, [])
    assert not verify_consistency(5, 5, r5, r5, [r5])
    assert not verify_consistency(5, 3, r5, r3, consistency_proof(3, hashes))  # the log shrank
    assert not verify_consistency(-1, 5, r3, r5, [])
    assert not verify_consistency(3, 5, r3, r5, [])
    proof = consistency_proof(3, hashes)
    assert verify_consistency(3, 5, r3, r5, proof)
    assert not verify_consistency(3, 5, r3[:31], r5, proof)  # hashes are 32 bytes
    assert not verify_consistency(3, 5, r3, r5, [*proof[:-1], proof[-1] + b"\x00"])


def test_a_proof_fixes_the_shape_of_the_tree_not_its_size() -> None:
    # Leaf 2's path in a tree of 5 climbs the same way in a tree of 6: sizes of the same shape are
    # not told apart by a path, which is why the head signs its size together with its root.
    hashes = [leaf_hash(bytes([i])) for i in range(5)]
    path, r5 = audit_path(2, hashes), root(hashes)
    assert verify_inclusion(hashes[2], 2, 6, path, r5)
    assert verify_consistency(2, 6, root(hashes[:2]), r5, consistency_proof(2, hashes))


# --- Certificate Transparency's published values ----------------------------------------------

# The leaves, roots and proofs of transparency-dev/merkle's proof/verify_test.go (from CT's tests).
CT_LEAVES = [
    bytes.fromhex(x)
    for x in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
CT_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_INCLUSION = {
    (0, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (5, 8): ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 3): ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    (1, 5): ["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
}  # fmt: skip
CT_CONSISTENCY = {
    (1, 8): ["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
             "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4"],
    (6, 8): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
    (2, 5): ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
             "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"],
    (6, 7): ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
             "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"],
}  # fmt: skip


def test_the_values_published_with_certificate_transparency() -> None:
    hashes = [leaf_hash(x) for x in CT_LEAVES]
    assert [root(hashes[:n]).hex() for n in range(1, 9)] == CT_ROOTS
    for (index, size), path in CT_INCLUSION.items():
        assert [h.hex() for h in audit_path(index, hashes[:size])] == path
    for (m, n), proof in CT_CONSISTENCY.items():
        assert [h.hex() for h in consistency_proof(m, hashes[:n])] == proof
        assert verify_consistency(m, n, root(hashes[:m]), root(hashes[:n]), [bytes.fromhex(h) for h in proof])


# --- the golden vectors -------------------------------------------------------------------------

# The first eight are CT's leaves, so the vectors' first roots are the published ones above.
VECTOR_LEAVES = [*CT_LEAVES, *(f"manifest entry {i}".encode() for i in range(8, 13))]
OTHER_LEAVES = [b"another log " + x for x in VECTOR_LEAVES]
TAMPERED_INCLUSION = [(2, 5), (5, 8), (4, 7), (0, 13), (8, 13), (12, 13)]
TAMPERED_CONSISTENCY = [(1, 8), (2, 5), (3, 7), (6, 8), (6, 7), (4, 13), (7, 12), (9, 13)]


def build_vectors() -> dict[str, Any]:
    """The golden vectors, from the RFC definitions alone (not the library)."""
    leaves, n = VECTOR_LEAVES, len(VECTOR_LEAVES)
    hashes = [hashlib.sha256(b"\x00" + x).digest() for x in leaves]
    roots = [mth(leaves[:size]) for size in range(n + 1)]
    other = [mth(OTHER_LEAVES[:size]) for size in range(n + 1)]

    def flip(h: bytes, at: int) -> bytes:
        return h[:at] + bytes([h[at] ^ 0xFF]) + h[at + 1 :]

    bad_inclusion: list[dict[str, Any]] = []
    for index, size in TAMPERED_INCLUSION:
        path = path_rfc(index, leaves[:size])
        good: dict[str, Any] = {
            "leaf": hashes[index],
            "index": index,
            "size": size,
            "root": roots[size],
            "path": path,
        }
        cases: list[tuple[str, dict[str, Any]]] = [
            (f"byte {i} of path[{i}] flipped", {"path": [*path[:i], flip(p, i), *path[i + 1 :]]})
            for i, p in enumerate(path)
        ]
        cases += [
            ("wrong index: one more", {"index": index + 1}),
            ("wrong index: one less", {"index": index - 1}),
            ("wrong size: twice", {"size": size * 2}),
            ("wrong size: half", {"size": size // 2}),
            ("wrong size: the index", {"size": index}),
            ("truncated path", {"path": path[:-1]}),
            ("path with the root appended", {"path": [*path, roots[size]]}),
            ("path with the leaf prepended", {"path": [hashes[index], *path]}),
            ("another leaf", {"leaf": hashes[(index + 1) % size]}),
            ("root of another log of that size", {"root": other[size]}),
        ]
        bad_inclusion += [{"why": why, **good, **change} for why, change in cases]

    bad_consistency: list[dict[str, Any]] = []
    for m, size in TAMPERED_CONSISTENCY:
        proof = proof_rfc(m, leaves[:size])
        good = {
            "old_size": m,
            "new_size": size,
            "old_root": roots[m],
            "new_root": roots[size],
            "proof": proof,
        }
        cases = [
            (f"byte {i} of proof[{i}] flipped", {"proof": [*proof[:i], flip(p, i), *proof[i + 1 :]]})
            for i, p in enumerate(proof)
        ]
        cases += [
            ("wrong old size: one more", {"old_size": m + 1}),
            ("wrong old size: one less", {"old_size": m - 1}),
            ("wrong new size: twice", {"new_size": size * 2}),
            ("wrong new size: half", {"new_size": size // 2}),
            ("truncated proof", {"proof": proof[:-1]}),
            ("empty proof", {"proof": []}),
            ("proof with the new root appended", {"proof": [*proof, roots[size]]}),
            ("proof with the old root prepended", {"proof": [roots[m], *proof]}),
            ("old root from another log", {"old_root": other[m]}),
            ("new root from another log", {"new_root": other[size]}),
            ("roots swapped", {"old_root": roots[size], "new_root": roots[m]}),
            (
                "the log shrank",
                {"old_size": size, "new_size": m, "old_root": roots[size], "new_root": roots[m]},
            ),
        ]
        bad_consistency += [{"why": why, **good, **change} for why, change in cases]
    bad_consistency += [
        {"why": "from the empty tree with a proof", "old_size": 0, "new_size": 5, "old_root": roots[0],
         "new_root": roots[5], "proof": [roots[0]]},
        {"why": "from an empty tree with a root that is not the empty root", "old_size": 0, "new_size": 5,
         "old_root": other[5], "new_root": roots[5], "proof": []},
        {"why": "same size, another root", "old_size": 5, "new_size": 5, "old_root": other[5],
         "new_root": roots[5], "proof": []},
        {"why": "same size with a proof", "old_size": 5, "new_size": 5, "old_root": roots[5],
         "new_root": roots[5], "proof": [roots[5]]},
    ]  # fmt: skip

    def hexed(v: Any) -> Any:
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, list):
            return [hexed(x) for x in v]
        if isinstance(v, dict):
            return {k: hexed(x) for k, x in v.items()}
        return v

    vectors: dict[str, Any] = hexed(
        {
            "about": "RFC 6962 trees over sha256 and RFC 9162 proofs of the leaves below (hex; a leaf's hash "
            "is sha256(00 || leaf)). roots[n] is the root of the first n leaves. Every tampered vector must "
            "fail verification (a path fixes the shape of a tree, not its size, so the wrong sizes here are "
            "of another shape). Made by tests/unit/test_ledger.py (build_vectors); frozen.",
            "leaves": leaves,
            "roots": roots,
            "inclusion": [
                {"index": i, "size": size, "path": path_rfc(i, leaves[:size])}
                for size in range(1, n + 1)
                for i in range(size)
            ],
            "consistency": [
                {"old_size": m, "new_size": size, "proof": proof_rfc(m, leaves[:size])}
                for size in range(n + 1)
                for m in range(size + 1)
            ],
            "tampered_inclusion": bad_inclusion,
            "tampered_consistency": bad_consistency,
        }
    )
    return vectors


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(VECTORS.read_text(encoding="ascii"))
    return loaded


def test_the_library_reproduces_every_golden_vector(vectors: dict[str, Any]) -> None:
    hashes = [leaf_hash(bytes.fromhex(x)) for x in vectors["leaves"]]
    assert [root(hashes[:n]).hex() for n in range(len(hashes) + 1)] == vectors["roots"]
    frontier = Frontier()
    for n, h in enumerate(hashes, 1):
        frontier.append(h)
        assert frontier.root().hex() == vectors["roots"][n]
    for v in vectors["inclusion"]:
        index, size = v["index"], v["size"]
        path = audit_path(index, hashes[:size])
        assert [h.hex() for h in path] == v["path"], (index, size)
        assert verify_inclusion(hashes[index], index, size, path, bytes.fromhex(vectors["roots"][size]))
    for v in vectors["consistency"]:
        m, n = v["old_size"], v["new_size"]
        proof = consistency_proof(m, hashes[:n])
        assert [h.hex() for h in proof] == v["proof"], (m, n)
        old, new = bytes.fromhex(vectors["roots"][m]), bytes.fromhex(vectors["roots"][n])
        assert verify_consistency(m, n, old, new, proof), (m, n)


def test_every_tampered_vector_fails(vectors: dict[str, Any]) -> None:
    def unhex(hashes: list[str]) -> list[bytes]:
        return [bytes.fromhex(h) for h in hashes]

    passed = []
    for v in vectors["tampered_inclusion"]:
        leaf, top = bytes.fromhex(v["leaf"]), bytes.fromhex(v["root"])
        if verify_inclusion(leaf, v["index"], v["size"], unhex(v["path"]), top):
            passed.append(f"inclusion ({v['index']}, {v['size']}): {v['why']}")
    for v in vectors["tampered_consistency"]:
        old, new = bytes.fromhex(v["old_root"]), bytes.fromhex(v["new_root"])
        if verify_consistency(v["old_size"], v["new_size"], old, new, unhex(v["proof"])):
            passed.append(f"consistency ({v['old_size']}, {v['new_size']}): {v['why']}")
    assert not passed, passed
    assert len(vectors["tampered_inclusion"]) > 70 and len(vectors["tampered_consistency"]) > 120


def test_the_frozen_vectors_are_the_rfc_definitions_output(vectors: dict[str, Any]) -> None:
    assert build_vectors() == vectors


def dump(vectors: dict[str, Any]) -> str:
    """The vectors as JSON, one vector (or root) a line."""
    parts = []
    for key, value in vectors.items():
        if isinstance(value, list):
            items = ",\n".join("  " + json.dumps(x) for x in value)
            parts.append(f" {json.dumps(key)}: [\n{items}\n ]")
        else:
            parts.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    VECTORS.write_text(dump(build_vectors()), encoding="ascii")
