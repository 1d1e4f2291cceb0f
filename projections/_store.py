"""The evidence store: DuckDB views over the Parquet tables, and the canned reports."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from nexuscore.errors import EvidenceError
from nexuscore.projections._tables import SCHEMAS

# Reasons are keyed by (decision, position); a request by its request id (a client may retry it
# under a new event id); every other table by its event id.
_DEDUP_KEY = {"decision_reasons": "event_id, seq", "requests": "request_id"}

TERMINAL_STATES_SQL = """
CREATE OR REPLACE VIEW terminal_states AS
SELECT request_id, tenant_id, status AS state, occurred_at FROM outcomes
UNION ALL
SELECT request_id, tenant_id, 'rejected' AS state, occurred_at FROM rejections
UNION ALL
SELECT request_id, tenant_id, verdict AS state, occurred_at FROM decisions WHERE verdict IN ('denied', 'escalated')
"""

WHO_ROUTED_WHAT_SQL = """
SELECT d.tenant_id, d.feature, d.verdict, d.tier, d.deployment_id,
       any_value(o.region) FILTER (WHERE o.region IS NOT NULL) AS region,
       d.policy_version,
       count(*) AS requests,
       count(o.request_id) FILTER (WHERE o.status = 'answered') AS answered,
       round(sum(d.estimated_cost_micros) FILTER (WHERE d.verdict = 'dispatch') / 1e6, 6) AS estimated_usd,
       round(coalesce(sum(o.cost_micros), 0) / 1e6, 6) AS actual_usd
FROM decisions d
LEFT JOIN outcomes o USING (request_id)
WHERE ($tenant IS NULL OR d.tenant_id = $tenant) AND ($since IS NULL OR d.occurred_at >= $since)
GROUP BY ALL
ORDER BY d.tenant_id, d.feature, requests DESC
"""


class EvidenceStore:
    """An in-memory DuckDB connection with one view per evidence table, deduplicated by event id."""

    def __init__(self, root: Path) -> None:
        if not root.is_dir():
            raise EvidenceError(f"no evidence at {root} (run the pipeline or pass --evidence-dir)")
        self.root = root
        self.con = duckdb.connect()
        for table, schema in SCHEMAS.items():
            files = sorted((root / table).glob("*.parquet"))
            if files:
                key = _DEDUP_KEY.get(table, "event_id")
                source = f"read_parquet({_sql_list([str(f) for f in files])})"
                self._create_view(
                    table,
                    f"CREATE VIEW {table} AS SELECT * EXCLUDE (_rn) FROM ("  # noqa: S608  # names are ours
                    f"SELECT *, row_number() OVER (PARTITION BY {key} ORDER BY src_offset) AS _rn FROM {source}"
                    ") WHERE _rn = 1"
                )
            else:
                self.con.register(f"_empty_{table}", schema.empty_table())
                self.con.execute(f"CREATE VIEW {table} AS SELECT * FROM _empty_{table}")  # noqa: S608
        self.con.execute(TERMINAL_STATES_SQL)

    def _create_view(self, table: str, sql: str) -> None:
        try:
            self.con.execute(sql)
        except duckdb.Error as exc:
            self.con.close()
            first = str(exc).splitlines()[0]
            raise EvidenceError(f"cannot read the {table} table under {self.root}: {first}") from exc

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> EvidenceStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(self, sql: str, params: dict[str, Any] | None = None) -> pa.Table:
        try:
            return self.con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.Error as exc:
            raise EvidenceError(f"query failed: {str(exc).splitlines()[0]}") from exc

    def who_routed_what(self, tenant: str | None = None, since: datetime | None = None) -> pa.Table:
        return self.query(WHO_ROUTED_WHAT_SQL, {"tenant": tenant, "since": since})

    def terminal_summary(self) -> dict[str, int]:
        """Requests seen, requests with a terminal state, and requests with more than one."""
        rows = self.con.execute(
            """
            WITH t AS (SELECT request_id, count(*) AS n FROM terminal_states GROUP BY request_id)
            SELECT (SELECT count(*) FROM requests),
                   (SELECT count(*) FROM requests r JOIN t USING (request_id)),
                   (SELECT count(*) FROM t WHERE n > 1),
                   (SELECT count(*) FROM deadletters)
            """
        ).fetchall()
        row = rows[0]
        return {"requests": row[0], "terminal": row[1], "multiple_terminal": row[2], "deadletters": row[3]}


def _sql_list(items: list[str]) -> str:
    return "[" + ", ".join("'" + i.replace("'", "''") + "'" for i in items) + "]"
