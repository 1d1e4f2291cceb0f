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
taken off and counted again with every outcome. Who-routed-what takes the partial days' covered
decisions from the routed rows the same compaction seals (below: the join per decision, sorted by
time, a file per day), not from the tables' rows. Row for row the full query. It is the full query
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
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.projections._index import sha256_of
from nexuscore.projections._manifest import names_sealed_file
from nexuscore.projections._partials import open_sealed, read_sealed, write_sealed

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


# --- the routed rows: the report's join per decision, sorted by time, one sealed file per day --------
# The partials count whole days; a window's partial first and last days are counted from rows. The
# tables' files are sorted by tenant and request id (for lookups), so a time filter prunes none of a
# tenant's row groups, and the join reads every outcome of the tenant: about 1.7 s of CPU for a
# tenant's two partial days on a 10 M decision store. The same compaction therefore also writes the
# join itself, one row per decision and outcome (a decision without any: one row, ``outcome`` false),
# one file per decision day (UTC), ``_index/routed-rows-<ledger size>-<day>.parquet``, sorted by
# tenant and time in small row groups: a report hashes the one or two files of its partial days (a
# few megabytes) and decodes the row groups of its tenant and hours only. The compaction entry names
# them (``routed_rows``: per day, path, sha256 and rows); they cover the files the ``routed``
# partials of the same entry cover (written from the same list), and ``verify`` checks each.
ROUTED_ROWS = "routed_rows"  # the compaction entry's field
ROWS_PATH = re.compile(r"_index/routed-rows-\d{12}-(?P<day>\d{4}-\d\d-\d\d)\.parquet")
ROWS_ROW_GROUP = 4_096  # about 15 minutes of the largest tenant on a 10 M decision store
ROUTED_ROWS_SQL = """
SELECT CAST(d.occurred_at AS DATE) AS day, d.tenant_id, d.request_id, d.occurred_at, d.feature, d.verdict,
       d.tier, d.deployment_id, d.policy_version, d.estimated_cost_micros,
       o.request_id IS NOT NULL AS outcome, o.occurred_at AS outcome_at, o.status, o.model, o.region,
       o.cost_micros
FROM decisions d LEFT JOIN outcomes o USING (tenant_id, request_id)
WHERE d.occurred_at IS NOT NULL
ORDER BY day, d.tenant_id, d.occurred_at, d.request_id, o.occurred_at, o.status, o.model, o.region
"""
_ROWS_BATCH = 65_536


def write_routed_rows(root: Path, files: list[Entry], seq: int) -> Entry:
    """Write the routed rows of ``files`` (those in force once the compaction commits), one sealed
    file per day; the compaction entry's ``routed_rows`` field."""
    from nexuscore.projections._store import EvidenceStore

    paths = set(covered_paths(files, ROUTED))
    written: list[Entry] = []

    def flush(day: date, parts: list[pa.Table]) -> None:
        relative = f"{PARTIALS_DIR}/routed-rows-{seq:012d}-{day.isoformat()}.parquet"
        table = pa.concat_tables(parts).drop_columns(["day"])
        entry = write_sealed(root, relative, table, {}, row_group_size=ROWS_ROW_GROUP)
        written.append({"day": day.isoformat(), **entry})

    with EvidenceStore(root, files=[e for e in files if e["path"] in paths]) as store:
        day: date | None = None
        parts: list[pa.Table] = []
        for batch in store.batches(ROUTED_ROWS_SQL, _ROWS_BATCH, views=ROUTED.tables):
            chunk = pa.Table.from_batches([batch])
            for value in pc.unique(chunk.column("day")).to_pylist():  # (sorted: the query's order)
                part = chunk.filter(pc.equal(chunk.column("day"), value))
                if value == day:
                    parts.append(part)
                    continue
                if day is not None:
                    flush(day, parts)
                day, parts = value, [part]
        if day is not None:
            flush(day, parts)
    return {"files": written, "rows": sum(int(e["rows"]) for e in written)}


def rows_well_formed(field: object) -> bool:
    """Does a compaction entry's ``routed_rows`` name files of the store's own, each with its day and
    a sha256, one per day?"""
    if not (isinstance(field, dict) and isinstance(field.get("files"), list)):
        return False
    days = set()
    for e in field["files"]:
        if not names_sealed_file(e, ROWS_PATH):
            return False
        match = ROWS_PATH.fullmatch(e["path"])
        if match is None or e.get("day") != match["day"] or e["day"] in days:
            return False
        days.add(e["day"])
    return True


def current_rows(entries: list[Entry]) -> dict[date, Entry] | None:
    """The routed rows files the last compaction names, by day (None when it names none, or a
    malformed field: then the partial days are counted from the tables' rows)."""
    for e in reversed(entries):
        if e.get("kind") == "compaction":
            field = e.get(ROUTED_ROWS)
            if field is None or not rows_well_formed(field):
                return None
            try:
                return {date.fromisoformat(f["day"]): f for f in field["files"]}
            except ValueError:
                return None
    return None


def rows_trusted(root: Path, entries: list[Entry]) -> bool:
    """Does the last compaction name routed rows whose files all hold the bytes it sealed?"""
    by_day = current_rows(entries)
    if by_day is None:
        return False
    try:
        return all(sha256_of(root / e["path"]) == e["sha256"] for e in by_day.values())
    except OSError:
        return False


def read_rows(
    root: Path,
    entry: Entry,
    tenant: str | None,
    spans: list[tuple[datetime, datetime]],
    columns: list[str],
) -> pa.Table | None:
    """``columns`` of the row groups of a routed rows file that may hold ``tenant``'s (any tenant's:
    None) decisions in one of ``spans`` (by the groups' statistics), if the file holds the sealed
    bytes; else None. The caller filters the rows themselves."""
    sealed = open_sealed(root, entry)
    if sealed is None:
        return None
    try:
        names = sealed.schema_arrow.names
        tenant_at, time_at = names.index("tenant_id"), names.index("occurred_at")
        meta = sealed.metadata
        groups = [
            i
            for i in range(meta.num_row_groups)
            if _may_hold(meta.row_group(i).column(tenant_at).statistics, tenant)
            and any(_overlaps(meta.row_group(i).column(time_at).statistics, s) for s in spans)
        ]
        return sealed.read_row_groups(groups, columns=columns, use_threads=False)
    except (OSError, ValueError, pa.ArrowException):
        return None


def _may_hold(stats: Any, tenant: str | None) -> bool:
    if tenant is None or stats is None or not stats.has_min_max:
        return True
    return bool(stats.min <= tenant <= stats.max)


def _overlaps(stats: Any, span: tuple[datetime, datetime]) -> bool:
    """May a row group whose time statistics are ``stats`` hold a time in [start, end)?"""
    if stats is None or not stats.has_min_max:
        return True
    low, high = (_aware(stats.min), _aware(stats.max))
    if low is None or high is None:
        return True
    return low < span[1] and span[0] <= high


def _aware(value: object) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value
