"""The evidence store: DuckDB views over the sealed Parquet files, and the canned reports.

Views read exactly the files the signed manifest commits, nothing found lying in a folder. Every
view is one row per event (the projector dropped duplicates); ``requests`` keeps a client's resubmission
of a request id as a second row, which ``verify`` reports. A request id is unique per tenant only:
every join and grouping by request matches (``tenant_id``, ``request_id``).

The DuckDB connection is a sandbox, because ``evidence sql`` runs whatever a person types on it: it
may read the committed Parquet files and nothing else (no other file, no network, no extension), it
cannot change its own configuration, and it runs one SELECT statement at a time.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa

from nexuscore.kernel.errors import EvidenceError
from nexuscore.projections._keys import KeyStore, LocalKeyStore
from nexuscore.projections._manifest import committed, readable_path, signed_entries
from nexuscore.projections._tables import SCHEMAS

# Which rows end a request, per table: all of them (None), or those whose column compares so. The
# ``terminal_states`` view and verify's one-pass count (``_verify._ODD_REQUESTS_SQL``) both read
# this, so what a terminal state is cannot differ between them. A resolution that resumed the
# request ("dispatched") does not end it: its outcome does.
TERMINAL_ROWS: dict[str, tuple[str, str] | None] = {
    "outcomes": None,
    "rejections": None,
    "decisions": ("verdict", "= 'denied'"),
    "resolutions": ("resolution", "<> 'dispatched'"),
}


def _terminal(table: str) -> str:
    """The WHERE clause that keeps ``table``'s terminal rows (TERMINAL_ROWS), or nothing."""
    rule = TERMINAL_ROWS[table]
    return "" if rule is None else f"WHERE {rule[0]} {rule[1]}"


if TYPE_CHECKING:
    from nexuscore.projections._keyed import Keyed
    from nexuscore.projections._residency import Sealed as SealedResidency
    from nexuscore.projections._rollups import Rollup, Sealed

# The views over other views, each with the tables it reads (made before it, when it is first used).
_DERIVED_VIEWS: dict[str, tuple[tuple[str, ...], str]] = {
    "decision_reasons": (
        ("decisions",),
        """
CREATE OR REPLACE VIEW decision_reasons AS
SELECT event_id, request_id, tenant_id, occurred_at, policy_digest, data_region,
       r.seq AS seq, r.stage AS stage, r.kind AS kind, r.subject AS subject, r.detail AS detail
FROM (SELECT *, unnest(reasons) AS r FROM decisions)
""",
    ),
    "terminal_states": (
        ("outcomes", "rejections", "decisions", "resolutions"),
        f"""
CREATE OR REPLACE VIEW terminal_states AS
SELECT request_id, tenant_id, status AS state, occurred_at FROM outcomes {_terminal("outcomes")}
UNION ALL
SELECT request_id, tenant_id, 'rejected' AS state, occurred_at FROM rejections {_terminal("rejections")}
UNION ALL
SELECT request_id, tenant_id, verdict AS state, occurred_at FROM decisions {_terminal("decisions")}
UNION ALL
SELECT request_id, tenant_id, 'escalation_' || resolution AS state, occurred_at FROM resolutions
{_terminal("resolutions")}
""",  # noqa: S608 (module constants only)
    ),
    "escalations": (
        ("decisions", "resolutions"),
        """
CREATE OR REPLACE VIEW escalations AS
SELECT d.request_id, d.tenant_id, d.feature, d.occurred_at AS escalated_at, d.verdict_reason AS reason,
       (SELECT string_agg(x.detail, '; ') FROM unnest(d.reasons) AS u(x) WHERE x.stage = 'escalation')
           AS escalation_rules,
       d.policy_version, d.policy_digest, d.data_region, d.review_deadline AS deadline,
       coalesce(res.resolution, 'pending') AS review_state, res.reviewer, res.review_reason,
       res.occurred_at AS reviewed_at, res.verdict_reason AS resolution_reason
FROM decisions d
LEFT JOIN resolutions res USING (tenant_id, request_id)
WHERE d.verdict = 'escalated'
""",
    ),
}
VIEWS = (*SCHEMAS, *_DERIVED_VIEWS)  # every view a query may name

# The report's groups, in a total order (ties in ``requests`` had none).
_ROUTED_ORDER = "ORDER BY tenant_id, feature, requests DESC, verdict, tier, deployment_id, policy_version"
WHO_ROUTED_WHAT_SQL = (
    """
SELECT d.tenant_id, d.feature, d.verdict, d.tier, d.deployment_id,
       any_value(o.model) FILTER (WHERE o.model IS NOT NULL) AS model,
       any_value(o.region) FILTER (WHERE o.region IS NOT NULL) AS region,
       d.policy_version,
       count(*) AS requests,
       count(o.request_id) FILTER (WHERE o.status = 'answered') AS answered,
       round(sum(d.estimated_cost_micros) FILTER (WHERE d.verdict = 'dispatch') / 1e6, 6) AS estimated_usd,
       round(coalesce(sum(o.cost_micros), 0) / 1e6, 6) AS actual_usd
FROM decisions d
-- Outcomes filtered too (they follow their decision): the join then reads a tenant's share only.
LEFT JOIN (
    SELECT * FROM outcomes
    WHERE ($tenant IS NULL OR tenant_id = $tenant) AND ($since IS NULL OR occurred_at >= $since)
) o USING (tenant_id, request_id)
WHERE ($tenant IS NULL OR d.tenant_id = $tenant)
  AND ($feature IS NULL OR d.feature = $feature)
  AND ($tier IS NULL OR d.tier = $tier)
  AND ($policy_version IS NULL OR d.policy_version = $policy_version)
  AND ($since IS NULL OR d.occurred_at >= $since)
  AND ($until IS NULL OR d.occurred_at < $until)
  AND ($model IS NULL OR o.model = $model OR d.deployment_id = $model)
GROUP BY ALL
"""  # noqa: S608  # names are ours
    + _ROUTED_ORDER
)

# --- who-routed-what from the sealed partials (``_rollups``) ----------------------------------------
# The report's filters on the decisions, all but the window, on a table with the decisions' columns.
_ROUTED_FILTERS = """($tenant IS NULL OR tenant_id = $tenant)
  AND ($feature IS NULL OR feature = $feature)
  AND ($tier IS NULL OR tier = $tier)
  AND ($policy_version IS NULL OR policy_version = $policy_version)"""
# The whole days of the window ($first_day up to, not including, $end_day; NULL: unbounded).
_WHOLE_DAYS = "($first_day IS NULL OR day >= $first_day) AND ($end_day IS NULL OR day < $end_day)"
# Partial rows the report would count differently: an outcome earlier than the window.
ROUTED_EARLY_SQL = f"""
SELECT count(*) AS n FROM _routed_partials
WHERE {_ROUTED_FILTERS} AND {_WHOLE_DAYS} AND $since IS NOT NULL AND first_outcome_at < $since
"""  # noqa: S608  # names are ours
# Have the covered files decisions of these tenants on the window's partial days ($edge_days)?
ROUTED_EDGE_SQL = """
SELECT count(*) AS n FROM _routed_partials
WHERE ($tenant IS NULL OR tenant_id = $tenant) AND list_contains($edge_days, day)
"""
# The window's partial days on which the covered files have decisions (of any tenant).
ROUTED_EDGE_DAYS_SQL = """
SELECT DISTINCT day FROM _routed_partials WHERE list_contains($edge_days, day) ORDER BY day
"""
_DECIDED = (
    "tenant_id, request_id, occurred_at, feature, verdict, tier, deployment_id, policy_version, "
    "estimated_cost_micros"
)
# The tail's requests with an outcome the report counts.
ROUTED_TAIL_KEYS_SQL = """
SELECT DISTINCT tenant_id, request_id FROM _routed_tail_outcomes
WHERE ($tenant IS NULL OR tenant_id = $tenant) AND ($since IS NULL OR occurred_at >= $since)
"""
# The decisions counted from their rows: the tail's in the window, and the covered files' on the
# window's partial days or with an outcome in the tail (``retract``: in the partials, on a whole day).
ROUTED_TAIL_DECISIONS_SQL = f"""
SELECT {_DECIDED}, false AS retract FROM _routed_tail_decisions
WHERE {_ROUTED_FILTERS} AND ($since IS NULL OR occurred_at >= $since) AND ($until IS NULL OR occurred_at < $until)
"""  # noqa: S608
ROUTED_SEALED_EDGES_SQL = f"""
SELECT {_DECIDED}, false AS retract FROM _routed_sealed_decisions
WHERE {_ROUTED_FILTERS}
  AND ((occurred_at >= $edge1_from AND occurred_at < $edge1_to)
       OR (occurred_at >= $edge2_from AND occurred_at < $edge2_to))
"""  # noqa: S608
# (A semi join: DuckDB prunes the row groups by the request ids of a few keys, the files being sorted;
# a tail's late outcomes spread over the tenant's history, though, leave few unread.) Those on the
# window's partial days too, when the routed rows count the others there (they lack the tail's
# outcomes): counted with every outcome, nothing taken off. The join comes first (``MATERIALIZED``):
# else DuckDB evaluates the time test on every row the scan reads (3.3 M for a tenant's month at 10 M
# decisions, about 0.1 s of CPU with partial days) instead of on the few it keeps.
_LATE = """
WITH late AS MATERIALIZED (
    SELECT {decided} FROM {source}
    WHERE {filters}
)
SELECT {decided}, NOT edge AS retract FROM (
    SELECT {decided},
           coalesce((occurred_at >= $edge1_from AND occurred_at < $edge1_to)
                    OR (occurred_at >= $edge2_from AND occurred_at < $edge2_to), false) AS edge
    FROM late
)
WHERE edge OR (($whole_from IS NULL OR occurred_at >= $whole_from)
               AND ($whole_to IS NULL OR occurred_at < $whole_to))
"""
ROUTED_SEALED_LATE_SQL = _LATE.format(
    decided=_DECIDED,
    source="_routed_sealed_decisions SEMI JOIN _routed_tail_keys USING (tenant_id, request_id)",
    filters=_ROUTED_FILTERS,
)
# The same from the covered decisions the routed keys found (``_keyed``: those of the tail's keys).
ROUTED_FOUND_LATE_SQL = _LATE.format(
    decided=_DECIDED, source="_routed_found_decisions", filters=_ROUTED_FILTERS
)
# Both in one scan, when the window has partial days and the tail outcomes of covered decisions.
ROUTED_SEALED_BOTH_SQL = f"""
SELECT {_DECIDED}, NOT edge AS retract FROM (
    SELECT d.*, k.request_id IS NOT NULL AS late,
           coalesce((d.occurred_at >= $edge1_from AND d.occurred_at < $edge1_to)
                    OR (d.occurred_at >= $edge2_from AND d.occurred_at < $edge2_to), false) AS edge
    FROM (SELECT {_DECIDED} FROM _routed_sealed_decisions WHERE {_ROUTED_FILTERS}) d
    LEFT JOIN _routed_tail_keys k ON k.tenant_id = d.tenant_id AND k.request_id = d.request_id
)
WHERE edge OR (late AND ($whole_from IS NULL OR occurred_at >= $whole_from)
               AND ($whole_to IS NULL OR occurred_at < $whole_to))
"""  # noqa: S608
# Every outcome of those decisions, covered (``sealed``) or not (a semi join each: DuckDB prunes the
# covered files' row groups by a few decisions' request ids).
_SEALED_OUTCOMES = """
SELECT tenant_id, request_id, occurred_at, status, model, region, cost_micros, true AS sealed
FROM {source}
WHERE $tenant IS NULL OR tenant_id = $tenant
UNION ALL
SELECT tenant_id, request_id, occurred_at, status, model, region, cost_micros, false AS sealed
FROM _routed_tail_outcomes SEMI JOIN _routed_decisions USING (tenant_id, request_id)
WHERE $tenant IS NULL OR tenant_id = $tenant
"""
ROUTED_OUTCOMES_SQL = _SEALED_OUTCOMES.format(
    source="_routed_sealed_outcomes SEMI JOIN _routed_decisions USING (tenant_id, request_id)"
)
# The same with the covered outcomes the routed keys found (``_keyed``: those of the decisions counted).
ROUTED_FOUND_OUTCOMES_SQL = _SEALED_OUTCOMES.format(source="_routed_found_outcomes")
# Per table, the report's query over the covered rows the routed keys found, and over a semi join.
_ROUTED_COVERED = {
    "decisions": (ROUTED_FOUND_LATE_SQL, ROUTED_SEALED_LATE_SQL),
    "outcomes": (ROUTED_FOUND_OUTCOMES_SQL, ROUTED_OUTCOMES_SQL),
}
_ROUTED_JOIN = """
SELECT d.tenant_id, CAST(d.occurred_at AS DATE) AS day, d.feature, d.verdict, d.tier, d.deployment_id,
       d.policy_version, o.model, o.region,
       {sign} * count(*) AS requests,
       {sign} * count(o.request_id) FILTER (WHERE o.status = 'answered') AS answered,
       {sign} * sum(d.estimated_cost_micros) FILTER (WHERE d.verdict = 'dispatch') AS estimated_micros,
       {sign} * sum(o.cost_micros) AS cost_micros
FROM {decisions} d LEFT JOIN (SELECT * FROM _routed_outcomes WHERE {outcomes}) o USING (tenant_id, request_id)
WHERE ($model IS NULL OR o.model = $model OR d.deployment_id = $model)
GROUP BY ALL
"""
# The window's partial days from the sealed routed rows (``_rollups``): the decisions the report
# counts there, each with its covered outcomes (joined at compaction).
ROUTED_EDGE_ROWS_SQL = f"""
SELECT * FROM _routed_rows_read
WHERE {_ROUTED_FILTERS}
  AND ((occurred_at >= $edge1_from AND occurred_at < $edge1_to)
       OR (occurred_at >= $edge2_from AND occurred_at < $edge2_to))
"""  # noqa: S608
# Rows that cannot stand for the join: an outcome the report leaves out (earlier than the window).
ROUTED_EDGE_ROWS_EARLY_SQL = """
SELECT count(*) AS n FROM _routed_edge_rows
WHERE $since IS NOT NULL AND outcome AND NOT coalesce(outcome_at >= $since, false)
"""
# The rows of decisions with an outcome in the tail as well lack that one: left to the tables' rows
# (``ROUTED_SEALED_LATE_SQL``).
ROUTED_EDGE_ROWS_NOT_LATE_SQL = """
SELECT * FROM _routed_edge_rows ANTI JOIN _routed_tail_keys USING (tenant_id, request_id)
"""
_ROUTED_EDGE_COUNTS = """
SELECT tenant_id, CAST(occurred_at AS DATE) AS day, feature, verdict, tier, deployment_id,
       policy_version, model, region,
       count(*) AS requests,
       count(*) FILTER (WHERE outcome AND status = 'answered') AS answered,
       sum(estimated_cost_micros) FILTER (WHERE verdict = 'dispatch') AS estimated_micros,
       sum(cost_micros) AS cost_micros
FROM _routed_edge_rows
WHERE ($model IS NULL OR model = $model OR deployment_id = $model)
GROUP BY ALL
"""
# The partials' whole days, plus the decisions counted from their rows with every outcome the report
# counts, less what the partials counted for those of them they cover (with the covered outcomes),
# plus the partial days' routed rows when they stand for the rows.
ROUTED_MERGED_SQL = (
    f"""
WITH rows AS (
    SELECT * EXCLUDE (first_outcome_at) FROM _routed_partials
    WHERE {_ROUTED_FILTERS} AND {_WHOLE_DAYS} AND ($model IS NULL OR model = $model OR deployment_id = $model)
    UNION ALL BY NAME
"""  # noqa: S608  # names are ours
    + _ROUTED_JOIN.format(
        sign=1, decisions="_routed_decisions", outcomes="$since IS NULL OR occurred_at >= $since"
    )
    + "    UNION ALL BY NAME\n"
    + _ROUTED_JOIN.format(
        sign=-1, decisions="(SELECT * FROM _routed_decisions WHERE retract)", outcomes="sealed"
    )
    + "    UNION ALL BY NAME\n"
    + _ROUTED_EDGE_COUNTS
    + """
)
SELECT tenant_id, feature, verdict, tier, deployment_id,
       any_value(model) FILTER (WHERE model IS NOT NULL) AS model,
       any_value(region) FILTER (WHERE region IS NOT NULL) AS region,
       policy_version,
       CAST(sum(requests) AS BIGINT) AS requests,
       CAST(sum(answered) AS BIGINT) AS answered,
       round(CAST(sum(estimated_micros) AS HUGEINT) / 1e6, 6) AS estimated_usd,
       round(coalesce(CAST(sum(cost_micros) AS HUGEINT), 0) / 1e6, 6) AS actual_usd
FROM rows
GROUP BY tenant_id, feature, verdict, tier, deployment_id, policy_version
HAVING sum(requests) > 0
"""
    + _ROUTED_ORDER
)

# The report from its three parts: ``spend``, ``budget`` and ``limits``.
_SPEND_REPORT = """
SELECT s.tenant_id, s.feature, s.day, s.model, s.calls, s.input_tokens, s.output_tokens,
       round(s.cost_micros / 1e6, 6) AS cost_usd,
       round(l.tenant_budget_micros / 1e6, 6) AS tenant_budget_usd,
       round(100.0 * b.tenant_spent_micros / nullif(l.tenant_budget_micros, 0), 2) AS tenant_budget_used_pct
FROM spend s
LEFT JOIN budget b ON b.tenant_id = s.tenant_id AND b.budget_window = CAST(s.day AS VARCHAR)
LEFT JOIN limits l ON l.tenant_id = s.tenant_id AND l.budget_window = CAST(s.day AS VARCHAR)
ORDER BY s.day, s.tenant_id, s.feature, s.model
"""
_SPENT = """
    SELECT tenant_id, feature, CAST(occurred_at AS DATE) AS day, model,
           count(*) AS calls, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
           sum(cost_micros) AS cost_micros
    FROM {outcomes}
    WHERE ($tenant IS NULL OR tenant_id = $tenant) AND {window}
    GROUP BY ALL
"""
_WINDOW = "($since IS NULL OR occurred_at >= $since) AND ($until IS NULL OR occurred_at < $until)"
SPEND_SQL = (
    "WITH spend AS ("  # noqa: S608  # names are ours
    + _SPENT.format(outcomes="outcomes", window=_WINDOW)
    + """),
budget AS (
    SELECT tenant_id, budget_window, max(tenant_spent_micros) AS tenant_spent_micros
    FROM settlements GROUP BY ALL
),
limits AS (
    SELECT tenant_id, budget_window, max(tenant_budget_micros) AS tenant_budget_micros
    FROM decisions GROUP BY ALL
)"""
    + _SPEND_REPORT
)

# --- spend from the sealed partials (``_rollups``) -------------------------------------------------
# The outcomes counted from their rows: the tail's in the window, the covered files' on its partial days.
SPEND_TAIL_SQL = _SPENT.format(outcomes="_spend_tail_outcomes", window=_WINDOW)
SPEND_EDGES_SQL = _SPENT.format(
    outcomes="_spend_sealed_outcomes",
    window="""coalesce((occurred_at >= $edge1_from AND occurred_at < $edge1_to)
                     OR (occurred_at >= $edge2_from AND occurred_at < $edge2_to), false)""",
)
SPEND_EDGE_DAYS_SQL = """
SELECT count(*) AS n FROM _spend_partials
WHERE part = 'spend' AND ($tenant IS NULL OR tenant_id = $tenant) AND list_contains($edge_days, day)
"""
# The partials' whole days and the counted rows; the largest settled spend and decided budget of the
# partials and of the tail.
SPEND_MERGED_SQL = (
    f"""
WITH spend AS (
    SELECT tenant_id, feature, day, model, CAST(sum(calls) AS BIGINT) AS calls,
           CAST(sum(input_tokens) AS HUGEINT) AS input_tokens,
           CAST(sum(output_tokens) AS HUGEINT) AS output_tokens,
           CAST(sum(cost_micros) AS HUGEINT) AS cost_micros
    FROM (
        SELECT tenant_id, feature, day, model, calls, input_tokens, output_tokens, cost_micros
        FROM _spend_partials
        WHERE part = 'spend' AND ($tenant IS NULL OR tenant_id = $tenant) AND {_WHOLE_DAYS}
        UNION ALL BY NAME
        SELECT * FROM _spend_rows
    )
    GROUP BY ALL
),
budget AS (
    SELECT tenant_id, budget_window, max(tenant_spent_micros) AS tenant_spent_micros FROM (
        SELECT tenant_id, budget_window, tenant_spent_micros FROM _spend_partials WHERE part = 'budget'
        UNION ALL
        SELECT tenant_id, budget_window, tenant_spent_micros FROM _spend_tail_settlements
    )
    GROUP BY ALL
),
limits AS (
    SELECT tenant_id, budget_window, max(tenant_budget_micros) AS tenant_budget_micros FROM (
        SELECT tenant_id, budget_window, tenant_budget_micros FROM _spend_partials WHERE part = 'limit'
        UNION ALL
        SELECT tenant_id, budget_window, tenant_budget_micros FROM _spend_tail_decisions
    )
    GROUP BY ALL
)"""  # noqa: S608  # names are ours
    + _SPEND_REPORT
)

# Every place a request's content was processed, against where its decision allowed it to go. One
# hash join of the calls (dispatches, attempts, outcomes) with the decisions on (tenant, request),
# keeping only calls outside the home region or without a decision.
_RESIDENCY_CALLS = """
WITH calls AS (
    SELECT request_id, tenant_id, 'attempt' AS event, event_id, occurred_at, region, deployment_id FROM attempts
    UNION ALL
    SELECT request_id, tenant_id, 'outcome', event_id, occurred_at, region, deployment_id FROM outcomes
    UNION ALL
    SELECT request_id, tenant_id, 'dispatch', event_id, occurred_at, region, deployment_id FROM dispatches
),
findings AS (
    SELECT c.request_id, c.tenant_id, c.event, c.event_id, c.occurred_at, c.deployment_id, c.region,
           d.home_region, d.allowed_regions, d.residency_rule, d.transfer_basis,
           CASE WHEN d.request_id IS NULL THEN 'no_decision'
                WHEN NOT list_contains(d.allowed_regions, c.region) THEN 'outside_allowed_regions'
                ELSE 'cross_border' END AS finding
    FROM calls c LEFT JOIN decisions d USING (tenant_id, request_id)
    WHERE (d.request_id IS NULL OR c.region <> d.home_region)
      AND ($tenant IS NULL OR c.tenant_id = $tenant)
)
"""
RESIDENCY_SQL = _RESIDENCY_CALLS + "SELECT * FROM findings ORDER BY finding DESC, occurred_at"  # noqa: S608

# The same findings counted: one row per kind of finding, tenant, event, route and transfer basis
# (no count of distinct requests: it doubled the cost; the dispatch rows count the requests).
_RESIDENCY_COUNTS = """
SELECT finding, tenant_id, event, home_region, region, allowed_regions, residency_rule, transfer_basis,
       count(*) AS calls, min(occurred_at) AS first_at, max(occurred_at) AS last_at
FROM findings
GROUP BY ALL
"""
_RESIDENCY_ORDER = "ORDER BY finding DESC, tenant_id, event, region, transfer_basis"
RESIDENCY_SUMMARY_SQL = _RESIDENCY_CALLS + _RESIDENCY_COUNTS + _RESIDENCY_ORDER

# The summary from the sealed partials (``_residency``): their counts, plus those of the calls in the
# files flushed since (``_tail_*``), each against its decisions: those in the tail, and those of the
# covered files (``_found_decisions``: the ones the tail's requests have), added up.
RESIDENCY_MERGED_SQL = (
    _RESIDENCY_CALLS.replace(" FROM attempts", " FROM _tail_attempts")  # noqa: S608  # names are ours
    .replace(" FROM outcomes", " FROM _tail_outcomes")
    .replace(" FROM dispatches", " FROM _tail_dispatches")
    .replace(
        " LEFT JOIN decisions d",
        " LEFT JOIN (SELECT * FROM _tail_decisions UNION ALL BY NAME SELECT * FROM _found_decisions) d",
    )
    + """,
counts AS ("""
    + _RESIDENCY_COUNTS
    + """
    UNION ALL BY NAME
    SELECT * FROM _sealed_residency WHERE ($tenant IS NULL OR tenant_id = $tenant)
)
SELECT finding, tenant_id, event, home_region, region, allowed_regions, residency_rule, transfer_basis,
       CAST(sum(calls) AS BIGINT) AS calls, min(first_at) AS first_at, max(last_at) AS last_at
FROM counts
GROUP BY ALL
"""
    + _RESIDENCY_ORDER
)

# The tail's requests (of its calls, and of its decisions), and the covered files' decisions of them:
# one scan of the covered decisions' files, whatever the size of the tail.
_TAIL_KEYS = """
SELECT tenant_id, request_id FROM _tail_attempts
UNION SELECT tenant_id, request_id FROM _tail_outcomes
UNION SELECT tenant_id, request_id FROM _tail_dispatches
UNION SELECT tenant_id, request_id FROM _tail_decisions
"""
RESIDENCY_FOUND_SQL = (
    "SELECT d.tenant_id, d.request_id, d.home_region, d.allowed_regions, d.residency_rule, "  # noqa: S608
    f"d.transfer_basis FROM _sealed_decisions d SEMI JOIN ({_TAIL_KEYS}) k USING (tenant_id, request_id) "
    "WHERE ($tenant IS NULL OR d.tenant_id = $tenant)"
)
# No file flushed since the partials: they are the summary.
RESIDENCY_SEALED_SQL = (
    "SELECT * FROM _sealed_residency WHERE ($tenant IS NULL OR tenant_id = $tenant) "  # noqa: S608  # ours
    + _RESIDENCY_ORDER
)

# Decisions in the tail of a request that has calls in the covered files (a decision flushed after
# its call, across a compaction, or a second decision): those calls' findings changed since the
# partials were counted. Such a request either has a decision in the covered files too (then it is
# among ``_found_decisions``) or its calls there had none (``_orphans``, which the partials list).
RESIDENCY_STALE_SQL = """
SELECT count(*) AS n FROM _tail_decisions t
WHERE ($tenant IS NULL OR t.tenant_id = $tenant)
  AND ((t.tenant_id, t.request_id) IN (SELECT tenant_id, request_id FROM _found_decisions)
       OR (t.tenant_id, t.request_id) IN (SELECT tenant_id, request_id FROM _orphans))
"""

# The same without the list of orphans (the partials hold none when there were too many): every
# covered call of a request decided in the tail.
RESIDENCY_STALE_SCAN_SQL = """
SELECT count(*) AS n FROM (
    SELECT tenant_id, request_id FROM _sealed_attempts
    UNION ALL SELECT tenant_id, request_id FROM _sealed_outcomes
    UNION ALL SELECT tenant_id, request_id FROM _sealed_dispatches
) c
SEMI JOIN _tail_decisions d USING (tenant_id, request_id)
WHERE ($tenant IS NULL OR c.tenant_id = $tenant)
"""

# Requests with calls but no decision, in the files the partials cover: at compaction.
RESIDENCY_ORPHANS_SQL = """
SELECT DISTINCT tenant_id, request_id FROM (
    SELECT tenant_id, request_id FROM attempts
    UNION ALL SELECT tenant_id, request_id FROM outcomes
    UNION ALL SELECT tenant_id, request_id FROM dispatches
) c ANTI JOIN decisions d USING (tenant_id, request_id)
ORDER BY tenant_id, request_id
"""


_CALL_COLUMNS = "request_id, tenant_id, event_id, occurred_at, region, deployment_id"
_TAIL_COLUMNS = {
    "attempts": _CALL_COLUMNS,
    "outcomes": _CALL_COLUMNS,
    "dispatches": _CALL_COLUMNS,
    "decisions": "tenant_id, request_id, home_region, allowed_regions, residency_rule, transfer_basis",
}
_ROUTED_NO_OUTCOMES = pa.schema(
    [
        SCHEMAS["outcomes"].field(c)
        for c in ("tenant_id", "request_id", "occurred_at", "status", "model", "region", "cost_micros")
    ]
    + [pa.field("sealed", pa.bool_())]
).empty_table()
_ROUTED_NO_ROWS = pa.schema(
    [SCHEMAS["decisions"].field(c) for c in _DECIDED.split(", ")]
    + [pa.field("outcome", pa.bool_()), SCHEMAS["outcomes"].field("occurred_at").with_name("outcome_at")]
    + [SCHEMAS["outcomes"].field(c) for c in ("status", "model", "region", "cost_micros")]
).empty_table()
_NO_ORPHANS = pa.table({"tenant_id": pa.array([], pa.string()), "request_id": pa.array([], pa.string())})


class EvidenceStore:
    """An in-memory DuckDB connection with one view per evidence table over the committed files.

    Each view is made when a query first names it: a view over a table's files reads every footer
    of them (a second on a large compacted store), and a report reads two or three tables of fifteen.
    """

    def __init__(
        self,
        root: Path,
        keystore: KeyStore | None = None,
        *,
        files: list[dict[str, Any]] | None = None,
        settings: Mapping[str, object] | None = None,
    ) -> None:
        if not root.is_dir():
            raise EvidenceError(f"no evidence at {root} (run the pipeline or pass --evidence-dir)")
        self.root = root
        self.keystore = keystore if keystore is not None else LocalKeyStore(root / "_keys")
        by_table: dict[str, list[str]] = defaultdict(list)
        # The signed manifest, read once (``entries``): the files it commits and the side files
        # (partials, routed rows, index) the reports trust come from the same snapshot.
        self._entries: list[dict[str, Any]] | None = None
        # ``verify`` passes the files that passed its checks; everyone else reads what is committed.
        self.files: list[dict[str, Any]] = committed(self.entries) if files is None else files
        for entry in self.files:
            by_table[entry["table"]].append(readable_path(root.absolute() / _table_path(entry, root)))
        self._paths = dict(by_table)
        self._made: set[str] = set()
        self._con = sandbox([p for paths in by_table.values() for p in paths], settings)

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection with every view made (for callers that query it directly)."""
        self.views(*VIEWS)
        return self._con

    @property
    def entries(self) -> list[dict[str, Any]]:
        """The signed manifest's entries, read once (when the store opened, unless given its files)."""
        if self._entries is None:
            self._entries = signed_entries(self.root)
        return self._entries

    def table_paths(self, table: str) -> list[str]:
        """The files of ``table`` the views read (absolute paths; none when the table has none)."""
        return list(self._paths.get(table, []))

    def views(self, *names: str) -> None:
        """Make the views ``names`` (tables or derived views), and those they read, unless made."""
        for name in names:
            if name in self._made:
                continue
            if name in _DERIVED_VIEWS:
                tables, sql = _DERIVED_VIEWS[name]
                self.views(*tables)
                self._create_view(name, sql)
            else:
                self._create_table_view(name, SCHEMAS[name], self._paths.get(name))
            self._made.add(name)

    def _views_of(self, sql: str) -> None:
        """Make the views ``sql`` reads: the tables of its parse tree (not ``get_table_names``, which
        binds the query and cannot bind a join USING columns); every view it names as a word if it
        does not parse (it fails then anyway)."""
        bare = re.sub(r"\$\w+|\?", "NULL", sql)  # (parameters: any value parses the same)
        try:
            tree = json.loads(
                self._con.execute("SELECT json_serialize_sql($q)", {"q": bare}).fetchall()[0][0]
            )
            named = set() if tree.get("error") else _base_tables(tree)
        except (duckdb.Error, ValueError, AttributeError):
            tree, named = {"error": True}, set()
        if tree.get("error"):
            named = {w.lower() for w in re.findall(r"\w+", sql)}
        self.views(*(v for v in VIEWS if v in named))

    def _create_table_view(
        self, table: str, schema: pa.Schema, paths: list[str] | None, *, name: str | None = None
    ) -> None:
        """The view ``name`` (default: the table's) over ``paths``, files of ``table``."""
        view = name or table
        if not paths:
            self._con.register(f"_empty_{table}", schema.empty_table())
            self._con.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM _empty_{table}")  # noqa: S608
            return
        # Files of older versions may lack columns added since: matched by name, and any
        # column no file has is added as NULLs of its type, so queries see today's schema.
        source = f"read_parquet({sql_list(paths)}, hive_partitioning = false, union_by_name = true)"
        self._create_view(table, f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {source}")  # noqa: S608
        present = {row[0] for row in self._con.execute(f"DESCRIBE {view}").fetchall()}
        if set(schema.names) - present:
            # (Registered only when needed: each registration costs about as much as a view.)
            self._con.register(f"_empty_{table}", schema.empty_table())
            self._con.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM {source} "  # noqa: S608  # names are ours
                f"UNION ALL BY NAME SELECT * FROM _empty_{table}"
            )

    def _create_view(self, table: str, sql: str) -> None:
        try:
            self._con.execute(sql)
        except duckdb.Error as exc:
            self._con.close()
            first = str(exc).splitlines()[0]
            raise EvidenceError(f"cannot read the {table} table under {self.root}: {first}") from exc

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> EvidenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(
        self, sql: str, params: dict[str, Any] | None = None, *, views: tuple[str, ...] | None = None
    ) -> pa.Table:
        """Rows of one SELECT statement; anything else (COPY, SET, ATTACH, a second statement) is refused.
        The views it reads are made first: ``views``, or those it names."""
        try:
            statement = _one_select(sql)
            if views is None:
                self._views_of(sql)
            else:
                self.views(*views)
            return self._con.sql(statement, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise EvidenceError(f"query failed: {str(exc).splitlines()[0]}") from exc

    def batches(self, sql: str, rows: int, *, views: tuple[str, ...]) -> pa.RecordBatchReader:
        """The rows of one SELECT statement over ``views`` as a stream of batches of up to ``rows``
        rows (for results too large to hold at once)."""
        try:
            statement = _one_select(sql)
            self.views(*views)
            return self._con.sql(statement).to_arrow_reader(rows)
        except duckdb.Error as exc:
            raise EvidenceError(f"query failed: {str(exc).splitlines()[0]}") from exc

    # --- canned reports ----------------------------------------------------------------------------

    def who_routed_what(
        self,
        tenant: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        *,
        feature: str | None = None,
        model: str | None = None,
        tier: str | None = None,
        policy_version: str | None = None,
    ) -> pa.Table:
        """Requests by tenant, feature, verdict, tier, deployment and policy version, with the model and
        region that served them and their cost: from the partials the last compaction sealed when they
        still hold (``_rollups``), else the full query (``full_who_routed_what``)."""
        from nexuscore.projections import _rollups

        params = {
            "tenant": tenant,
            "since": since,
            "until": until,
            "feature": feature,
            "model": model,
            "tier": tier,
            "policy_version": policy_version,
        }
        sealed = self._rollup(_rollups.ROUTED)
        if sealed is None:
            return self.full_who_routed_what(**params)  # none, altered, or a file it counted is gone
        self._con.register("_routed_partials", sealed.counts)
        try:
            return self._routed_from_partials(set(sealed.covered), params)
        finally:
            self._con.unregister("_routed_partials")

    def full_who_routed_what(self, **params: Any) -> pa.Table:
        """The report over every decision and outcome (what the sealed partials hold)."""
        names = ("tenant", "since", "until", "feature", "model", "tier", "policy_version")
        return self.query(WHO_ROUTED_WHAT_SQL, {n: params.get(n) for n in names})

    def _rollup(self, rollup: Rollup) -> Sealed | None:
        """The report's partials the last compaction sealed, if they hold and every file they count
        is still in force; else None."""
        from nexuscore.projections import _rollups

        partials = _rollups.current_partials(self.entries, rollup) if self.files else None
        sealed = _rollups.read_partials(self.root, partials, rollup) if partials is not None else None
        in_force = {e["path"] for e in self.files if e.get("table") in rollup.tables}
        return sealed if sealed is not None and set(sealed.covered) <= in_force else None

    def _part_view(self, table: str, covered: set[str], part: str, prefix: str) -> None:
        """The view ``_<prefix>_<part>_<table>`` over the covered (``sealed``) or the other (``tail``)
        files of ``table`` in force. Made only when read: a view reads its files' footers when made."""
        mine = sorted(
            str(e["path"])
            for e in self.files
            if e.get("table") == table and (e["path"] in covered) == (part == "sealed")
        )
        paths = [f"{self.root.absolute()}/{p}" for p in mine]
        self._create_table_view(table, SCHEMAS[table], paths, name=f"_{prefix}_{part}_{table}")

    def _routed_from_partials(self, covered: set[str], params: dict[str, Any]) -> pa.Table:
        """The partials' whole days of the window, and the rest counted from the rows (see ``_rollups``)."""
        days = report_days(params["since"], params["until"])
        params = {**params, **days.params()}
        if self._routed_query(ROUTED_EARLY_SQL, params).column("n")[0].as_py():
            return self.full_who_routed_what(**params)

        def view(table: str, part: str) -> None:
            self._part_view(table, covered, part, "routed")

        view("decisions", "tail")
        view("outcomes", "tail")
        keys = self._routed_query(ROUTED_TAIL_KEYS_SQL, params)
        edges = bool(days.edge_days) and bool(
            self._routed_query(ROUTED_EDGE_SQL, {"tenant": params["tenant"], "edge_days": days.edge_days})
            .column("n")[0]
            .as_py()
        )
        with self._registered("_routed_tail_keys", keys):
            edge_rows = self._routed_edge_rows(params, days, late=keys.num_rows > 0) if edges else None
            raw_edges = edges and edge_rows is None  # the partial days from the tables' rows
            decided = [self._routed_query(ROUTED_TAIL_DECISIONS_SQL, params)]
            if raw_edges:
                view("decisions", "sealed")
                sql = ROUTED_SEALED_BOTH_SQL if keys.num_rows else ROUTED_SEALED_EDGES_SQL
                decided.append(self._routed_query(sql, params))
            elif keys.num_rows:
                decided.append(self._routed_covered("decisions", keys, params, view))
        decisions = pa.concat_tables(decided)
        with (
            self._registered("_routed_decisions", decisions),
            self._registered("_routed_edge_rows", _ROUTED_NO_ROWS if edge_rows is None else edge_rows),
        ):
            outcomes = (
                self._routed_covered("outcomes", decisions, params, view)
                if decisions.num_rows
                else _ROUTED_NO_OUTCOMES
            )
            with self._registered("_routed_outcomes", outcomes):
                return self._routed_query(ROUTED_MERGED_SQL, params)

    def _routed_covered(
        self, table: str, requests: pa.Table, params: dict[str, Any], view: Callable[[str, str], None]
    ) -> pa.Table:
        """The covered rows of ``table`` the report counts for ``requests``: the decisions with an
        outcome in the tail (``_routed_tail_keys``), or every outcome of the decisions counted from
        rows (``_routed_decisions``). Found by the routed keys (``_keyed``), or by a semi join over
        the covered files when those cannot."""
        from nexuscore.projections import _keyed

        keyed = _keyed.DECISIONS if table == "decisions" else _keyed.OUTCOMES
        found_sql, scan_sql = _ROUTED_COVERED[table]
        found = self._keyed_rows(keyed, requests)
        if found is not None:
            with self._registered(f"_routed_found_{table}", found):
                return self._routed_query(found_sql, params)
        view(table, "sealed")
        return self._routed_query(scan_sql, params)

    def _keyed_rows(self, keyed: Keyed, requests: pa.Table) -> pa.Table | None:
        """The covered rows of ``keyed``'s table of the (tenant, request id) pairs of ``requests``,
        from the routed keys the last compaction sealed; None when it sealed none, one does not hold
        its sealed bytes, or the pairs are too many for lookups to beat a scan."""
        from nexuscore.projections import _keyed

        field = _keyed.current(self.entries)
        if field is None or requests.num_rows > _keyed.MAX_KEYS:
            return None
        probes = sorted(
            {
                (t, r)
                for t, r in zip(
                    requests.column("tenant_id").to_pylist(),
                    requests.column("request_id").to_pylist(),
                    strict=True,
                )
                if t is not None and r is not None
            }
        )
        if len(probes) > _keyed.MAX_KEYS:
            return None
        directory = _keyed.Directory.open(self.root, field, keyed)
        found = directory.find(probes) if directory is not None else None
        return None if found is None else _keyed.found_table(probes, found, keyed)

    def _routed_edge_rows(self, params: dict[str, Any], days: ReportDays, *, late: bool) -> pa.Table | None:
        """The sealed routed rows of the window's partial days that the report counts (``_rollups``),
        read from the row groups of the tenant and hours only, but those of decisions with an outcome
        in the tail (``_routed_tail_keys``, when there are any: ``late``), which the tables' rows
        count; None when they cannot stand for the tables' rows (none sealed, one altered, an outcome
        the report leaves out): those days are then counted from the tables."""
        from nexuscore.projections import _rollups

        by_day = _rollups.current_rows(self.entries)
        if by_day is None:
            return None
        # (Request ids, half the decoding, only to match the tail's outcomes.)
        columns = [c for c in _ROUTED_NO_ROWS.column_names if late or c != "request_id"]
        # A day without a file had no decision, as its partials then show (else something is off).
        counted = self._routed_query(ROUTED_EDGE_DAYS_SQL, {"edge_days": days.edge_days}).column("day")
        spans = list(days.edges)
        read = []
        for day in counted.to_pylist():
            entry = by_day.get(day)
            rows = (
                None
                if entry is None
                else _rollups.read_rows(self.root, entry, params["tenant"], spans, columns)
            )
            if rows is None:
                return None
            read.append(rows)
        if not read:
            return _ROUTED_NO_ROWS
        try:
            candidates = pa.concat_tables(read)
        except pa.ArrowInvalid:
            return None
        with self._registered("_routed_rows_read", candidates):
            edge_rows = self._routed_query(ROUTED_EDGE_ROWS_SQL, params)
        if late:
            with self._registered("_routed_edge_rows", edge_rows):
                edge_rows = self._routed_query(ROUTED_EDGE_ROWS_NOT_LATE_SQL, params)
        with self._registered("_routed_edge_rows", edge_rows):
            early = self._routed_query(ROUTED_EDGE_ROWS_EARLY_SQL, params).column("n")[0].as_py()
        return None if early else edge_rows

    @contextlib.contextmanager
    def _registered(self, name: str, table: pa.Table) -> Iterator[None]:
        """``table`` readable as ``name`` for the block's queries."""
        self._con.register(name, table)
        try:
            yield
        finally:
            self._con.unregister(name)

    def _routed_query(self, sql: str, params: dict[str, Any]) -> pa.Table:
        """``query`` with the parameters ``sql`` names (DuckDB refuses any other); it reads the
        report's own views and tables only."""
        named = set(re.findall(r"\$(\w+)", sql))
        return self.query(sql, {k: v for k, v in params.items() if k in named}, views=())

    def spend(
        self, tenant: str | None = None, since: datetime | None = None, until: datetime | None = None
    ) -> pa.Table:
        """Spend by tenant, feature, day and model, with the tenant's daily budget and its use: from the
        partials the last compaction sealed when they still hold (``_rollups``), else in full."""
        from nexuscore.projections import _rollups

        params: dict[str, Any] = {"tenant": tenant, "since": since, "until": until}
        sealed = self._rollup(_rollups.SPEND)
        if sealed is None:
            return self.full_spend(tenant, since, until)
        days = report_days(since, until)
        params = {**params, **days.params(), "edge_days": days.edge_days}
        covered = set(sealed.covered)
        self._con.register("_spend_partials", sealed.counts)
        try:
            for table in ("outcomes", "settlements", "decisions"):
                self._part_view(table, covered, "tail", "spend")
            counted = [self._routed_query(SPEND_TAIL_SQL, params)]
            if days.edge_days and self._routed_query(SPEND_EDGE_DAYS_SQL, params).column("n")[0].as_py():
                self._part_view("outcomes", covered, "sealed", "spend")
                counted.append(self._routed_query(SPEND_EDGES_SQL, params))
            self._con.register("_spend_rows", pa.concat_tables(counted))
            try:
                return self._routed_query(SPEND_MERGED_SQL, params)
            finally:
                self._con.unregister("_spend_rows")
        finally:
            self._con.unregister("_spend_partials")

    def full_spend(
        self, tenant: str | None = None, since: datetime | None = None, until: datetime | None = None
    ) -> pa.Table:
        """``spend`` over every outcome, settlement and decision (what the sealed partials hold)."""
        return self.query(SPEND_SQL, {"tenant": tenant, "since": since, "until": until})

    def residency(self, tenant: str | None = None) -> pa.Table:
        """Every call outside its tenant's home region or without a decision, one row each."""
        return self.query(RESIDENCY_SQL, {"tenant": tenant})

    def residency_summary(self, tenant: str | None = None) -> pa.Table:
        """``residency`` counted: calls per finding, tenant, event, route and basis. From the
        partials the last compaction sealed when they still hold (``_residency``), else in full."""
        from nexuscore.projections import _residency

        partials = _residency.current_partials(self.entries) if self.files else None
        sealed = _residency.read_partials(self.root, partials) if partials is not None else None
        in_force = {e["path"]: e for e in self.files if e.get("table") in _residency.RESIDENCY_TABLES}
        if sealed is None or not set(sealed.covered) <= set(in_force):
            return self.full_residency_summary(tenant)  # none, altered, or a file it counted is gone
        params = {"tenant": tenant}
        self._con.register("_sealed_residency", sealed.counts)
        try:
            if len(sealed.covered) == len(in_force):
                return self.query(RESIDENCY_SEALED_SQL, params)
            return self._residency_with_tail(sealed, in_force, tenant)
        finally:
            self._con.unregister("_sealed_residency")

    def _residency_with_tail(
        self, sealed: SealedResidency, in_force: dict[str, dict[str, Any]], tenant: str | None
    ) -> pa.Table:
        """The sealed counts plus the tail's (the files the partials do not cover), or the full
        summary when a decision in the tail changed the finding of a covered call."""
        covered, params = set(sealed.covered), {"tenant": tenant}

        def view(table: str, name: str, *, tail: bool) -> None:
            mine = sorted(p for p, e in in_force.items() if e["table"] == table and (p in covered) != tail)
            self._create_table_view(
                table, SCHEMAS[table], [f"{self.root.absolute()}/{p}" for p in mine], name=name
            )

        # The tail read once, its columns the summary uses: it is few rows in many small files (each
        # a footer to read), which the queries below would each open again.
        for table, columns in _TAIL_COLUMNS.items():
            self._con.register(f"_tail_{table}", self._tail_rows(table, columns, in_force, covered))
        view("decisions", "_sealed_decisions", tail=False)
        self._con.register("_found_decisions", self.query(RESIDENCY_FOUND_SQL, params))
        self._con.register("_orphans", sealed.orphans if sealed.orphans is not None else _NO_ORPHANS)
        try:
            stale = self.query(RESIDENCY_STALE_SQL, params).column("n")[0].as_py()
            tail_decisions = any(e["table"] == "decisions" and p not in covered for p, e in in_force.items())
            if not stale and sealed.orphans is None and tail_decisions:
                for table in ("attempts", "outcomes", "dispatches"):
                    view(table, f"_sealed_{table}", tail=False)
                stale = self.query(RESIDENCY_STALE_SCAN_SQL, params).column("n")[0].as_py()
            return self.full_residency_summary(tenant) if stale else self.query(RESIDENCY_MERGED_SQL, params)
        finally:
            for name in ("_found_decisions", "_orphans", *(f"_tail_{t}" for t in _TAIL_COLUMNS)):
                self._con.unregister(name)

    def _tail_rows(
        self, table: str, columns: str, in_force: dict[str, dict[str, Any]], covered: set[str]
    ) -> pa.Table:
        """``columns`` of the table's files the partials do not cover, read in one pass."""
        paths = sorted(
            f"{self.root.absolute()}/{p}"
            for p, e in in_force.items()
            if e["table"] == table and p not in covered
        )
        if not paths:
            return SCHEMAS[table].empty_table().select([c.strip() for c in columns.split(",")])
        source = f"read_parquet({sql_list(paths)}, hive_partitioning = false, union_by_name = true)"
        try:
            return self._con.sql(f"SELECT {columns} FROM {source}").to_arrow_table()  # noqa: S608  # ours
        except duckdb.Error:
            # Files of an older version without one of these columns: through a view, which adds it.
            self._create_table_view(table, SCHEMAS[table], paths, name=f"_tail_files_{table}")
            return self._con.sql(f"SELECT {columns} FROM _tail_files_{table}").to_arrow_table()  # noqa: S608

    def full_residency_summary(self, tenant: str | None = None) -> pa.Table:
        """The residency summary counted over every call (what the sealed partials hold)."""
        return self.query(RESIDENCY_SUMMARY_SQL, {"tenant": tenant})

    def escalations(self, tenant: str | None = None, state: str | None = None) -> pa.Table:
        return self.query(
            "SELECT * FROM escalations WHERE ($tenant IS NULL OR tenant_id = $tenant) "
            "AND ($state IS NULL OR review_state = $state) ORDER BY escalated_at",
            {"tenant": tenant, "state": state},
        )

    def lineage(self, request_id: str, tenant: str | None = None) -> pa.Table:
        """Every event of one request, in order, each with what it says in one line.

        Request ids are unique per tenant only: without ``tenant``, an id that several tenants used
        is an error naming them.
        """
        from nexuscore.projections._index import current_index
        from nexuscore.projections._lineage import lineage

        # The direct path, not the views: the same rows from the same committed files (through the
        # request index, for the files it covers).
        index = current_index(self.entries)
        return lineage(self.root, self.files, self.keystore, request_id, tenant, index=index)

    def terminal_summary(self) -> dict[str, int]:
        """Requests seen, requests with a terminal state, and requests with more than one."""
        self.views("terminal_states", "requests", "deadletters")
        rows = self._con.execute(
            """
            WITH t AS (SELECT tenant_id, request_id, count(*) AS n FROM terminal_states GROUP BY ALL),
                 r AS (SELECT DISTINCT tenant_id, request_id FROM requests)
            SELECT (SELECT count(*) FROM r),
                   (SELECT count(*) FROM r JOIN t USING (tenant_id, request_id)),
                   (SELECT count(*) FROM t WHERE n > 1),
                   (SELECT count(*) FROM deadletters)
            """
        ).fetchall()
        row = rows[0]
        return {"requests": row[0], "terminal": row[1], "multiple_terminal": row[2], "deadletters": row[3]}


@dataclass(frozen=True)
class ReportDays:
    """A report's window [since, until) as whole UTC days and the partial days at its ends."""

    since: datetime | None
    until: datetime | None
    first_day: date | None  # the first whole day (None: unbounded)
    end_day: date | None  # the day after the last whole day (None: unbounded)
    edges: tuple[tuple[datetime, datetime], ...]  # the partial days' parts inside the window

    @property
    def edge_days(self) -> list[date]:
        return sorted({start.date() for start, _ in self.edges})

    def params(self) -> dict[str, Any]:
        """The query parameters of the whole days and of (up to two) partial days."""
        edges = [*self.edges, (None, None), (None, None)]
        return {
            "first_day": self.first_day,
            "end_day": self.end_day,
            "whole_from": _midnight(self.first_day),
            "whole_to": _midnight(self.end_day),
            "edge1_from": edges[0][0],
            "edge1_to": edges[0][1],
            "edge2_from": edges[1][0],
            "edge2_to": edges[1][1],
        }


def report_days(since: datetime | None, until: datetime | None) -> ReportDays:
    """The whole days and partial days of [since, until) (times without a zone are UTC, as DuckDB
    reads them in the store's session)."""
    since = None if since is None else _utc(since)
    until = None if until is None else _utc(until)
    first = None if since is None else _next_midnight(since)
    end = None if until is None else until.date()
    if since is not None and until is not None and until <= since:
        return ReportDays(since, until, first, first, ())  # an empty window: no day at all
    if since is not None and until is not None and first is not None and end is not None and first >= end:
        # No whole day: the window is one partial day, or the two ends of adjacent days.
        cut = datetime.combine(first, time(0), UTC)
        parts = ((since, cut), (cut, until)) if since < cut < until else ((since, until),)
        return ReportDays(since, until, first, first, parts)
    edges = []
    if since is not None and first is not None and since < datetime.combine(first, time(0), UTC):
        edges.append((since, datetime.combine(first, time(0), UTC)))
    if until is not None and end is not None and datetime.combine(end, time(0), UTC) < until:
        edges.append((datetime.combine(end, time(0), UTC), until))
    return ReportDays(since, until, first, end, tuple(edges))


def _base_tables(node: object) -> set[str]:
    """The names of the tables (``BASE_TABLE`` nodes) in a parse tree of ``json_serialize_sql``."""
    found: set[str] = set()
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.get("type") == "BASE_TABLE" and isinstance(item.get("table_name"), str):
                found.add(item["table_name"].lower())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def _midnight(day: date | None) -> datetime | None:
    return None if day is None else datetime.combine(day, time(0), UTC)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _next_midnight(moment: datetime) -> date:
    """The first midnight at or after ``moment`` (UTC), as its day."""
    day = moment.date()
    return day if moment == datetime.combine(day, time(0), UTC) else day + timedelta(days=1)


# The one finding of the residency audit that is allowed: a call outside the tenant's home region
# but inside the regions its decision allowed, under a transfer basis.
ALLOWED_RESIDENCY_FINDING = "cross_border"


def residency_breaches(residency: pa.Table) -> int:
    """Calls of the residency audit that are breaches: outside the regions their decision allowed,
    or without a decision (every finding but an allowed cross-border call). Takes the audit's rows
    (one per call) or its summary (a ``calls`` count per row)."""
    findings = residency.column("finding").to_pylist()
    calls = (
        residency.column("calls").to_pylist() if "calls" in residency.column_names else [1] * len(findings)
    )
    return sum(n for f, n in zip(findings, calls, strict=True) if f != ALLOWED_RESIDENCY_FINDING)


def sql_list(items: list[str]) -> str:
    """A DuckDB list literal of file paths, quoted."""
    return "[" + ", ".join("'" + i.replace("'", "''") + "'" for i in items) + "]"


def sandbox(paths: list[str], settings: Mapping[str, object] | None = None) -> duckdb.DuckDBPyConnection:
    """A connection that may read ``paths`` and nothing else, and cannot be talked out of it;
    ``settings`` (DuckDB option names, ours, and their values) are set before it is locked.

    External access off with ``allowed_paths`` leaves exactly these files readable (no other file,
    no ``_keys/``, no URL); extensions neither load nor install; the locked configuration stops a
    query from turning any of that back on. ``allowed_paths`` would still let a COPY or an ATTACH
    write to these very files, which is why ``query`` runs nothing but SELECT.
    """
    con = duckdb.connect(
        config={
            "autoload_known_extensions": False,
            "autoinstall_known_extensions": False,
            "python_enable_replacements": False,  # no reading the caller's Python variables either
        }
    )
    try:
        con.execute("SET TimeZone = 'UTC'")
        # Footers read once (when the views are made) serve every later query of this connection.
        con.execute("SET parquet_metadata_cache = true")
        for name, value in (settings or {}).items():
            con.execute(f"SET {name} = $value", {"value": value})
        con.execute("SET allowed_paths = $paths", {"paths": paths})
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except duckdb.Error:
        con.close()
        raise
    return con


def _one_select(sql: str) -> duckdb.Statement:
    """The one SELECT statement ``sql`` holds (parsed once, run as parsed), or an EvidenceError."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise EvidenceError(f"query failed: {str(exc).splitlines()[0]}") from exc
    if len(statements) != 1:
        raise EvidenceError(f"evidence queries are read-only: one SELECT statement, not {len(statements)}")
    if statements[0].type != duckdb.StatementType.SELECT:
        kind = statements[0].type.name
        raise EvidenceError(f"evidence queries are read-only: one SELECT statement, not {kind}")
    return statements[0]


def _table_path(entry: dict[str, Any], root: Path) -> str:
    """The entry's path, if it names a Parquet file of its table and region (no ``..``, no ``_keys``)."""
    if not is_table_path(entry):
        raise EvidenceError(
            f"a manifest entry under {root} names {entry.get('path')!r}, not a file of its table "
            "(run `nexuscore evidence verify`)"
        )
    return str(entry["path"])


def is_table_path(entry: dict[str, Any]) -> bool:
    """Does the entry's path name a Parquet file directly in its own ``region=<r>/<table>/`` folder?"""
    path, table, region = entry.get("path"), entry.get("table"), entry.get("region")
    if not (isinstance(path, str) and isinstance(table, str) and isinstance(region, str)):
        return False
    if table not in SCHEMAS or "/" in region or region in {"", ".", ".."}:
        return False
    return re.fullmatch(rf"region={re.escape(region)}/{re.escape(table)}/[^/]+\.parquet", path) is not None
