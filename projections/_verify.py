"""``nexuscore evidence verify``: completeness and integrity of the evidence store, from scratch.

It trusts nothing but the public key it is given. It re-hashes the manifest chain and checks the
signed head; recomputes every file's sha256 (and with ``deep``, the Merkle root of its rows); checks that every row
sits in the file its entry describes; that the checkpoints cover every offset of every partition;
and that the events make sense together (one terminal state per request, decisions of known
requests under known policies, outcomes of dispatched decisions, no event twice). It looks at the
whole folder (a file no manifest entry names is a finding) and at the content keys: every key the
evidence uses must be in the keystore and decrypt its content, or be named by an erasure record
signed with the trusted key. Request ids are unique per tenant only: requests are matched by
(tenant, request id). Each problem is a ``Finding`` that names where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow.parquet as pq
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from nexuscore import ledger
from nexuscore.kernel import signing
from nexuscore.kernel.errors import EvidenceError, KeyStoreError
from nexuscore.projections import _keyed
from nexuscore.projections._compact import COMPACTED
from nexuscore.projections._index import INDEX_DIR, current_index, index_files, sha256_of, well_formed
from nexuscore.projections._keys import FieldCipher, KeyStore, LocalKeyStore
from nexuscore.projections._manifest import (
    COMMITS,
    ERASURES,
    GENESIS,
    HEAD,
    MANIFEST,
    begins_with,
    canonical,
    committed,
    erasure_message,
    file_sources,
    head_message,
    read_erasures,
    read_head,
    read_lines,
)
from nexuscore.projections._prove import prove_consistency
from nexuscore.projections._residency import current_partials, read_partials
from nexuscore.projections._residency import well_formed as partials_well_formed
from nexuscore.projections._rollups import ROLLUPS, ROUTED_ROWS, Rollup, current_rows, rows_well_formed
from nexuscore.projections._rollups import current_partials as current_rollup
from nexuscore.projections._rollups import read_partials as read_rollup
from nexuscore.projections._rollups import well_formed as rollup_well_formed
from nexuscore.projections._store import TERMINAL_ROWS, EvidenceStore, sql_list
from nexuscore.projections._tables import SCHEMAS
from nexuscore.projections._verify_files import PLACEMENT, Placement, check_files

SHOW = 20  # ids named per finding before "and N more"
# DuckDB's memory for the event checks (``duckdb_limits``). The process holds more: Python and
# pyarrow (about 150 MB), and the footers of the files a scan reads, which DuckDB keeps outside
# its limit (about 280 MB at 10M decisions): 0.7 GB at peak there, against 5 GB unbounded.
DUCKDB_MEMORY = "256MB"
# What the folder may hold besides committed files: the ledger, its head, the erasure ledger, the
# projector's lock file, and the local keystore (checked through its keys, not as files).
_OWN_FILES = {MANIFEST, HEAD, ERASURES, ".projector.lock"}
_KEYS_DIR = "_keys"
# A file of a flush not yet committed (or its temporary file while it is written), by its name.
_FLUSH_FILE = re.compile(
    r"region=[^/]+/[^/]+/(?P<tmp>\.)?(?P<topic>[^/.][^/]*)-p(?P<partition>\d+)-(?P<first>\d{12})-\d{12}\.parquet"
    r"(?(tmp)\.tmp)"
)
# The file of one table and region of a flush of several partitions (``SealedWriter.write_flush``).
_FLUSH_ALL_FILE = re.compile(r"region=[^/]+/[^/]+/\.?flush-(?P<seq>\d{12})\.parquet(\.tmp)?")
_HEAD_TMP = {f".{MANIFEST}.tmp", f".{HEAD}.tmp"}  # the manifest or its head being replaced
_CONTENT = (("requests", "prompt"), ("outcomes", "response"), ("deadletters", "raw_value"))


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


def duckdb_limits(threads: int, spill: str, memory: str | None = DUCKDB_MEMORY) -> dict[str, object]:
    """DuckDB's settings for the event checks: ``memory`` at most (None: DuckDB's default, 80% of
    the machine's), spilling to the folder ``spill`` beyond it.

    Unbounded, the aggregations over every request grow with the store: about 5 GB at 10M
    decisions, and seconds of page faults to get it. No check needs the rows in the order they were
    read (each orders what it returns). The footers are read again by each query rather than
    cached: the cache counts against the limit and is not evicted.
    """
    limits: dict[str, object] = {
        "threads": threads,
        "preserve_insertion_order": False,
        "temp_directory": spill,
        "parquet_metadata_cache": False,
    }
    if memory is not None:
        limits["memory_limit"] = memory
    return limits


def verify(
    root: Path,
    public_key: Ed25519PublicKey,
    known_digests: set[str],
    *,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    workers: int | None = None,
    keystore: KeyStore | None = None,
    deep: bool = False,
    kept_heads: Sequence[object] = (),
) -> VerifyReport:
    """Check the store under ``root``; ``keystore`` holds its content keys (default: ``root/_keys``).

    ``deep`` also recomputes every row's Merkle leaf and every file's Merkle root (``_verify_files``
    says what each depth proves). ``kept_heads``: earlier signed heads kept outside the folder, which
    the ledger must still extend (the only check that sees a rollback to an earlier signed state)."""
    started = time.perf_counter()
    report = VerifyReport()
    entries = _check_manifest(root, public_key, report)
    _check_kept_heads(root, public_key, kept_heads, report)
    files = committed(entries)
    report.files = len(files)
    readable, placements = check_files(
        root, files, report, progress, workers or os.cpu_count() or 1, deep=deep
    )
    _check_folder(root, entries, files, report)
    _check_placement(root, readable, placements, report)
    _check_coverage(entries, report)
    _check_compactions(entries, report)
    _check_index(root, entries, report)
    _check_residency(root, entries, report)
    for rollup in ROLLUPS:
        _check_rollup(root, entries, rollup, report)
    _check_routed_rows(root, entries, report)
    _check_routed_keys(root, entries, report)
    keys = keystore if keystore is not None else LocalKeyStore(root / _KEYS_DIR)
    _check_erasures_sealed(root, entries, report)
    erased = _signed_erasures(root, public_key, report)
    checks = _StoredChecks(root, keys, readable, known_digests, until, erased)
    _check_stored(checks, workers or os.cpu_count() or 1, report)
    report.seconds = time.perf_counter() - started
    return report


@dataclass(frozen=True)
class _StoredChecks:
    """What the checks of the stored events and their content keys read."""

    root: Path
    keys: KeyStore
    files: list[dict[str, Any]]
    known_digests: set[str]
    until: datetime | None
    erased: set[str]


def _check_stored(checks: _StoredChecks, threads: int, report: VerifyReport) -> None:
    """The event and content key checks in DuckDB's bounded memory; should DuckDB run out of it
    all the same (an operation it cannot spill, on a store of another shape), once more unbounded
    rather than fail."""
    for memory in (DUCKDB_MEMORY, None):
        found = VerifyReport()
        try:
            with (
                tempfile.TemporaryDirectory(prefix="nexuscore-verify-") as spill,
                EvidenceStore(
                    checks.root,
                    checks.keys,
                    files=checks.files,
                    settings=duckdb_limits(threads, spill, memory),
                ) as store,
            ):
                _check_events(store, checks.known_digests, checks.until, found)
                _check_keys(store, checks.erased, found)
        except duckdb.OutOfMemoryException:
            if memory is None:
                raise
            continue
        report.findings.extend(found.findings)
        report.requests = found.requests
        return


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
        leaves.append(ledger.leaf_hash(line))
        entries.append(entry)
    if head is None:
        if lines:
            report.add("head_missing", HEAD, "no signed head: nothing in the manifest is signed")
        return []
    report.head = head
    size = head.get("size", -1)
    if not signing.verify(public_key, head_message(head), str(head.get("signature", ""))):
        report.add(
            "head_signature",
            HEAD,
            f"signature does not verify with the trusted key {signing.key_id(public_key)} "
            f"(head names key {head.get('key_id')})",
        )
    if not isinstance(size, int) or size > len(entries) or size < 0:
        report.add("head_mismatch", HEAD, f"signs {size} entries; the manifest has {len(entries)} readable")
        return []
    if ledger.root(leaves[:size]).hex() != head.get("root"):
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


def _check_folder(
    root: Path, entries: list[dict[str, Any]], files: list[dict[str, Any]], report: VerifyReport
) -> None:
    """Every file in the folder is a committed one, the store's own, or a flush still being written.

    Anything else under ``region=`` is fatal: it sits where evidence lives but is none. Elsewhere it
    is a warning (nothing reads it, but it should not be there).
    """
    listed = {e["path"] for e in files}
    current = current_index(entries)
    index = current["path"] if current is not None else None
    partials = [current_partials(entries), *(current_rollup(entries, r) for r in ROLLUPS)]
    sealed = {index, *(p["path"] for p in partials if p is not None)}
    sealed |= {e["path"] for e in (current_rows(entries) or {}).values()}
    keyed = _keyed.current(entries)
    sealed |= {e["path"] for e in _keyed.sealed_files(keyed)} if keyed is not None else set()
    named = {e.get("path") for e in entries if e.get("kind") == "file"}
    replaced = {p for e in entries if e.get("kind") == "compaction" for p in _paths(e.get("replaces"))}
    committed_end: dict[tuple[str, int], int] = {}
    last_checkpoint = -1
    for i, e in enumerate(entries):
        if e.get("kind") == "checkpoint":
            last_checkpoint = i
            for p in e["partitions"]:
                committed_end[(p["topic"], p["partition"])] = p["end"]
    for relative in _folder_files(root):
        if relative in listed or relative in _OWN_FILES or relative in sealed:
            continue
        if relative.startswith(f"{INDEX_DIR}/"):
            report.add(
                "stale_index",
                relative,
                "is a request index or partials no committed compaction names as the current "
                "one: ignored (the next `evidence compact` deletes it)",
                fatal=False,
            )
            continue
        if relative in replaced or (COMPACTED.fullmatch(relative) and relative not in named):
            report.add(
                "compacted_file",
                relative,
                "was replaced by a committed compaction, or written by one cut short: ignored (the next "
                "`evidence compact` or projector start deletes it)",
                fatal=False,
            )
        elif relative in _HEAD_TMP or _unflushed(relative, committed_end, last_checkpoint):
            report.add(
                "unflushed_file",
                relative,
                "belongs to a flush no checkpoint commits yet: ignored (a flush in progress, or debris "
                "of one cut short, which the projector deletes when it restarts)",
                fatal=False,
            )
        elif relative.startswith("region="):
            report.add(
                "unlisted_file", relative, "is among the evidence tables but in no committed manifest entry"
            )
        else:
            report.add(
                "foreign_file",
                relative,
                "is in the evidence folder but is no part of the evidence: nothing reads it",
                fatal=False,
            )


def _invalid_compaction_fields(
    entries: list[dict[str, Any]],
    field: str,
    well_formed: Callable[[Any], bool],
    report: VerifyReport,
    kind: str,
    what: str,
) -> None:
    """Name every compaction entry whose ``field`` is there but not ``well_formed``: ``kind``, saying
    it names no ``what``."""
    for e in entries:
        if e.get("kind") == "compaction" and field in e and not well_formed(e[field]):
            report.add(kind, f"manifest entry {e.get('seq')}", f"names no {what}")


def _sealed_digest(root: Path, path: str, report: VerifyReport, kind: str, instead: str) -> str | None:
    """The sha256 of a side file a compaction sealed (index, rows), or None when it cannot be read: a
    warning ``kind`` (its readers then do ``instead``: slower, never a different answer)."""
    try:
        return sha256_of(root / path)
    except OSError as exc:
        report.add(kind, path, f"cannot be read ({exc.strerror}): {instead}", fatal=False)
        return None


def _check_index(root: Path, entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The request index the last compaction sealed still holds those bytes. Lineage trusts it to
    name every row of a request in the files it covers: an index edited to leave rows out would
    hide them, and only this check (the sha256 the signed chain covers) can tell."""
    _invalid_compaction_fields(
        entries,
        "index",
        well_formed,
        report,
        "index_invalid",
        "request index of the store's own (`_index/requests-<n>.parquet` and its sha256)",
    )
    index = current_index(entries)
    if index is None:
        return
    digest = _sealed_digest(
        root,
        index["path"],
        report,
        "index_missing",
        "lineage searches every file instead (`evidence compact` writes the index again)",
    )
    if digest is None:
        return
    if digest != index["sha256"] or index_files(root, index) is None:
        report.add(
            "index_altered",
            index["path"],
            "does not hold the bytes its compaction sealed (sha256 differs): it could hide rows from lineage",
        )


def _check_residency(root: Path, entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The residency partials the last compaction sealed still hold those bytes. The summary reads
    them only when they do (else it counts every call), so an altered file changes no answer; it is
    named here because the signed chain says what the file should hold."""
    _invalid_compaction_fields(
        entries,
        "residency",
        partials_well_formed,
        report,
        "residency_invalid",
        "residency partials of the store's own (`_index/residency-<n>.parquet` and its sha256)",
    )
    partials = current_partials(entries)
    if partials is None:
        return
    if not (root / partials["path"]).is_file():
        report.add(
            "residency_missing",
            partials["path"],
            "cannot be read: the residency summary counts every call instead (`evidence compact` writes "
            "the partials again)",
            fatal=False,
        )
        return
    if read_partials(root, partials) is None:
        report.add(
            "residency_altered",
            partials["path"],
            "does not hold the bytes its compaction sealed (sha256 differs): the residency summary "
            "ignores it and counts every call",
        )


def _check_rollup(root: Path, entries: list[dict[str, Any]], rollup: Rollup, report: VerifyReport) -> None:
    """A report's partials the last compaction sealed still hold those bytes (as ``_check_residency``:
    an altered file changes no answer, the report then reads every row)."""
    name = rollup.name
    _invalid_compaction_fields(
        entries,
        name,
        lambda field: rollup_well_formed(field, rollup),
        report,
        f"{name}_invalid",
        f"{name} partials of the store's own (`_index/{name}-<n>.parquet` and its sha256)",
    )
    partials = current_rollup(entries, rollup)
    if partials is None:
        return
    if not (root / partials["path"]).is_file():
        report.add(
            f"{name}_missing",
            partials["path"],
            "cannot be read: the report reads every row instead (`evidence compact` writes the partials again)",
            fatal=False,
        )
        return
    if read_rollup(root, partials, rollup) is None:
        report.add(
            f"{name}_altered",
            partials["path"],
            "does not hold the bytes its compaction sealed (sha256 differs): the report ignores it and "
            "reads every row",
        )


def _check_routed_rows(root: Path, entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The routed rows files the last compaction sealed still hold those bytes (as ``_check_rollup``:
    the report reads a file only when its sha256 matches, else counts those days from the tables)."""
    _invalid_compaction_fields(
        entries,
        ROUTED_ROWS,
        rows_well_formed,
        report,
        "routed_rows_invalid",
        "routed rows of the store's own (`_index/routed-rows-<n>-<day>.parquet`, one per day, each "
        "with its sha256)",
    )
    for sealed in (current_rows(entries) or {}).values():
        digest = _sealed_digest(
            root,
            sealed["path"],
            report,
            "routed_rows_missing",
            "who-routed-what counts that day's partial windows from the tables instead (`evidence "
            "compact` writes the rows again)",
        )
        if digest is None:
            continue
        if digest != sealed["sha256"]:
            report.add(
                "routed_rows_altered",
                sealed["path"],
                "does not hold the bytes its compaction sealed (sha256 differs): who-routed-what ignores "
                "it and counts that day's partial windows from the tables",
            )


def _check_routed_keys(root: Path, entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The routed keys the last compaction sealed still hold those bytes (a report checks each block
    it reads against the fences and reads the tables when one differs: slower, not wrong)."""
    _invalid_compaction_fields(
        entries,
        _keyed.FIELD,
        _keyed.well_formed,
        report,
        "routed_keys_invalid",
        "routed keys of the store's own (`_index/routed-keys-<n>-<table>.{bin,parquet}` per table, each "
        "with its sha256)",
    )
    field = _keyed.current(entries)
    for sealed in _keyed.sealed_files(field) if field is not None else []:
        instead = "who-routed-what finds a tail's covered rows by scanning the tables (`evidence compact` writes the keys again)"
        digest = _sealed_digest(root, sealed["path"], report, "routed_keys_missing", instead)
        if digest is not None and digest != sealed["sha256"]:
            report.add(
                "routed_keys_altered",
                sealed["path"],
                "does not hold the bytes its compaction sealed (sha256 differs): who-routed-what ignores "
                "it and finds a tail's covered rows by scanning the tables",
            )


def _check_kept_heads(
    root: Path, public_key: Ed25519PublicKey, kept: Sequence[object], report: VerifyReport
) -> None:
    """Each head kept outside the folder (an earlier ``manifest.head.json``) is signed by the trusted
    key, and the ledger only grew since it: else someone put an older signed state back (a head,
    the ledger cut to it, the later files deleted), which nothing inside the folder can show."""
    for i, head in enumerate(kept, start=1):
        where = f"kept head {i}"
        if not isinstance(head, dict) or not signing.verify(
            public_key, head_message(head), str(head.get("signature", ""))
        ):
            report.add(
                "kept_head_invalid", where, "is not a head signed by the trusted key: it proves nothing"
            )
            continue
        try:
            prove_consistency(root, head)
        except EvidenceError as exc:
            report.add(
                "rolled_back",
                where,
                f"signed at {head.get('signed_at')} over {head.get('size')} entries, is not a prefix of "
                f"this ledger: {exc}",
            )


def _paths(value: object) -> list[str]:
    return [str(p) for p in value] if isinstance(value, list) else []


def _check_compactions(entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """Each compaction kept every row: per table, region, topic and partition, its new files hold
    as many rows as the files it replaced (which must have been in force when it ran)."""
    live: dict[str, dict[str, Any]] = {}
    staged: list[dict[str, Any]] = []
    for e in entries:
        kind = e.get("kind")
        if kind == "file":
            staged.append(e)
        elif kind in ("checkpoint", "compaction"):
            if kind == "compaction":
                _check_compaction(e, live, staged, report)
            live.update((str(f.get("path")), f) for f in staged)
            staged = []


def _check_compaction(
    e: dict[str, Any], live: dict[str, dict[str, Any]], new: list[dict[str, Any]], report: VerifyReport
) -> None:
    where = f"manifest entry {e.get('seq')}"
    before: Counter[tuple[Any, ...]] = Counter()
    for path in _paths(e.get("replaces")):
        old = live.pop(path, None)
        if old is None:
            report.add("compaction_invalid", where, f"replaces {path}, which was not in force")
            return
        for group, rows in _groups(old):
            before[group] += rows
    after: Counter[tuple[Any, ...]] = Counter()
    for f in new:
        for group, rows in _groups(f):
            after[group] += rows
    if before != after or sorted(_paths(e.get("files"))) != sorted(str(f.get("path")) for f in new):
        report.add(
            "compaction_rows",
            where,
            f"its new files do not hold the rows of the files it replaced ({sum(before.values())} rows "
            f"replaced, {sum(after.values())} written)",
        )


def _groups(e: dict[str, Any]) -> list[tuple[tuple[str, ...], int]]:
    """Per (table, region, topic, partition) of a file's rows: how many (``file_sources``)."""
    return [
        ((str(e.get("table")), str(e.get("region")), str(s.get("topic")), str(s.get("partition"))), _rows(s))
        for s in file_sources(e)
    ]


def _rows(e: dict[str, Any]) -> int:
    rows = e.get("rows")
    return rows if isinstance(rows, int) else -1


def _unflushed(relative: str, committed_end: dict[tuple[str, int], int], last_checkpoint: int) -> bool:
    """Is this the file of a flush after the last checkpoint (of its partition, for a file of one
    partition, of a topic the ledger knows)? Only what the projector itself could be writing now,
    or left when cut short: a flush's file is named by the ledger's size when the flush began."""
    flush_of_all = _FLUSH_ALL_FILE.fullmatch(relative)
    if flush_of_all is not None:
        return int(flush_of_all["seq"]) > last_checkpoint
    flush = _FLUSH_FILE.fullmatch(relative)
    if flush is None or flush["topic"] not in {topic for topic, _ in committed_end}:
        return False
    return int(flush["first"]) >= committed_end.get((flush["topic"], int(flush["partition"])), 0)


def _folder_files(root: Path) -> list[str]:
    """Every entry of the folder that is not a directory (symbolic links to directories included),
    as paths relative to ``root``; the keystore folder is left out."""
    found: list[str] = []
    for directory, dirs, names in os.walk(root):
        here = Path(directory).relative_to(root)
        if here == Path("."):
            dirs[:] = [d for d in dirs if d != _KEYS_DIR]
        found.extend((here / d).as_posix() for d in dirs if os.path.islink(os.path.join(directory, d)))
        found.extend((here / n).as_posix() for n in names)
    return sorted(found)


def _check_placement(
    root: Path, files: list[dict[str, Any]], placements: dict[str, Placement], report: VerifyReport
) -> None:
    """Every row in the file its entry describes: topic, partition, offsets and region, and for a file
    of several partitions, as many rows of each as its entry says. From the footer's statistics where
    they place every row group (``check_files`` found them for a file of one partition; a flush gives
    each partition its own row groups), else (and in deep mode) from the rows."""
    by_table: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in files:
        placement = placements.get(e["path"])
        if "sources" in e:
            groups = _footer_groups(root / e["path"]) if e["path"] in placements else None
            if groups is None:
                by_table[e["table"]].append(e)
            else:
                _judge_sources(e, groups, report)
        elif placement is None:
            by_table[e["table"]].append(e)
        else:
            _judge_placement(e, placement, report)
    if not by_table:
        return
    con = duckdb.connect()
    try:
        for entries in by_table.values():
            paths = {str(root / e["path"]): e for e in entries}
            rows = con.execute(
                "SELECT filename, src_topic, src_partition, min(src_offset), max(src_offset), "  # noqa: S608
                "min(data_region), max(data_region), count(*) "
                f"FROM read_parquet({sql_list(list(paths))}, hive_partitioning = false, filename = true) "
                "GROUP BY ALL"
            ).fetchall()
            found: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
            for row in rows:
                found[row[0]].append(tuple(row[1:]))
            for path, e in paths.items():
                if "sources" in e:
                    _judge_sources(e, found[path], report)
                elif found[path]:
                    _judge_placement(e, _overall(found[path]), report)
    finally:
        con.close()


def _overall(groups: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """(min, max) of topic, partition, offset and region over (topic, partition, lo, hi, region
    min, region max, rows) groups: a file of one partition's placement."""
    t, p, lo, hi, r1, r2, _ = zip(*groups, strict=True)
    return min(t), max(t), min(p), max(p), min(lo), max(hi), min(r1), max(r2)


def _footer_groups(path: Path) -> list[tuple[Any, ...]] | None:
    """(topic, partition, lowest offset, highest offset, region min, region max, rows) of each row
    group, from the footer's statistics; None when a group lacks them or holds several partitions."""
    try:
        metadata = pq.read_metadata(path)
        groups = []
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            stats = {}
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema in PLACEMENT:
                    stats[column.path_in_schema] = column.statistics
            if any(st is None or not st.has_min_max or st.null_count for st in stats.values()):
                return None
            topic, partition, offset, region = (stats[name] for name in PLACEMENT)
            if topic.min != topic.max or partition.min != partition.max:
                return None
            groups.append(
                (topic.min, partition.min, offset.min, offset.max, region.min, region.max, group.num_rows)
            )
    except (KeyError, TypeError, ValueError, OSError):
        return None
    return groups


def _judge_sources(e: dict[str, Any], groups: list[tuple[Any, ...]], report: VerifyReport) -> None:
    """A file of several partitions: its rows of each partition lie within that partition's offsets
    in its entry's ``sources`` and number what the entry says; every row in the entry's region."""
    claimed = {_tp(s): s for s in file_sources(e)}
    held: dict[tuple[Any, Any], list[Any]] = {}
    for topic, partition, lo, hi, r1, r2, rows in groups:
        at = held.setdefault((topic, partition), [lo, hi, 0])
        at[0], at[1], at[2] = min(at[0], lo), max(at[1], hi), at[2] + rows
        if not r1 == r2 == e["region"]:
            report.add(
                "row_misplaced", e["path"], f"holds rows of region {r1}..{r2}; sealed for {e['region']}"
            )
            return
    for (topic, partition), (lo, hi, rows) in sorted(held.items()):
        s = claimed.get((topic, partition))
        if s is None or not (_int(s.get("first_offset")) <= lo <= hi <= _int(s.get("last_offset"))):
            sealed = (
                "no rows of it" if s is None else f"offsets {s.get('first_offset')}..{s.get('last_offset')}"
            )
            report.add(
                "row_misplaced",
                e["path"],
                f"holds rows of {topic}[{partition}] offsets {lo}..{hi}; sealed with {sealed}",
            )
        elif rows != s.get("rows"):
            report.add(
                "rows_mismatch",
                e["path"],
                f"has {rows} rows of {topic}[{partition}], sealed with {s.get('rows')}",
            )
    for (topic, partition), s in claimed.items():
        if (topic, partition) not in held and s.get("rows") != 0:
            report.add(
                "rows_mismatch",
                e["path"],
                f"has no rows of {topic}[{partition}], sealed with {s.get('rows')}",
            )


def _tp(source: dict[str, Any]) -> tuple[Any, Any]:
    """(topic, partition) of a source, hashable whatever a hostile entry holds there."""
    topic, partition = source.get("topic"), source.get("partition")
    return (
        topic if isinstance(topic, str) else repr(topic),
        partition if isinstance(partition, int) else repr(partition),
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) else -1


def _judge_placement(e: dict[str, Any], placement: tuple[Any, ...], report: VerifyReport) -> None:
    t1, t2, p1, p2, lo, hi, r1, r2 = placement
    if not (t1 == t2 == e["topic"] and p1 == p2 == e["partition"] and r1 == r2 == e["region"]) or not (
        e["first_offset"] <= lo <= hi <= e["last_offset"]
    ):
        report.add(
            "row_misplaced",
            e["path"],
            f"holds rows of {t1}[{p1}]..{t2}[{p2}] offsets {lo}..{hi}, region {r1}..{r2}; sealed for "
            f"{e['topic']}[{e['partition']}] offsets {e['first_offset']}..{e['last_offset']}, region {e['region']}",
        )


def _check_coverage(entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The checkpoints account for every offset of every partition, from 0, once; and the committed
    files hold, of each partition, as many rows as its checkpoints say were projected (events less
    duplicates dropped: one row an event), where they say so (projectors since files held several
    partitions always do)."""
    expected: dict[tuple[str, int], int] = {}
    projected: dict[tuple[str, int], int | None] = {}
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
            events, duplicates = p.get("events"), p.get("duplicates")
            counted = projected.get(tp, 0)
            if counted is None or not (isinstance(events, int) and isinstance(duplicates, int)):
                projected[tp] = None  # a checkpoint without the counts: rows not checked
            else:
                projected[tp] = counted + events - duplicates
    report.partitions = len(expected)
    _check_rows_per_partition(entries, projected, report)


def _check_rows_per_partition(
    entries: list[dict[str, Any]], projected: dict[tuple[str, int], int | None], report: VerifyReport
) -> None:
    """Rows of a partition missing from, or doubled in, the files (their entries' row counts)."""
    held: Counter[tuple[Any, Any]] = Counter()
    for e in committed(entries):
        for s in file_sources(e):
            held[_tp(s)] += _rows(s)
    for tp in sorted(set(projected) | set(held), key=str):
        want = projected.get(tp, 0)
        if want is None or held[tp] == want:
            continue
        kind = "rows_missing" if held[tp] < want else "rows_duplicated"
        report.add(
            kind,
            f"{tp[0]}[{tp[1]}]",
            f"the committed files hold {held[tp]} rows of it; its checkpoints projected {want} events",
        )


def _ids(rows: list[tuple[Any, ...]]) -> str:
    shown = ", ".join(str(r[0]) for r in rows[:SHOW])
    return shown + (f" and {len(rows) - SHOW} more" if len(rows) > SHOW else "")


def _check_events(
    store: EvidenceStore, known_digests: set[str], until: datetime | None, report: VerifyReport
) -> None:
    con = store.con
    # Policies promoted through governance are known too: their documents are in the evidence.
    known = known_digests | {
        r[0] for r in con.execute("SELECT DISTINCT policy_digest FROM policy_events").fetchall()
    }
    orphans = _check_requests(store, until, report)
    unknown = con.execute(
        "SELECT policy_digest, count(*) FROM decisions "
        "WHERE NOT list_contains($known, policy_digest) GROUP BY 1 ORDER BY 1",
        {"known": sorted(known)},
    ).fetchall()
    if unknown:
        report.add("unknown_policy", "decisions", f"{len(unknown)}: {_ids(unknown)}")
    if orphans:
        report.add("outcome_without_decision", "outcomes", f"{len(orphans)}: {_ids(orphans)}")
    for table in SCHEMAS:
        if table != "requests":
            rows = _duplicates(con, table)
            if rows:
                report.add("duplicate_event", table, f"{len(rows)}: {_ids(rows)}")


def _duplicates(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[Any, ...]]:
    """(``tenant/event id``, count) of each event of ``table`` stored more than once.

    Events are grouped by a 64-bit hash of (tenant, event id) first: equal ids hash alike, so every
    duplicate is among the hashes seen twice, and only the rows of those (a duplicate, or two ids
    whose hashes collide: rare) are grouped by the ids themselves. Grouping 8-byte hashes rather
    than two strings takes less memory, and less CPU (measured, ``bench/results/verify-*.md``).
    """
    twice = con.execute(
        f"SELECT h FROM (SELECT hash(tenant_id, event_id) AS h FROM {table}) "  # noqa: S608
        "GROUP BY h HAVING count(*) > 1"
    ).fetchall()
    if not twice:
        return []
    return con.execute(
        f"SELECT tenant_id || '/' || event_id, count(*) FROM {table} "  # noqa: S608
        "WHERE hash(tenant_id, event_id) IN (SELECT unnest($twice::UBIGINT[])) "
        "GROUP BY tenant_id, event_id HAVING count(*) > 1 ORDER BY 1",
        {"twice": [h for (h,) in twice]},
    ).fetchall()


# One pass over every request-keyed table counts, per (tenant, request id), its requests, terminal
# states, decisions and rejections, and keeps only the keys that are not exactly one request with
# exactly one terminal state, or has an outcome but was never dispatched (by a decision, or by a
# review that resumed it): one hash aggregation instead of six joins and groupings (measured 2 to
# 3 times faster), and the handful of keys it returns are judged here. The tables are read by
# one scan of all their files (each row's table is its file's, by position in the list): DuckDB
# runs the branches of a UNION ALL side by side, each with hash tables of its own, and ran out of
# any bounded memory at 10M decisions (``duckdb_limits``); one scan feeds one aggregation, which
# spills. Its terminal states are those of the ``terminal_states`` view (``TERMINAL_ROWS``).
_REQUEST_TABLES = ("requests", "outcomes", "rejections", "decisions", "resolutions")
_ODD_REQUESTS_SQL = """
SELECT tenant_id, request_id,
       count(*) FILTER (WHERE {requests}) AS requests,
       count(*) FILTER (WHERE {requests} AND ($until IS NULL OR {occurred_at} < $until)) AS requests_due,
       count(*) FILTER (WHERE {terminal}) AS terminal,
       count(*) FILTER (WHERE {decisions}) AS decisions,
       count(*) FILTER (WHERE {rejections}) AS rejections,
       count(*) FILTER (WHERE {outcomes}) AS outcomes,
       count(*) FILTER (
           WHERE ({decisions} AND {verdict} = 'dispatch') OR ({resolutions} AND {resolution} = 'dispatched')
       ) AS dispatched
FROM {source}
GROUP BY tenant_id, request_id
HAVING requests <> 1 OR terminal <> 1 OR (outcomes > 0 AND dispatched = 0)
ORDER BY tenant_id, request_id
""".replace(
    "{terminal}",  # each table's terminal rows as the view has them: a table's rows, its column so
    " OR ".join(
        f"{{{table}}}" if rule is None else f"({{{table}}} AND {{{rule[0]}}} {rule[1]})"
        for table, rule in TERMINAL_ROWS.items()
    ),
)
_REQUEST_FINDINGS = {  # finding: (the table it is about, whether it is fatal)
    "no_terminal_state": ("requests", True),
    "multiple_terminal_states": ("terminal_states", True),
    "decision_without_request": ("decisions", True),
    "rejection_without_request": ("rejections", True),
    "resubmitted_request": ("requests", False),
}


def _odd_requests(store: EvidenceStore, until: datetime | None) -> list[tuple[Any, ...]]:
    """(tenant, request id, requests, requests due, terminal states, decisions, rejections) of
    every request id that is not one request with one terminal state (``_ODD_REQUESTS_SQL``)."""
    files: list[str] = []
    where: dict[str, str] = {}
    for table in _REQUEST_TABLES:
        paths = store.table_paths(table)
        where[table] = f"(file_index BETWEEN {len(files)} AND {len(files) + len(paths) - 1})"
        files.extend(paths)
    if not files:
        return []
    source = f"read_parquet({sql_list(files)}, hive_partitioning = false, union_by_name = true)"
    present = _columns(store, source)
    # (A column no file has, as in a store of one table only, is NULL: no row matches it.)
    columns = {c: c if c in present else "NULL" for c in ("occurred_at", "verdict", "resolution")}
    sql = _ODD_REQUESTS_SQL.format(source=source, **where, **columns)
    return store.con.execute(sql, {"until": until}).fetchall()


def _check_requests(store: EvidenceStore, until: datetime | None, report: VerifyReport) -> list[tuple[str]]:
    """Judge the odd request ids; return the outcomes of requests never dispatched (``tenant/id``
    once per outcome), which ``_check_events`` names after the unknown policies."""
    odd = _odd_requests(store, until)
    rows = store.con.execute("SELECT count(*) FROM requests").fetchall()[0][0]
    # Distinct requests: every row, less the second and later rows of a resubmitted id.
    report.requests = rows - sum(r[2] - 1 for r in odd if r[2] > 1)
    found: dict[str, list[tuple[str]]] = defaultdict(list)
    orphans: list[tuple[str]] = []
    for tenant, request, requests, due, terminal, decisions, rejections, outcomes, dispatched in odd:
        key = (f"{tenant}/{request}",)
        if outcomes and not dispatched:
            orphans.extend([key] * outcomes)
        for kind, wrong in (
            ("no_terminal_state", due and not terminal),
            ("multiple_terminal_states", terminal > 1),
            ("decision_without_request", decisions and not requests),
            ("rejection_without_request", rejections and not requests),
            ("resubmitted_request", requests > 1),
        ):
            if wrong:
                found[kind].append(key)
    for kind, (table, fatal) in _REQUEST_FINDINGS.items():
        ids = found[kind]
        if ids:
            what = " request ids submitted more than once (one decision each)" if not fatal else ""
            report.add(kind, table, f"{len(ids)}{what}: {_ids(ids)}", fatal=fatal)
    return sorted(orphans)


def _check_erasures_sealed(root: Path, entries: list[dict[str, Any]], report: VerifyReport) -> None:
    """The erasure ledger still begins with the records every commit sealed: deleted, cut or
    changed, with a keystore from before an erasure put back, erased content would be readable
    again and nothing else would show it."""
    seals = {
        canonical(e["erasures"]): e["erasures"]
        for e in entries
        if e.get("kind") in COMMITS and "erasures" in e
    }
    if not seals:
        return  # nothing was erased when the last commit was sealed
    try:
        lines = read_erasures(root)
    except EvidenceError as exc:
        report.add("erasures_altered", ERASURES, str(exc))
        return
    broken = [seal for seal in seals.values() if not isinstance(seal, dict) or not begins_with(lines, seal)]
    if broken:
        counts = sorted({str(seal.get("lines")) if isinstance(seal, dict) else "?" for seal in broken})
        report.add(
            "erasures_altered",
            ERASURES,
            f"does not begin with the erasure records the ledger sealed ({', '.join(counts)} of them: "
            "deleted, cut or changed): content they erased may be readable again",
        )


def _signed_erasures(root: Path, public_key: Ed25519PublicKey, report: VerifyReport) -> set[str]:
    """The content key ids that erasure records signed with the trusted key say were destroyed."""
    erased: set[str] = set()
    for i, line in enumerate(read_erasures(root)):
        try:
            record = json.loads(line)
            signed = signing.verify(public_key, erasure_message(record), str(record.get("signature", "")))
        except (ValueError, AttributeError):
            signed = False
        if not signed:
            report.add(
                "erasure_forged",
                f"{ERASURES} line {i}",
                f"is not an erasure record signed with the trusted key {signing.key_id(public_key)}: "
                "the keys it names are not taken as erased",
            )
            continue
        erased.update(str(k) for k in record.get("key_ids", []))
    return erased


def _check_keys(store: EvidenceStore, erased: set[str], report: VerifyReport) -> None:
    """Each content key the evidence uses decrypts one of its rows, or a signed record erased it."""
    cipher = FieldCipher(store.keystore)
    missing: list[tuple[str]] = []
    broken: list[tuple[str]] = []
    lingering: list[tuple[str]] = []
    why = ""
    for key_id, (event_id, column, blob) in sorted(_key_samples(store).items()):
        try:
            text = cipher.decrypt(key_id, event_id, column, blob)
        except KeyStoreError as exc:
            broken.append((key_id,))
            why = why or str(exc)
            continue
        if text is None and key_id not in erased:
            missing.append((key_id,))
        elif text is not None and key_id in erased:
            lingering.append((key_id,))
    if missing:
        report.add(
            "key_missing",
            "keystore",
            f"{len(missing)} content keys the evidence uses are neither in the keystore nor named by a "
            f"signed erasure record (keystore replaced or keys removed other than by `evidence erase`): {_ids(missing)}",
        )
    if broken:
        report.add(
            "key_unusable",
            "keystore",
            f"{len(broken)} content keys do not decrypt their content ({why}): {_ids(broken)}",
        )
    if lingering:
        report.add(
            "erasure_incomplete",
            "keystore",
            f"{len(lingering)} content keys recorded as erased are still in the keystore "
            f"(an erasure cut short: run it again): {_ids(lingering)}",
            fatal=False,
        )


def _key_samples(store: EvidenceStore) -> dict[str, tuple[str, str, bytes]]:
    """One encrypted value per content key id: key id -> (event id, column, ciphertext).

    The first row of each key (by file and row number) is found from the key column alone, then
    only those rows' content is read: content is most of the store's bytes.
    """
    samples: dict[str, tuple[str, str, bytes]] = {}
    for table, column in _CONTENT:
        paths = store.table_paths(table)
        key = f"{column}_key"
        source = (
            f"read_parquet({sql_list(paths)}, hive_partitioning = false, union_by_name = true, "
            "file_row_number = true)"
        )
        # (Files older than the content keys have no key column: none of their rows uses a key.)
        if not paths or not {key, column, "event_id"} <= _columns(store, source):
            continue
        firsts = store.con.execute(
            f"SELECT {key}, min(file_index), arg_min(file_row_number, file_index) FROM ("  # noqa: S608
            f"SELECT {key}, file_index, min(file_row_number) AS file_row_number FROM {source} "
            f"WHERE {key} <> '' GROUP BY ALL) GROUP BY 1"
        ).fetchall()
        # Only the files that hold a first row (a few: keys are in use from the start), and in
        # them, a list of constants, not a parameter: DuckDB then skips the row groups holding none.
        holding = sorted({i for _, i, _ in firsts})
        position = {i: n for n, i in enumerate(holding)}
        wanted = {(position[i], r): k for k, i, r in firsts}
        if not wanted:
            continue
        numbers = ", ".join(str(int(r)) for r in sorted({r for _, r in wanted}))
        rows = store.con.execute(
            f"SELECT file_index, file_row_number, event_id, {column} "  # noqa: S608
            f"FROM read_parquet({sql_list([paths[i] for i in holding])}, hive_partitioning = false, "
            f"union_by_name = true, file_row_number = true) WHERE file_row_number IN ({numbers})"
        ).fetchall()
        for i, r, event_id, blob in rows:
            k = wanted.get((i, r))
            if k is not None:
                samples[k] = (event_id, column, blob)
    return samples


def _columns(store: EvidenceStore, source: str) -> set[str]:
    return {row[0] for row in store.con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()}  # noqa: S608


__all__ = ["Finding", "VerifyReport", "verify"]
