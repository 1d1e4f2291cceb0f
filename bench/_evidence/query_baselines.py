"""The simplest correct answers to the store's queries, with pyarrow.dataset and pyarrow.compute only.

What ``EvidenceStore``'s views (DuckDB over the committed Parquet files) are measured against: the
same answers from the same committed files, with no bloom filters, no row-group pruning beyond
Parquet statistics, and no SQL.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from bench._evidence.synthetic import TS
from nexuscore.projections import FieldCipher, LocalKeyStore, committed_files


def _paths(root: Path) -> dict[str, list[str]]:
    by_table: dict[str, list[str]] = defaultdict(list)
    for e in committed_files(root):
        by_table[e["table"]].append(str(root / e["path"]))
    return by_table


def baseline_who_routed_what(root: Path, tenant: str, since: datetime, until: datetime) -> pa.Table:
    """who_routed_what with pyarrow.dataset/compute only: the simplest correct code."""
    paths = _paths(root)
    dec = ds.dataset(paths["decisions"], format="parquet").to_table(
        columns=[
            "request_id",
            "tenant_id",
            "feature",
            "verdict",
            "tier",
            "deployment_id",
            "policy_version",
            "estimated_cost_micros",
        ],
        filter=(pc.field("tenant_id") == tenant)
        & (pc.field("occurred_at") >= pa.scalar(since, TS))
        & (pc.field("occurred_at") < pa.scalar(until, TS)),
    )
    out = ds.dataset(paths["outcomes"], format="parquet").to_table(
        columns=["request_id", "model", "region", "status", "cost_micros"]
    )
    j = dec.join(out, keys="request_id", join_type="left outer")
    j = j.append_column(
        "answered", pc.cast(pc.fill_null(pc.equal(j["status"], "answered"), False), pa.int64())
    )
    j = j.append_column(
        "est_dispatch", pc.if_else(pc.equal(j["verdict"], "dispatch"), j["estimated_cost_micros"], None)
    )
    keys = ["tenant_id", "feature", "verdict", "tier", "deployment_id", "policy_version"]
    g = j.group_by(keys, use_threads=True).aggregate(
        [
            ("model", "min"),
            ("region", "min"),
            ("request_id", "count", pc.CountOptions(mode="all")),
            ("answered", "sum"),
            ("est_dispatch", "sum"),
            ("cost_micros", "sum"),
        ]
    )
    names = {
        "model_min": "model",
        "region_min": "region",
        "request_id_count": "requests",
        "answered_sum": "answered",
        "est_dispatch_sum": "est",
        "cost_micros_sum": "cost",
    }
    g = g.rename_columns([names.get(c, c) for c in g.column_names])
    return g.sort_by([("tenant_id", "ascending"), ("feature", "ascending"), ("requests", "descending")])


def baseline_spend(root: Path) -> pa.Table:
    paths = _paths(root)
    out = ds.dataset(paths["outcomes"], format="parquet").to_table(
        columns=[
            "tenant_id",
            "feature",
            "occurred_at",
            "model",
            "input_tokens",
            "output_tokens",
            "cost_micros",
        ]
    )
    out = out.append_column("day", pc.cast(out["occurred_at"], pa.date32()))
    spend = out.group_by(["tenant_id", "feature", "day", "model"]).aggregate(
        [
            ("cost_micros", "count", pc.CountOptions(mode="all")),
            ("input_tokens", "sum"),
            ("output_tokens", "sum"),
            ("cost_micros", "sum"),
        ]
    )
    spend = spend.append_column("window", pc.strftime(pc.cast(spend["day"], TS), "%Y-%m-%d"))
    st = ds.dataset(paths["settlements"], format="parquet").to_table(
        columns=["tenant_id", "budget_window", "tenant_spent_micros"]
    )
    budget = st.group_by(["tenant_id", "budget_window"]).aggregate([("tenant_spent_micros", "max")])
    dec = ds.dataset(paths["decisions"], format="parquet").to_table(
        columns=["tenant_id", "budget_window", "tenant_budget_micros"]
    )
    limits = dec.group_by(["tenant_id", "budget_window"]).aggregate([("tenant_budget_micros", "max")])
    j = spend.join(budget, keys=["tenant_id", "window"], right_keys=["tenant_id", "budget_window"]).join(
        limits, keys=["tenant_id", "window"], right_keys=["tenant_id", "budget_window"]
    )
    return j.sort_by(
        [("day", "ascending"), ("tenant_id", "ascending"), ("feature", "ascending"), ("model", "ascending")]
    )


def baseline_lineage(root: Path, request_id: str) -> list[dict[str, Any]]:
    """The lineage rows with pyarrow.dataset filters (no bloom filters, no DuckDB), same details."""
    from nexuscore.projections import _lineage

    paths = _paths(root)
    keystore = LocalKeyStore(root / "_keys")
    cipher = FieldCipher(keystore)
    holder = SimpleNamespace(keystore=keystore)
    rows = []
    for table in _lineage._ORDER:
        if not paths.get(table):
            continue
        found = (
            ds.dataset(paths[table], format="parquet")
            .to_table(filter=pc.field("request_id") == request_id)
            .sort_by("src_offset")
            .to_pylist()
        )
        for r in found:
            rows.append(
                {
                    "occurred_at": r["occurred_at"],
                    "event": table,
                    "event_id": r["event_id"],
                    "detail": _lineage._detail(holder, cipher, table, r),  # type: ignore[arg-type]
                }
            )
    rows.sort(key=lambda x: (x["occurred_at"], _lineage._ORDER.index(x["event"])))
    return rows
