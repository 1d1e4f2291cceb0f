"""``nexuscore evidence verify``: completeness and integrity of the evidence store, from scratch.

It trusts nothing but the public key it is given. It re-hashes the manifest chain and checks the
signed head; recomputes every file's sha256 and the Merkle root of its rows; checks that every row
sits in the file its entry describes; that the checkpoints cover every offset of every partition;
and that the events make sense together (one terminal state per request, decisions of known
requests under known policies, outcomes of dispatched decisions, no event twice). Each problem is
a ``Finding`` that names where it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nexuscore import _signing
from nexuscore.projections import _merkle, _seal
from nexuscore.projections._manifest import (
    GENESIS,
    HEAD,
    canonical,
    committed,
    head_message,
    read_head,
    read_lines,
)
from nexuscore.projections._store import EvidenceStore, sql_list
from nexuscore.projections._tables import SCHEMAS

SHOW = 20  # ids named per finding before "and N more"


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str
    detail: str
    fatal: bool = True


@dataclass
class VerifyReport:
    findings: list[Finding] = field(default_factory=list)
    entries: int = 0
    signed_entries: int = 0
    files: int = 0
    rows: int = 0
    partitions: int = 0
    requests: int = 0
    head: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.findings)

    def add(self, kind: str, where: str, detail: str, *, fatal: bool = True) -> None:
        self.findings.append(Finding(kind, where, detail, fatal))


def verify(
    root: Path,
    public_key: Ed25519PublicKey,
    known_digests: set[str],
    *,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
) -> VerifyReport:
    started = time.perf_counter()
    report = VerifyReport()
    entries = _check_manifest(root, public_key, report)
    files = committed(entries)
    report.files = len(files)
    readable = _check_files(root, files, report, progress, workers or os.cpu_count() or 1)
    _check_placement(root, readable, report)
    _check_coverage(entries, report)
    _check_events(root, readable, known_digests, until, report)
    report.seconds = time.perf_counter() - started
    return report


def _check_manifest(root: Path, public_key: Ed25519PublicKey, report: VerifyReport) -> list[dict[str, Any]]:
    lines = read_lines(root)
    head = read_head(root)
    report.entries = len(lines)
    entries: list[dict[str, Any]] = []
    leaves: list[bytes] = []
    prev = GENESIS
    for i, line in enumerate(lines):
        where = f"manifest entry {i}"
        try:
            entry = json.loads(line)
        except ValueError:
            report.add("manifest_broken", where, "is not JSON; the ledger cannot be read past it")
            break
        if canonical(entry) != line:
            report.add("manifest_altered", where, "is not in canonical form (edited by hand?)")
        if entry.get("seq") != i:
            report.add("manifest_altered", where, f"carries sequence number {entry.get('seq')}")
        if entry.get("prev") != prev:
            report.add(
                "chain_broken",
                where,
                f"names {str(entry.get('prev'))[:16]}… as the previous entry's hash; it is {prev[:16]}… "
                "(an entry was changed, removed or reordered)",
            )
        prev = hashlib.sha256(line).hexdigest()
        leaves.append(_merkle.leaf_hash(line))
        entries.append(entry)
    if head is None:
        if lines:
            report.add("head_missing", HEAD, "no signed head: nothing in the manifest is signed")
        return []
    report.head = head
    size = head.get("size", -1)
    if not _signing.verify(public_key, head_message(head), str(head.get("signature", ""))):
        report.add(
            "head_signature",
            HEAD,
            f"signature does not verify with the trusted key {_signing.key_id(public_key)} "
            f"(head names key {head.get('key_id')})",
        )
    if not isinstance(size, int) or size > len(entries) or size < 0:
        report.add("head_mismatch", HEAD, f"signs {size} entries; the manifest has {len(entries)} readable")
        return []
    if _merkle.root(leaves[:size]).hex() != head.get("root"):
        report.add(
            "head_mismatch", HEAD, f"Merkle root over the first {size} entries differs from the signed root"
        )
    if size and hashlib.sha256(lines[size - 1]).hexdigest() != head.get("last"):
        report.add("head_mismatch", HEAD, f"entry {size - 1} does not hash to the signed last entry")
    if size < len(entries):
        report.add(
            "unsigned_entries",
            f"manifest entries {size}..{len(entries) - 1}",
            "follow the signed head and are ignored (a flush in progress, or appended by someone else)",
            fatal=False,
        )
    report.signed_entries = size
    return entries[:size]


def _check_files(
    root: Path,
    files: list[dict[str, Any]],
    report: VerifyReport,
    progress: Callable[[int, int], None] | None,
    workers: int,
) -> list[dict[str, Any]]:
    """sha256 and Merkle root of every file; returns the entries whose files are intact."""
    total = sum(e["rows"] for e in files)
    intact: list[dict[str, Any]] = []
    listed = set()
    jobs = []
    for e in files:
        listed.add(e["path"])
        path = root / e["path"]
        expected_prefix = f"region={e['region']}/{e['table']}/"
        if not e["path"].startswith(expected_prefix) or e["table"] not in SCHEMAS:
            report.add("file_misplaced", e["path"], f"entry says table {e['table']}, region {e['region']}")
            continue
        try:
            digest = _sha256_file(path)
        except FileNotFoundError:
            report.add("file_missing", e["path"], f"{e['rows']} rows of {e['table']} are gone")
            continue
        if digest != e["sha256"]:
            report.add("file_altered", e["path"], f"sha256 is {digest[:16]}…, sealed as {e['sha256'][:16]}…")
            continue
        jobs.append(e)
    done = 0
    paths, tables = [str(root / e["path"]) for e in jobs], [e["table"] for e in jobs]
    with contextlib.ExitStack() as stack:
        if workers > 1 and len(jobs) > 1:
            # The Merkle hashing is pure-Python work: one process per core. Not forked from this
            # process: a fork copies the locks DuckDB's threads hold here, and the workers (which
            # use DuckDB too) can wait on them for ever.
            pool = ProcessPoolExecutor(
                max_workers=workers, mp_context=multiprocessing.get_context("forkserver")
            )
            results = stack.enter_context(pool).map(_seal.seal_file, paths, tables)
        else:
            results = map(_seal.seal_file, paths, tables)
        for e, (rows, merkle_root) in zip(jobs, results, strict=True):
            if rows != e["rows"]:
                report.add("rows_mismatch", e["path"], f"has {rows} rows, sealed with {e['rows']}")
            elif merkle_root != e["merkle_root"]:
                report.add("merkle_mismatch", e["path"], "rows do not hash to the sealed Merkle root")
            else:
                intact.append(e)
            report.rows += rows
            done += e["rows"]
            if progress is not None:
                progress(done, total)
    for path in root.glob("region=*/*/*.parquet"):
        relative = path.relative_to(root).as_posix()
        if relative not in listed:
            report.add(
                "unlisted_file",
                relative,
                "is in the store but in no committed manifest entry: ignored (debris of an interrupted "
                "flush until the projector restarts, or put there by someone)",
                fatal=False,
            )
    return intact


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_placement(root: Path, files: list[dict[str, Any]], report: VerifyReport) -> None:
    """Every row in the file its entry describes: topic, partition, offsets and region."""
    import duckdb

    con = duckdb.connect()
    by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in files:
        by_table[e["table"]].append(e)
    for entries in by_table.values():
        paths = {str(root / e["path"]): e for e in entries}
        sources = sql_list(list(paths))
        rows = con.execute(
            "SELECT filename, min(src_topic), max(src_topic), min(src_partition), max(src_partition), "  # noqa: S608
            "min(src_offset), max(src_offset), min(data_region), max(data_region) "
            f"FROM read_parquet({sources}, hive_partitioning = false, filename = true) GROUP BY filename"
        ).fetchall()
        for name, t1, t2, p1, p2, lo, hi, r1, r2 in rows:
            e = paths[name]
            if not (
                t1 == t2 == e["topic"] and p1 == p2 == e["partition"] and r1 == r2 == e["region"]
            ) or not (e["first_offset"] <= lo <= hi <= e["last_offset"]):
                report.add(
                    "row_misplaced",
                    e["path"],
                    f"holds rows of {t1}[{p1}]..{t2}[{p2}] offsets {lo}..{hi}, region {r1}..{r2}; sealed for "
                    f"{e['topic']}[{e['partition']}] offsets {e['first_offset']}..{e['last_offset']}, region {e['region']}",
                )
    con.close()


def _check_coverage(entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The checkpoints account for every offset of every partition, from 0, once."""
    expected: dict[tuple[str, int], int] = {}
    for e in entries:
        if e.get("kind") != "checkpoint":
            continue
        for p in e["partitions"]:
            tp = (p["topic"], p["partition"])
            at = expected.get(tp, 0)
            if p["start"] > at:
                report.add(
                    "offset_gap",
                    f"{tp[0]}[{tp[1]}]",
                    f"offsets {at}..{p['start'] - 1} are in no checkpoint (checkpoint at entry {e['seq']} starts at {p['start']})",
                )
            elif p["start"] < at:
                report.add(
                    "offset_overlap",
                    f"{tp[0]}[{tp[1]}]",
                    f"offsets {p['start']}..{at - 1} are covered twice (checkpoint at entry {e['seq']})",
                )
            expected[tp] = p["end"]
    report.partitions = len(expected)


def _ids(rows: list[tuple[Any, ...]]) -> str:
    shown = ", ".join(str(r[0]) for r in rows[:SHOW])
    return shown + (f" and {len(rows) - SHOW} more" if len(rows) > SHOW else "")


def _check_events(
    root: Path,
    files: list[dict[str, Any]],
    known_digests: set[str],
    until: datetime | None,
    report: VerifyReport,
) -> None:
    with EvidenceStore(root, files=files) as store:
        con = store.con
        report.requests = con.execute("SELECT count(DISTINCT request_id) FROM requests").fetchall()[0][0]
        checks: list[tuple[str, str, str, dict[str, Any]]] = [
            (
                "no_terminal_state",
                "requests",
                "SELECT r.request_id, r.src_topic, r.src_partition, r.src_offset FROM requests r "
                "ANTI JOIN terminal_states t USING (request_id) "
                "WHERE $until IS NULL OR r.occurred_at < $until ORDER BY r.src_partition, r.src_offset",
                {"until": until},
            ),
            (
                "multiple_terminal_states",
                "terminal_states",
                "SELECT request_id, string_agg(state, '+') FROM terminal_states GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",
                {},
            ),
            (
                "decision_without_request",
                "decisions",
                "SELECT request_id FROM decisions ANTI JOIN requests USING (request_id) ORDER BY 1",
                {},
            ),
            (
                "rejection_without_request",
                "rejections",
                "SELECT request_id FROM rejections ANTI JOIN requests USING (request_id) ORDER BY 1",
                {},
            ),
            (
                "unknown_policy",
                "decisions",
                "SELECT policy_digest, count(*) FROM decisions "
                "WHERE NOT list_contains($known, policy_digest) GROUP BY 1 ORDER BY 1",
                {"known": sorted(known_digests)},
            ),
            (
                "outcome_without_decision",
                "outcomes",
                "SELECT request_id FROM outcomes ANTI JOIN "
                "(SELECT request_id FROM decisions WHERE verdict = 'dispatch' UNION ALL "
                "SELECT request_id FROM resolutions WHERE resolution = 'dispatched') USING (request_id) ORDER BY 1",
                {},
            ),
        ]
        for table in SCHEMAS:
            if table != "requests":
                checks.append(
                    (
                        "duplicate_event",
                        table,
                        f"SELECT event_id, count(*) FROM {table} GROUP BY 1 HAVING count(*) > 1 ORDER BY 1",  # noqa: S608
                        {},
                    )
                )
        for kind, where, sql, params in checks:
            rows = con.execute(sql, params or None).fetchall()
            if rows:
                report.add(kind, where, f"{len(rows)}: {_ids(rows)}")
        resubmitted = con.execute(
            "SELECT request_id FROM requests GROUP BY 1 HAVING count(*) > 1 ORDER BY 1"
        ).fetchall()
        if resubmitted:
            report.add(
                "resubmitted_request",
                "requests",
                f"{len(resubmitted)} request ids submitted more than once (one decision each): {_ids(resubmitted)}",
                fatal=False,
            )


__all__ = ["Finding", "VerifyReport", "verify"]
