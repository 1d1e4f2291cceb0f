"""Sealed report partials: the counts of ``who-routed-what`` and ``spend`` per day, at compaction.

``who-routed-what`` joins every decision with its outcomes (tenant and request id): on a 10 M
decision store, a tenant's month is 3.4 M decisions against 3.3 M outcomes, about 2 s of CPU in the
hash join and the scans, whatever the files' order (sorted by tenant and request id, they prune other
tenants, not days); ``spend`` aggregates every outcome, settlement and decision, about 3 s. ``evidence
compact`` counts each once over every file in force after it and writes the counts as a small
Parquet file, ``_index/<report>-<ledger size>.parquet``, whose footer lists the files it covers:
``routed`` (the join per tenant, decision day (UTC), feature, verdict, tier, deployment, policy
version and the outcome's model and region) and ``spend`` (the outcomes' sums per tenant, feature,
day and model, the largest settled spend and decided budget per tenant and budget window). The
compaction entry names each (path, sha256, rows, files), so the signed chain covers its bytes;
``verify`` checks them (``routed_altered``, ``spend_missing``, ...).

A report then takes the whole days of its window from its partials and counts the rest from the
rows: the files flushed since (the tail), the covered files on the window's partial first and last
days, and (who-routed-what) the covered decisions with an outcome in the tail, whose partial count is
taken off and counted again with every outcome. Row for row the full query. It is the full query
whenever the partials file is not the one the ledger sealed, covers a file no longer in force, or
(who-routed-what) counts an outcome earlier than the window starts (the report leaves those out: an
outcome timed before its decision's day, by a producer's clock). The counts are read only after their
sha256 matches, so an altered file changes no answer: it costs the full query, and ``verify`` names
it.
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
Entry = dict[str, Any]

# The report's join, counted per day and per outcome model and region (the report's own groups
# without them): sums that add up, per group, to the report's, and the earliest outcome counted.
ROUTED_PARTIALS_SQL = """
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
# ``spend``'s three parts in one table (``part``): the outcomes' sums per tenant, feature, day and
# model, and per tenant and budget window the largest spend settled and the largest budget decided.
SPEND_PARTIALS_SQL = """
SELECT 'spend' AS part, tenant_id, feature, CAST(occurred_at AS DATE) AS day, model, count(*) AS calls,
       sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
       sum(cost_micros) AS cost_micros
FROM outcomes GROUP BY ALL
UNION ALL BY NAME
SELECT 'budget' AS part, tenant_id, budget_window, max(tenant_spent_micros) AS tenant_spent_micros
FROM settlements GROUP BY ALL
UNION ALL BY NAME
SELECT 'limit' AS part, tenant_id, budget_window, max(tenant_budget_micros) AS tenant_budget_micros
FROM decisions GROUP BY ALL
ORDER BY ALL
"""


@dataclass(frozen=True)
class Rollup:
    """One report's sealed partials: the compaction entry's field, the file, what it counts."""

    name: str  # the compaction entry's field, and the file's name: ``_index/<name>-<n>.parquet``
    tables: tuple[str, ...]  # the tables whose files it counts
    sql: str  # the counts, over views of those files

    @property
    def path(self) -> re.Pattern[str]:
        return re.compile(rf"_index/{self.name}-\d{{12}}\.parquet")

    @property
    def files_key(self) -> bytes:
        return f"nexuscore.{self.name}.files".encode()


ROUTED = Rollup("routed", ("decisions", "outcomes"), ROUTED_PARTIALS_SQL)
SPEND = Rollup("spend", ("outcomes", "settlements", "decisions"), SPEND_PARTIALS_SQL)
ROLLUPS = (ROUTED, SPEND)


def current_partials(entries: list[Entry], rollup: Rollup) -> Entry | None:
    """The partials the last compaction names (None when it names none, or a malformed entry:
    then the report is the full query, and ``verify`` names the entry)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction":
            partials = e.get(rollup.name)
            return partials if well_formed(partials, rollup) else None
    return None


def well_formed(partials: object, rollup: Rollup) -> bool:
    """Does an entry's field name a file of the store's own, with a sha256?"""
    return names_sealed_file(partials, rollup.path)


def covered_paths(files: list[Entry], rollup: Rollup) -> list[str]:
    """The paths of ``files`` the partials of them cover: the files of its tables, sorted."""
    return sorted(str(e["path"]) for e in files if e.get("table") in rollup.tables)


def write_partials(root: Path, files: list[Entry], seq: int, rollup: Rollup) -> Entry:
    """Count the report over ``files`` (those in force once the compaction commits) and write it;
    the compaction entry's field."""
    from nexuscore.projections._store import EvidenceStore

    paths = covered_paths(files, rollup)
    with EvidenceStore(root, files=[e for e in files if e["path"] in set(paths)]) as store:
        counts = store.query(rollup.sql)
    relative = f"{PARTIALS_DIR}/{rollup.name}-{seq:012d}.parquet"
    written = write_sealed(root, relative, counts, {rollup.files_key: json.dumps(paths).encode()})
    return {**written, "files": len(paths)}


@dataclass(frozen=True)
class Sealed:
    counts: pa.Table  # the rollup's counts over the covered files
    covered: list[str]  # their paths


def read_partials(root: Path, partials: Entry, rollup: Rollup) -> Sealed | None:
    """The partials, if the file holds the bytes the ledger sealed and reads as partials; else None."""
    if not well_formed(partials, rollup):
        return None
    table = read_sealed(root, partials)
    if table is None:
        return None
    try:
        paths = json.loads((table.schema.metadata or {})[rollup.files_key])
    except (ValueError, KeyError, TypeError):
        return None
    if not (isinstance(paths, list) and all(isinstance(p, str) for p in paths)):
        return None
    return Sealed(table.replace_schema_metadata(None), paths)


def trusted(root: Path, entries: list[Entry], files: list[Entry], rollup: Rollup) -> bool:
    """Are the partials the last compaction sealed intact, and the counts of exactly the files of
    ``files`` they would count?"""
    partials = current_partials(entries, rollup)
    read = read_partials(root, partials, rollup) if partials is not None else None
    return read is not None and read.covered == covered_paths(files, rollup)
