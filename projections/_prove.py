"""``nexuscore evidence prove``: an inclusion proof for every stored event of one request.

A proof is JSON an auditor checks with nothing but sha256 and Ed25519 (the README shows how):

- each event's row bytes (``leaf``), hashed as an RFC 6962 leaf, climb their ``file_path`` to the
  file's Merkle root;
- that root is the ``merkle_root`` of a manifest entry (``entry``, its exact line), whose hash as a
  leaf climbs ``entry_path`` to the manifest root;
- that root, the entry count and the last entry's hash are what the head's Ed25519 signature covers.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import duckdb

from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections import _merkle, _seal
from nexuscore.projections._manifest import committed_files, head_message, read_head, read_lines
from nexuscore.projections._store import sql_list
from nexuscore.projections._tables import SCHEMAS


def prove(root: Path, request_id: str, tenant: str | None = None) -> dict[str, Any]:
    """An inclusion proof of every stored event of one request (of ``tenant``: request ids are
    unique per tenant only, so an id several tenants used needs one)."""
    head = read_head(root)
    if head is None:
        raise EvidenceError(f"no signed manifest head under {root}")
    lines = read_lines(root)[: head["size"]]
    entry_leaves = [_merkle.leaf_hash(line) for line in lines]
    index_of = {json.loads(line).get("path"): i for i, line in enumerate(lines)}
    by_table: dict[str, list[str]] = {}
    for e in committed_files(root):
        by_table.setdefault(e["table"], []).append(str(root / e["path"]))
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    hits: list[tuple[str, str, int]] = []
    tenants: set[str] = set()
    for table, paths in by_table.items():
        sources = sql_list(paths)
        found = con.execute(
            f"SELECT filename, file_row_number, tenant_id FROM read_parquet({sources}, hive_partitioning = false, "  # noqa: S608
            "filename = true, file_row_number = true) WHERE request_id = ? AND (? IS NULL OR tenant_id = ?) "
            "ORDER BY src_offset",
            [request_id, tenant, tenant],
        ).fetchall()
        hits.extend((table, name, row) for name, row, _ in found)
        tenants.update(t for _, _, t in found)
    if not hits:
        raise EvidenceError(f"no events of request {request_id!r} in the committed evidence under {root}")
    if len(tenants) > 1:
        raise EvidenceError(
            f"request id {request_id!r} was used by several tenants ({', '.join(sorted(tenants))}): name one with --tenant"
        )
    events = []
    for table, name, row in hits:
        source = _seal.file_source(name)
        leaves = _seal.leaf_hashes(con, SCHEMAS[table], source)
        leaf = _seal.canonical_row(con, SCHEMAS[table], name, row)
        relative = Path(name).relative_to(root).as_posix()
        entry_index = index_of[relative]
        events.append(
            {
                "table": table,
                "leaf": leaf,
                "leaf_index": row,
                "file_size": len(leaves),
                "file_path": [h.hex() for h in _merkle.audit_path(row, leaves)],
                "entry": lines[entry_index].decode("ascii"),
                "entry_index": entry_index,
                "entry_path": [h.hex() for h in _merkle.audit_path(entry_index, entry_leaves)],
            }
        )
    con.close()
    return {
        "request_id": request_id,
        "algorithm": "RFC 6962 Merkle trees over sha256; Ed25519 head signature",
        "head": head,
        "signed_message": head_message(head).decode("ascii"),
        "events": events,
    }


def check_proof(proof: dict[str, Any], public_key_raw: bytes) -> list[str]:
    """Problems with a proof (empty when it holds): the auditor's check, as NexusCore runs it."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    problems = []
    head = proof["head"]
    try:
        Ed25519PublicKey.from_public_bytes(public_key_raw).verify(
            base64.b64decode(head["signature"]), head_message(head)
        )
    except (InvalidSignature, ValueError):
        problems.append("the head's signature does not verify with the trusted key")
    for ev in proof["events"]:
        root = _merkle.root_from_path(
            _merkle.leaf_hash(ev["leaf"].encode()),
            ev["leaf_index"],
            ev["file_size"],
            [bytes.fromhex(h) for h in ev["file_path"]],
        )
        entry = json.loads(ev["entry"])
        if root.hex() != entry["merkle_root"]:
            problems.append(f"{ev['table']} row {ev['leaf_index']} does not climb to its file's root")
        top = _merkle.root_from_path(
            _merkle.leaf_hash(ev["entry"].encode()),
            ev["entry_index"],
            head["size"],
            [bytes.fromhex(h) for h in ev["entry_path"]],
        )
        if top.hex() != head["root"]:
            problems.append(f"manifest entry {ev['entry_index']} does not climb to the signed root")
        if proof["request_id"] not in ev["leaf"]:
            problems.append(
                f"{ev['table']} row {ev['leaf_index']} is not about request {proof['request_id']}"
            )
    return problems
