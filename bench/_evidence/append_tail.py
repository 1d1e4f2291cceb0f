"""Append a tail to a COPY of a compacted bench store: one flush, sealed and committed as the projector
commits one, of outcomes again for about N covered decisions of the largest tenant (under new event
ids: late outcomes of covered decisions) and about N new decisions (new request ids, no outcome).

``python -m bench._evidence.append_tail STORE N --signing-key PEM``. The rows are copies, so the
store no longer verifies clean (a request with two outcomes): for measuring ``who-routed-what`` and
``spend`` with files flushed since the compaction (``bench.evidence_reports --label tail``), never
on a store anyone else uses. Refuses a store whose folder name does not say it is a copy (``-copy``
or ``-routed`` in it). Each run is a flush of its own: its offsets follow the tail's before it (a
second run overwrote the first's file under the same name before) and it samples other rows.
"""

from __future__ import annotations

import argparse
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from nexuscore.policy import default_policy
from nexuscore.projections import EvidenceStore, SealedWriter, committed_files

FAR = 10**10  # offsets past any the store has: the tail's own range


def _renamed(rows: pa.Table, column: str, tag: str) -> pa.Table:
    ids = [hashlib.sha256(f"{tag}{v}".encode()).hexdigest()[:32] for v in rows.column(column).to_pylist()]
    return rows.set_column(rows.schema.get_field_index(column), column, pa.array(ids, pa.string()))


def _tail_offsets(root: Path, topic: str) -> list[int]:
    """The first offset of every file of ``topic`` this tool appended (in the tail's own range)."""
    return [
        int(e["first_offset"])
        for e in committed_files(root)
        if e.get("topic") == topic and isinstance(e.get("first_offset"), int) and e["first_offset"] >= FAR
    ]


def _next_offset(root: Path, topic: str) -> int:
    last = [
        e["last_offset"]
        for e in committed_files(root)
        if e.get("topic") == topic and isinstance(e.get("last_offset"), int)
    ]
    return max(FAR, max(last, default=0) + 1)


def append_tail(root: Path, n: int, key: Ed25519PrivateKey) -> dict[str, int]:
    tenant = default_policy().tenants[0].id
    flush = len(_tail_offsets(root, "nexus.outcomes"))  # (0 for the first: its sample and ids as before)
    sample = f"USING SAMPLE {n} ROWS (reservoir, {7 + flush})"
    tag = "tail" if flush == 0 else f"tail{flush}"
    with EvidenceStore(root) as store:
        outcomes = store.query(f"SELECT * FROM outcomes WHERE tenant_id = $t {sample}", {"t": tenant})  # noqa: S608
        decisions = store.query(f"SELECT * FROM decisions WHERE tenant_id = $t {sample}", {"t": tenant})  # noqa: S608
    outcomes = _renamed(outcomes, "event_id", f"{tag}-outcome")
    decisions = _renamed(_renamed(decisions, "event_id", f"{tag}-decision"), "request_id", f"{tag}-request")
    writer = SealedWriter(root, key)
    for rows, table, topic in (
        (outcomes, "outcomes", "nexus.outcomes"),
        (decisions, "decisions", "nexus.decisions"),
    ):
        # (One file per region, as a flush writes them: the largest tenant lives in one.)
        region = rows.column("data_region")[0].as_py()
        rows = rows.filter(pc.equal(rows.column("data_region"), region))
        first = _next_offset(root, topic)
        writer.write(
            rows,
            table=table,
            region=region,
            topic=topic,
            partition=1,
            first_offset=first,
            last_offset=first + rows.num_rows - 1,
        )
    writer.commit([], datetime.now(UTC))
    return {"outcomes": outcomes.num_rows, "decisions": decisions.num_rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("n", type=int)
    p.add_argument("--signing-key", type=Path, required=True)
    a = p.parse_args()
    if not any(mark in a.root.name for mark in ("-copy", "-routed")):
        raise SystemExit(f"{a.root} does not look like a copy (no -copy or -routed in its name): refused")
    key = load_pem_private_key(a.signing_key.read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SystemExit(f"{a.signing_key} is not an Ed25519 private key")
    print(append_tail(a.root, a.n, key))


if __name__ == "__main__":
    main()
