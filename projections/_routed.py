"""Sealed who-routed-what partials: the report's counts per day of the compacted files, at compaction.

``who-routed-what`` joins every decision with its outcomes (tenant and request id): on a 10 M
decision store, a tenant's month is 3.4 M decisions against 3.3 M outcomes, about 2 s of CPU in the
hash join and the scans, whatever the files' order (sorted by tenant and request id, they prune other
tenants, not days). ``evidence compact`` counts that join once over every file in force after it,
per tenant, decision day (UTC), feature, verdict, tier, deployment, policy version and the outcome's
model and region, and writes it as ``_index/routed-<ledger size>.parquet``, whose footer lists the
files it covers. The compaction entry names it (``routed``: path, sha256, rows, files), so the signed
chain covers its bytes; ``verify`` checks them (``routed_altered``, ``routed_invalid``,
``routed_missing``).

The report then takes the whole days of its window from the partials, and joins from the rows:
the decisions of the files flushed since (the tail), those of the covered files on the window's
partial first and last days, and the covered decisions that have an outcome in the tail (their
partial count is taken off and counted again with every outcome). Row for row the full query. It is
the full query whenever the partials file is not the one the ledger sealed, covers a file no longer
in force, or counts an outcome earlier than the window starts (the report leaves those out: an
outcome timed before its decision's day, by a producer's clock). The counts are read only after
their sha256 matches, so an altered file changes no answer: it costs the full query, and ``verify``
names it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nexuscore.projections._manifest import fsync_path, names_sealed_file, replace_with

PARTIALS_DIR = "_index"
PARTIALS_PATH = re.compile(r"_index/routed-\d{12}\.parquet")
FILES_KEY = b"nexuscore.routed.files"
ROUTED_TABLES = ("decisions", "outcomes")  # the tables the report joins
Entry = dict[str, Any]

# The report's join, counted per day and per outcome model and region (the report's own groups
# without them): sums that add up, per group, to the report's, and the earliest outcome counted.
PARTIALS_SQL = """
SELECT d.tenant_id, CAST(d.occurred_at AS DATE) AS day, d.feature, d.verdict, d.tier, d.deployment_id,
       d.policy_version, o.model, o.region,
       count(*) AS requests,
       count(o.request_id) FILTER (WHERE o.status = 'answered') AS answered,
       sum(d.estimated_cost_micros) FILTER (WHERE d.verdict = 'dispatch') AS estimated_micros,
       sum(o.cost_micros) AS cost_micros,
       min(o.occurred_at) AS first_outcome_at
FROM decisions d LEFT JOIN outcomes o USING (tenant_id, request_id)
GROUP BY ALL
ORDER BY ALL
"""


def current_partials(entries: list[Entry]) -> Entry | None:
    """The partials the last compaction names (None when it names none, or a malformed entry:
    then the report is the full query, and ``verify`` names the entry)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction":
            partials = e.get("routed")
            return partials if well_formed(partials) else None
    return None


def well_formed(partials: object) -> bool:
    """Does an entry's ``routed`` name a file of the store's own, with a sha256?"""
    return names_sealed_file(partials, PARTIALS_PATH)


def covered_paths(files: list[Entry]) -> list[str]:
    """The paths of ``files`` the partials of them cover: the decisions' and outcomes' files, sorted."""
    return sorted(str(e["path"]) for e in files if e.get("table") in ROUTED_TABLES)


def write_partials(root: Path, files: list[Entry], seq: int) -> Entry:
    """Count the report's join over ``files`` (those in force once the compaction commits) and
    write it; the ``routed`` field of the compaction's entry."""
    from nexuscore.projections._store import EvidenceStore

    paths = covered_paths(files)
    with EvidenceStore(root, files=[e for e in files if e["path"] in set(paths)]) as store:
        counts = store.query(PARTIALS_SQL)
    relative = f"{PARTIALS_DIR}/routed-{seq:012d}.parquet"
    sink = pa.BufferOutputStream()
    pq.write_table(
        counts.replace_schema_metadata({FILES_KEY: json.dumps(paths).encode()}), sink, compression="zstd"
    )
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = replace_with(path, sink.getvalue().to_pybytes())
    fsync_path(path.parent)
    return {"path": relative, "sha256": digest, "rows": counts.num_rows, "files": len(paths)}


@dataclass(frozen=True)
class Sealed:
    counts: pa.Table  # PARTIALS_SQL over the covered files
    covered: list[str]  # their paths


def read_partials(root: Path, partials: Entry) -> Sealed | None:
    """The partials, if the file holds the bytes the ledger sealed and reads as partials; else None."""
    if not well_formed(partials):
        return None
    try:
        payload = (root / partials["path"]).read_bytes()
        if hashlib.sha256(payload).hexdigest() != partials["sha256"]:
            return None
        table = pq.ParquetFile(io.BytesIO(payload)).read(use_threads=False)
        paths = json.loads((table.schema.metadata or {})[FILES_KEY])
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        return None
    return Sealed(table.replace_schema_metadata(None), paths)


def trusted(root: Path, partials: Entry | None, files: list[Entry]) -> bool:
    """Are ``partials`` sealed, intact, and the counts of exactly the routed files of ``files``?"""
    read = read_partials(root, partials) if partials is not None else None
    return read is not None and read.covered == covered_paths(files)
