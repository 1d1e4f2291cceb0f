"""``nexuscore evidence prove``: an inclusion proof for every stored event of one request, and a
consistency proof that the ledger only grew since an older signed head.

An inclusion proof is JSON an auditor checks with nothing but sha256 and Ed25519 (the README shows how):

- each event's row bytes (``leaf``), hashed as an RFC 6962 leaf, climb their ``file_path`` to the
  file's Merkle root;
- that root is the ``merkle_root`` of a manifest entry (``entry``, its exact line), whose hash as a
  leaf climbs ``entry_path`` to the manifest root;
- that root, the entry count and the last entry's hash are what the head's Ed25519 signature covers.

A consistency proof (RFC 9162 section 2.1.4) carries the old head, the current signed head and the
hashes that show the old head's tree of manifest entries is a prefix of the current one: nothing
the old head signed was changed, removed or reordered since, only entries appended.
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import Any, TypeGuard

import duckdb

from nexuscore import ledger
from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import _seal
from nexuscore.projections._index import LINEAGE_TABLES, current_index, locate, well_formed
from nexuscore.projections._manifest import (
    MANIFEST,
    Entry,
    committed_files,
    head_message,
    read_head,
    read_lines,
    sealed_copies,
    signed_entries,
)
from nexuscore.projections._store import sql_list
from nexuscore.projections._tables import SCHEMAS


def prove(root: Path, request_id: str, tenant: str | None = None) -> dict[str, Any]:
    """An inclusion proof of every stored event of one request (of ``tenant``: request ids are
    unique per tenant only, so an id several tenants used needs one)."""
    head = read_head(root)
    if head is None:
        raise EvidenceError(f"no signed manifest head under {root}")
    lines = read_lines(root)[: head["size"]]
    with tempfile.TemporaryDirectory(prefix="nexuscore-prove-") as private:
        may_hold = _may_hold(root, committed_files(root), request_id, tenant, Path(private))
        # The proof reads copies of the bytes it checked: a row swapped out after the check, and
        # put back before anyone looks, is not left out of a proof that still checks.
        copies = sealed_copies(root, may_hold, Path(private), purpose="prove from it", refusal=_not_sealed)
        sealed = dict(zip(copies, may_hold, strict=True))
        return _prove_from(root, head, lines, sealed, request_id, tenant)


def _prove_from(
    root: Path,
    head: dict[str, Any],
    lines: list[bytes],
    sealed: dict[str, Entry],
    request_id: str,
    tenant: str | None,
) -> dict[str, Any]:
    """The proof, from ``sealed``: private copies of the files that may hold the request's rows,
    each with its ledger entry."""
    entry_leaves = [ledger.leaf_hash(line) for line in lines]
    index_of = {json.loads(line).get("path"): i for i, line in enumerate(lines)}
    by_table: dict[str, list[str]] = {}
    for copy, e in sealed.items():
        by_table.setdefault(e["table"], []).append(copy)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        hits, tenants = _hits(con, by_table, request_id, tenant)
    except duckdb.Error as exc:
        con.close()
        raise EvidenceError(f"cannot read the evidence under {root}: {str(exc).splitlines()[0]}") from exc
    if not hits:
        raise EvidenceError(f"no events of request {request_id!r} in the committed evidence under {root}")
    if len(tenants) > 1:
        raise EvidenceError(
            f"request id {request_id!r} was used by several tenants ({', '.join(sorted(tenants))}): name one with --tenant"
        )
    events = []
    for table, name, row in hits:
        leaf = _seal.canonical_row(con, SCHEMAS[table], name, row)
        entry_index = index_of[sealed[name]["path"]]
        size, path = _file_path(con, table, name, row, json.loads(lines[entry_index]))
        events.append(
            {
                "table": table,
                "leaf": leaf,
                "leaf_index": row,
                "file_size": size,
                "file_path": [h.hex() for h in path],
                "entry": lines[entry_index].decode("ascii"),
                "entry_index": entry_index,
                "entry_path": [h.hex() for h in ledger.audit_path(entry_index, entry_leaves)],
            }
        )
    con.close()
    return {
        "request_id": request_id,
        "tenant_id": tenants.pop(),
        "algorithm": "RFC 6962 Merkle trees over sha256; Ed25519 head signature",
        "head": head,
        "signed_message": head_message(head).decode("ascii"),
        "events": events,
    }


def _may_hold(
    root: Path, files: list[Entry], request_id: str, tenant: str | None, private: Path
) -> list[Entry]:
    """The committed files a row of the request may be in: those the request index places its rows
    in, and every file the index does not cover (all of them when there is no index whose bytes
    are the ones the ledger sealed). The index is read from a private copy of the checked bytes."""
    index = current_index(signed_entries(root))
    if index is None or not well_formed(index):
        return files
    copied = private / "index"
    copied.mkdir()
    try:
        (copy,) = sealed_copies(root, [index], copied, purpose="read it", refusal=str)
    except EvidenceError:
        return files  # unreadable, or not the sealed index: every file is searched
    placed = copied / index["path"]  # where ``locate`` looks for it (a well-formed relative path)
    placed.parent.mkdir(parents=True)
    Path(copy).rename(placed)
    lineage = {e["path"]: e for e in files if e.get("table") in LINEAGE_TABLES}
    located = locate(copied, index, lineage, request_id, tenant)
    if located is None:
        return files
    covered, found = located
    holding = {Path(path).relative_to(copied.absolute()).as_posix() for _, path, _ in found}
    return [e for e in files if e["path"] not in covered or e["path"] in holding]


def _not_sealed(path: str) -> str:
    """Why no proof is built on a file that is not the one the ledger sealed: a row taken out of it
    (no key needed) would leave a proof of the request's other rows that checks, and the auditor
    would see a request that was never refused, say."""
    return (
        f"{path} is not the file the ledger sealed (its sha256 differs): no proof is built on it; "
        "run `nexuscore evidence verify`"
    )


def _hits(
    con: duckdb.DuckDBPyConnection, by_table: dict[str, list[str]], request_id: str, tenant: str | None
) -> tuple[list[tuple[str, str, int]], set[str]]:
    """(table, file, row number) of every row of the request, and the tenants they belong to."""
    hits: list[tuple[str, str, int]] = []
    tenants: set[str] = set()
    for table, paths in by_table.items():
        found = con.execute(
            f"SELECT filename, file_row_number, tenant_id FROM read_parquet({sql_list(paths)}, "  # noqa: S608
            "hive_partitioning = false, filename = true, file_row_number = true) "
            "WHERE request_id = ? AND (? IS NULL OR tenant_id = ?) ORDER BY src_offset",
            [request_id, tenant, tenant],
        ).fetchall()
        hits.extend((table, name, row) for name, row, _ in found)
        tenants.update(t for _, _, t in found)
    return hits, tenants


def _file_path(
    con: duckdb.DuckDBPyConnection, table: str, name: str, row: int, entry: dict[str, Any]
) -> tuple[int, list[bytes]]:
    """(rows in the file, audit path of ``row`` to the file's root). A compacted file's entry lists
    the roots of its aligned subtrees (``chunk_roots``, ``chunk_rows`` leaves each): then only the
    rows of ``row``'s subtree are hashed, and the path climbs on through the listed roots."""
    chunk, roots = entry.get("chunk_rows"), entry.get("chunk_roots")
    usable = (
        isinstance(chunk, int)
        and chunk > 0
        and chunk & (chunk - 1) == 0  # a power of two: aligned subtrees are nodes of the tree
        and isinstance(roots, list)
        and all(_is_hash(r) for r in roots)
        and isinstance(entry.get("rows"), int)
        and len(roots) == -(-entry["rows"] // chunk)
    )
    if not usable:
        leaves = _seal.leaf_hashes(con, SCHEMAS[table], _seal.file_source(name))
        return len(leaves), ledger.audit_path(row, leaves)
    assert isinstance(chunk, int) and isinstance(roots, list)
    first = row - row % chunk
    source = (
        "(SELECT * FROM read_parquet('" + name.replace("'", "''") + "', hive_partitioning = false, "  # noqa: S608
        f"file_row_number = true) WHERE file_row_number BETWEEN {first} AND {first + chunk - 1} "
        "ORDER BY file_row_number)"
    )
    leaves = _seal.leaf_hashes(con, SCHEMAS[table], source)
    inner = ledger.audit_path(row - first, leaves)
    outer = ledger.audit_path(row // chunk, [bytes.fromhex(r) for r in roots])
    return int(entry["rows"]), inner + outer


def _signed(head: dict[str, Any], public_key_raw: bytes) -> bool:
    """Whether ``head`` carries a valid Ed25519 signature by the key ``public_key_raw``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(
            base64.b64decode(head["signature"]), head_message(head)
        )
    except (InvalidSignature, ValueError):
        return False
    return True


def check_proof(proof: dict[str, Any], public_key_raw: bytes) -> list[str]:
    """Problems with a proof (empty when it holds): the auditor's check, as NexusCore runs it."""
    problems = []
    head = proof["head"]
    if not _signed(head, public_key_raw):
        problems.append("the head's signature does not verify with the trusted key")
    for ev in proof["events"]:
        root = ledger.root_from_path(
            ledger.leaf_hash(ev["leaf"].encode()),
            ev["leaf_index"],
            ev["file_size"],
            [bytes.fromhex(h) for h in ev["file_path"]],
        )
        entry = json.loads(ev["entry"])
        if root.hex() != entry["merkle_root"]:
            problems.append(f"{ev['table']} row {ev['leaf_index']} does not climb to its file's root")
        top = ledger.root_from_path(
            ledger.leaf_hash(ev["entry"].encode()),
            ev["entry_index"],
            head["size"],
            [bytes.fromhex(h) for h in ev["entry_path"]],
        )
        if top.hex() != head["root"]:
            problems.append(f"manifest entry {ev['entry_index']} does not climb to the signed root")
        if not _of_request(ev["leaf"], proof["request_id"], proof.get("tenant_id")):
            problems.append(
                f"{ev['table']} row {ev['leaf_index']} is not about request {proof['request_id']} "
                f"of tenant {proof.get('tenant_id')}"
            )
    if not proof["events"]:
        problems.append("no events: a proof of nothing")
    return problems


def _of_request(leaf: str, request_id: str, tenant: object) -> bool:
    """Is the row ``leaf`` renders the request's of the tenant? Every table's columns begin with the
    envelope (event id, request id, tenant id): the values compared, not a substring of the row,
    which a longer id (or another tenant's same id) would contain."""
    try:
        row = json.loads(leaf)
    except ValueError:
        return False
    return isinstance(row, list) and len(row) > 2 and row[1] == request_id and row[2] == tenant


def prove_consistency(root: Path, old_head: dict[str, Any]) -> dict[str, Any]:
    """A consistency proof that the ledger under ``root`` only grew since ``old_head``, an earlier
    signed head (``manifest.head.json`` as it was then): the old head, the current signed head and
    the RFC 9162 consistency path between them, as JSON-able data.

    Refused (``EvidenceError``) when no proof can exist: the old head is larger than the current
    one, or its root is not the root of the current ledger's first entries (the ledger was
    rewritten since, or the old head is of another ledger)."""
    head = read_head(root)
    if head is None:
        raise EvidenceError(f"no signed manifest head under {root}")
    old_size, old_root = old_head.get("size"), old_head.get("root")
    if not _is_size(old_size) or not _is_hash(old_root):
        raise EvidenceError("the old head has no valid size and root: is it a manifest.head.json?")
    size = head["size"]
    if old_size > size:
        raise EvidenceError(
            f"the old head signs {old_size} entries, the current one {size}: the ledger cannot have "
            "grown from it (it shrank, or the old head is of another ledger)"
        )
    lines = read_lines(root)[:size]
    leaves = [ledger.leaf_hash(line) for line in lines]
    if len(lines) != size or ledger.root(leaves).hex() != head["root"]:
        raise EvidenceError(
            f"{root / MANIFEST} does not match its signed head: run `nexuscore evidence verify`"
        )
    if ledger.root(leaves[:old_size]).hex() != old_root:
        raise EvidenceError(
            f"the old head's root is not the root of the first {old_size} entries of {root / MANIFEST}: "
            "the ledger was rewritten since, or the old head is of another ledger"
        )
    return {
        "algorithm": "RFC 9162 consistency proof over RFC 6962 Merkle trees (sha256); Ed25519 head signatures",
        "old_head": old_head,
        "new_head": head,
        "consistency_path": [h.hex() for h in ledger.consistency_proof(old_size, leaves)],
    }


def check_consistency(proof: dict[str, Any], public_key_raw: bytes) -> list[str]:
    """Problems with a consistency proof (empty when it holds): both heads signed by the trusted
    key, and the path proving the old head's tree a prefix of the new head's."""
    problems = []
    old, new = proof["old_head"], proof["new_head"]
    for name, head in (("old", old), ("new", new)):
        if not _signed(head, public_key_raw):
            problems.append(f"the {name} head's signature does not verify with the trusted key")
    try:
        path = [bytes.fromhex(h) for h in proof["consistency_path"]]
        old_root, new_root = bytes.fromhex(old["root"]), bytes.fromhex(new["root"])
    except (TypeError, ValueError, KeyError):
        return [*problems, "the consistency proof is malformed (roots and path must be hex)"]
    old_size, new_size = old.get("size"), new.get("size")
    if not (_is_size(old_size) and _is_size(new_size)):
        return [*problems, "a head's size is not a count of entries"]
    if not ledger.verify_consistency(old_size, new_size, old_root, new_root, path):
        problems.append(
            f"the path does not prove the old head ({old_size} entries) a prefix of the new one "
            f"({new_size} entries): the ledger did not only grow"
        )
    return problems


def _is_size(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_hash(value: object) -> TypeGuard[str]:
    return (
        isinstance(value, str)
        and len(value) == 2 * ledger.HASH_SIZE
        and all(c in "0123456789abcdef" for c in value)
    )
