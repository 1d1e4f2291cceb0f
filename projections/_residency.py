"""Sealed residency partials: the residency summary of the compacted files, counted at compaction.

The residency summary joins every call (dispatch, attempt, outcome) with its decision: about 0.3 s
of CPU per million events, 15 s at 10 M decisions. ``evidence compact`` counts it once over every
file in force after it and writes the counts as a small Parquet file,
``_index/residency-<ledger size>.parquet``, whose footer lists the files it covers. The compaction
entry names it (``residency``: path, sha256, rows, files), so the signed chain covers its bytes;
``verify`` checks them (``residency_altered``, ``residency_invalid``, ``residency_missing``).

The summary then is the sealed counts plus the calls of the files flushed since (the tail), joined
with every decision, re-aggregated: the same rows as the full query. That holds because an old
call's finding depends on its decisions only, and the old decisions are sealed with it. The one case
it does not cover is a decision in the tail for a request with a call in the covered files (a
decision flushed after its call, across a compaction): then, and whenever the sealed file is not
the one the ledger sealed, or covers a file no longer in force, the summary is the full query.
The counts are read only after their sha256 matches (the file is a few kilobytes), so a file altered
on disk changes no answer: it only costs the full query, and ``verify`` names it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from nexuscore.projections._manifest import names_sealed_file
from nexuscore.projections._partials import read_sealed, write_sealed

PARTIALS_DIR = "_index"
PARTIALS_PATH = re.compile(r"_index/residency-\d{12}\.parquet")
FILES_KEY = b"nexuscore.residency.files"
# The requests whose covered calls had no decision in the covered files, as [tenant, request id]
# pairs (null: more than MAX_ORPHANS). A decision of one of them in the tail changes those calls'
# finding; listing them spares the summary a scan of every covered call to find out.
ORPHANS_KEY = b"nexuscore.residency.orphans"
MAX_ORPHANS = 10_000
# The tables the residency summary reads: the calls, and the decisions they are checked against.
CALL_TABLES = ("attempts", "outcomes", "dispatches")
RESIDENCY_TABLES = (*CALL_TABLES, "decisions")
Entry = dict[str, Any]


def current_partials(entries: list[Entry]) -> Entry | None:
    """The partials the last compaction names (None when it names none, or a malformed entry:
    then the summary is the full query, and ``verify`` names the entry)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction":
            partials = e.get("residency")
            return partials if well_formed(partials) else None
    return None


def well_formed(partials: object) -> bool:
    """Does an entry's ``residency`` name a file of the store's own, with a sha256?"""
    return names_sealed_file(partials, PARTIALS_PATH)


def covered_paths(files: list[Entry]) -> list[str]:
    """The paths of ``files`` the partials of them cover: the residency tables' files, sorted."""
    return sorted(str(e["path"]) for e in files if e.get("table") in RESIDENCY_TABLES)


def write_partials(root: Path, files: list[Entry], seq: int) -> Entry:
    """Count the residency summary of ``files`` (those in force once the compaction commits) and
    write it; the ``residency`` field of the compaction's entry."""
    from nexuscore.projections._store import RESIDENCY_ORPHANS_SQL, EvidenceStore

    paths = covered_paths(files)
    with EvidenceStore(root, files=[e for e in files if e["path"] in set(paths)]) as store:
        summary = store.full_residency_summary()
        orphans: list[list[str]] | None = []
        if "no_decision" in summary.column("finding").to_pylist():
            found = store.query(RESIDENCY_ORPHANS_SQL + f" LIMIT {MAX_ORPHANS + 1}")
            keys = zip(
                found.column("tenant_id").to_pylist(), found.column("request_id").to_pylist(), strict=True
            )
            orphans = [list(k) for k in keys] if found.num_rows <= MAX_ORPHANS else None
    relative = f"{PARTIALS_DIR}/residency-{seq:012d}.parquet"
    metadata = {FILES_KEY: json.dumps(paths).encode(), ORPHANS_KEY: json.dumps(orphans).encode()}
    return {**write_sealed(root, relative, summary, metadata), "files": len(paths)}


@dataclass(frozen=True)
class Sealed:
    counts: pa.Table  # the summary of the covered files
    covered: list[str]  # their paths
    orphans: pa.Table | None  # tenant_id, request_id of covered calls without a decision (None: too many)


def read_partials(root: Path, partials: Entry) -> Sealed | None:
    """The partials, if the file holds the bytes the ledger sealed and reads as partials; else None."""
    if not well_formed(partials):
        return None
    table = read_sealed(root, partials)
    if table is None:
        return None
    try:
        metadata = table.schema.metadata or {}
        paths, orphans = json.loads(metadata[FILES_KEY]), json.loads(metadata[ORPHANS_KEY])
        keys = (
            None
            if orphans is None
            else pa.table(
                {"tenant_id": [k[0] for k in orphans], "request_id": [k[1] for k in orphans]},
                schema=pa.schema([("tenant_id", pa.string()), ("request_id", pa.string())]),
            )
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError, pa.ArrowException):
        return None
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        return None
    return Sealed(table.replace_schema_metadata(None), paths, keys)


def trusted(root: Path, partials: Entry | None, files: list[Entry]) -> bool:
    """Are ``partials`` sealed, intact, and the counts of exactly the residency files of ``files``?"""
    read = read_partials(root, partials) if partials is not None else None
    return read is not None and read.covered == covered_paths(files)
