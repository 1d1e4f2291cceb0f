"""The evidence tables: their columns (documented in the README) and how each event becomes a row.

One event, one row, so that a row is a leaf of its file's Merkle tree and an event's proof is one
path (a decision's reasons are a nested list; the ``decision_reasons`` view unnests them). Rows are
built from the decoded Avro records directly (no Struct in between): this is the projector's hot
path. Content (prompts, responses, raw dead-lettered bytes) arrives here already encrypted.
"""

from __future__ import annotations

import array
import itertools
import operator
from collections.abc import Callable, Sequence
from typing import Any

import pyarrow as pa

from nexuscore.schemas import (
    ActRefused,
    BudgetSettled,
    CircuitStateChanged,
    DeadLettered,
    DispatchRequested,
    EscalationResolved,
    Event,
    InferenceRequested,
    KillSwitchChanged,
    ModelCallAttempted,
    OutcomeRecorded,
    PolicyStageChanged,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
    ShadowDecisionRecorded,
)

_TS = pa.timestamp("us", tz="UTC")
_STRS = pa.list_(pa.string())
_SOURCE = [
    ("data_region", pa.string()),
    ("src_topic", pa.string()),
    ("src_partition", pa.int32()),
    ("src_offset", pa.int64()),
]
_REASON = pa.struct(
    [
        ("seq", pa.int32()),
        ("stage", pa.string()),
        ("kind", pa.string()),
        ("subject", pa.string()),
        ("detail", pa.string()),
    ]
)
_OBSERVATION = pa.struct(
    [
        ("deployment_id", pa.string()),
        ("strategy", pa.string()),
        ("p50_ms", pa.int64()),
        ("p95_ms", pa.int64()),
        ("samples", pa.int64()),
    ]
)
_ENVELOPE = [
    ("event_id", pa.string()),
    ("request_id", pa.string()),
    ("tenant_id", pa.string()),
    ("occurred_at", _TS),
    ("producer", pa.string()),
    ("causation_id", pa.string()),
    ("trace_id", pa.string()),
    ("policy_digest", pa.string()),
]


def _schema(*fields: tuple[str, pa.DataType]) -> pa.Schema:
    return pa.schema([*_ENVELOPE, *fields, *_SOURCE])


SCHEMAS: dict[str, pa.Schema] = {
    "requests": _schema(
        ("feature", pa.string()),
        ("task_type", pa.string()),
        ("risk_class", pa.string()),
        ("data_classification", pa.string()),
        ("prompt", pa.binary()),
        ("prompt_key", pa.string()),
        ("prompt_chars", pa.int64()),
        ("max_output_tokens", pa.int64()),
        ("required_capabilities", _STRS),
        ("complexity", pa.float64()),
        ("latency_slo_ms", pa.int64()),
        ("data_subject", pa.string()),
    ),
    "decisions": _schema(
        ("feature", pa.string()),
        ("verdict", pa.string()),
        ("verdict_reason", pa.string()),
        ("policy_version", pa.string()),
        ("home_region", pa.string()),
        ("allowed_regions", _STRS),
        ("residency_rule", pa.string()),
        ("transfer_basis", pa.string()),
        ("complexity", pa.float64()),
        ("floor_tier", pa.string()),
        ("preferred_tier", pa.string()),
        ("tier", pa.string()),
        ("deployment_id", pa.string()),
        ("eligible", _STRS),
        ("budget_action", pa.string()),
        ("budget_window", pa.string()),
        ("estimated_cost_micros", pa.int64()),
        ("tenant_budget_micros", pa.int64()),
        ("tenant_committed_micros", pa.int64()),
        ("feature_budget_micros", pa.int64()),
        ("feature_committed_micros", pa.int64()),
        ("decode_strategy", pa.string()),
        ("latency_slo_ms", pa.int64()),
        ("predicted_latency_ms", pa.int64()),
        ("fits_slo", pa.bool_()),
        ("state_version", pa.int64()),
        ("reasons", pa.list_(_REASON)),
        ("policy_stage", pa.string()),
        ("confidence", pa.float64()),
        ("fallbacks", _STRS),
        ("latency_basis", pa.string()),
        ("latency_observations", pa.list_(_OBSERVATION)),
        ("review_deadline", _TS),
        ("control_mode", pa.string()),
    ),
    "resolutions": _schema(
        ("feature", pa.string()),
        ("resolution", pa.string()),
        ("review_event_id", pa.string()),
        ("reviewer", pa.string()),
        ("review_reason", pa.string()),
        ("verdict_reason", pa.string()),
        ("policy_version", pa.string()),
        ("deployment_id", pa.string()),
        ("budget_action", pa.string()),
        ("estimated_cost_micros", pa.int64()),
        ("decode_strategy", pa.string()),
        ("state_version", pa.int64()),
        ("reasons", pa.list_(_REASON)),
    ),
    "rejections": _schema(
        ("reason_code", pa.string()),
        ("reason", pa.string()),
        ("policy_version", pa.string()),
        ("policy_stage", pa.string()),
    ),
    "shadow_decisions": _schema(
        ("active_digest", pa.string()),
        ("policy_version", pa.string()),
        ("verdict", pa.string()),
        ("verdict_reason", pa.string()),
        ("tier", pa.string()),
        ("deployment_id", pa.string()),
        ("estimated_cost_micros", pa.int64()),
        ("decode_strategy", pa.string()),
        ("allowed_regions", _STRS),
        ("differs", pa.bool_()),
    ),
    "dispatches": _schema(
        ("feature", pa.string()),
        ("deployment_id", pa.string()),
        ("provider", pa.string()),
        ("model", pa.string()),
        ("region", pa.string()),
        ("allowed_regions", _STRS),
        ("decode_strategy", pa.string()),
        ("max_output_tokens", pa.int64()),
        ("estimated_cost_micros", pa.int64()),
        ("requested_at", _TS),
        ("data_subject", pa.string()),
        ("fallbacks", _STRS),
        ("latency_slo_ms", pa.int64()),
        ("predicted_latency_ms", pa.int64()),
    ),
    "attempts": _schema(
        ("attempt", pa.int32()),
        ("deployment_id", pa.string()),
        ("region", pa.string()),
        ("status", pa.string()),
        ("http_status", pa.int32()),
        ("latency_ms", pa.float64()),
        ("retryable", pa.bool_()),
        ("error", pa.string()),
    ),
    "outcomes": _schema(
        ("status", pa.string()),
        ("feature", pa.string()),
        ("deployment_id", pa.string()),
        ("model", pa.string()),
        ("model_version", pa.string()),
        ("region", pa.string()),
        ("attempts", pa.int32()),
        ("input_tokens", pa.int64()),
        ("output_tokens", pa.int64()),
        ("cost_micros", pa.int64()),
        ("latency_ms", pa.float64()),
        ("response", pa.binary()),
        ("response_key", pa.string()),
        ("finish_reason", pa.string()),
        ("error", pa.string()),
        ("data_subject", pa.string()),
        ("decode_strategy", pa.string()),
        ("latency_slo_ms", pa.int64()),
        ("predicted_latency_ms", pa.int64()),
        ("cached", pa.bool_()),
        ("cached_from", pa.string()),
        ("skipped", _STRS),
    ),
    "settlements": _schema(
        ("feature", pa.string()),
        ("budget_window", pa.string()),
        ("reserved_micros", pa.int64()),
        ("actual_micros", pa.int64()),
        ("tenant_spent_micros", pa.int64()),
        ("feature_spent_micros", pa.int64()),
        ("state_version", pa.int64()),
    ),
    "deadletters": _schema(
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("reason", pa.string()),
        ("raw_key", pa.binary()),
        ("raw_value", pa.binary()),
        ("raw_value_key", pa.string()),
        ("raw_size", pa.int64()),
        ("raw_sha256", pa.string()),
    ),
    "reviews": _schema(
        ("action", pa.string()),
        ("reviewer", pa.string()),
        ("reason", pa.string()),
        ("deadline", _TS),
        ("key_id", pa.string()),
    ),
    "policy_events": _schema(
        ("policy_version", pa.string()),
        ("from_stage", pa.string()),
        ("to_stage", pa.string()),
        ("actor", pa.string()),
        ("signers", _STRS),
        ("replay_report_digest", pa.string()),
        ("reason", pa.string()),
        ("canary_share", pa.float64()),
        ("document", pa.string()),
        ("signatures", pa.string()),
        ("replay_report", pa.string()),
        ("key_id", pa.string()),
        ("signature", pa.string()),
    ),
    "circuit_events": _schema(
        ("deployment_id", pa.string()),
        ("region", pa.string()),
        ("from_state", pa.string()),
        ("to_state", pa.string()),
        ("reason", pa.string()),
        ("consecutive_failures", pa.int64()),
        ("open_until", _TS),
    ),
    "kill_switches": _schema(
        ("scope", pa.string()),
        ("target", pa.string()),
        ("mode", pa.string()),
        ("actor", pa.string()),
        ("reason", pa.string()),
        ("key_id", pa.string()),
        ("signature", pa.string()),
    ),
    "refusals": _schema(
        ("act", pa.string()),
        ("act_event_id", pa.string()),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
        ("key_id", pa.string()),
        ("claimed_actor", pa.string()),
        ("code", pa.string()),
        ("reason", pa.string()),
    ),
}

TABLES = tuple(SCHEMAS)
_SOURCE_COLUMNS = ("data_region", "src_topic", "src_partition", "src_offset")
assert all(s.names[-4:] == list(_SOURCE_COLUMNS) for s in SCHEMAS.values())
_OWN_NAMES = {table: tuple(schema.names[:-4]) for table, schema in SCHEMAS.items()}
_OWN_GETTERS = {table: operator.itemgetter(*names) for table, names in _OWN_NAMES.items()}
_GETTERS = {table: operator.itemgetter(*schema.names) for table, schema in SCHEMAS.items()}
# Column positions by name, per table.
POSITIONS: dict[str, dict[str, int]] = {t: {n: i for i, n in enumerate(s.names)} for t, s in SCHEMAS.items()}
Row = dict[str, Any]
Rows = list[tuple[str, Row]]


def row_values(table: str, row: Row) -> tuple[Any, ...]:
    """A row as the tuple of its column values in schema order: what a flush holds per row (a
    tuple is a fifth of a dict's size, and transposes to columns without a lookup)."""
    try:
        return _GETTERS[table](row)  # type: ignore[no-any-return]
    except KeyError:  # a row without some column (none of the builders makes one): null there
        return tuple(row.get(name) for name in SCHEMAS[table].names)


def sourced_values(table: str, row: Row, source: tuple[str, str, int, int]) -> tuple[Any, ...]:
    """``row_values`` of a row without its source columns, given them apart: (data_region,
    src_topic, src_partition, src_offset), the last columns of every table (no dict update a row)."""
    try:
        return _OWN_GETTERS[table](row) + source  # type: ignore[no-any-return]
    except KeyError:
        return tuple(row.get(name) for name in _OWN_NAMES[table]) + source


def to_columns(table: str, values: Sequence[tuple[Any, ...]]) -> list[list[Any]]:
    """Rows of ``row_values`` as one list per column (schema order)."""
    if not values:
        return [[] for _ in SCHEMAS[table].names]
    return [list(c) for c in zip(*values, strict=True)]


def to_table(table: str, columns: Sequence[Sequence[Any]]) -> pa.Table:
    """The Arrow table of one file from its columns: no ``Table.from_pylist``."""
    schema = SCHEMAS[table]
    arrays = [_array(c, f.type) for c, f in zip(columns, schema, strict=True)]
    return pa.Table.from_arrays(arrays, schema=schema)


def columnar(table: str, rows: list[Row]) -> tuple[pa.Table, list[list[Any]]]:
    """Row dicts as (Arrow table, columns): ``to_table(to_columns(row_values ...))`` in one call."""
    columns = to_columns(table, [row_values(table, r) for r in rows])
    return to_table(table, columns), columns


def _array(values: Sequence[Any], kind: pa.DataType) -> pa.Array:
    if kind == pa.binary() and all(type(v) is bytes for v in values):
        # Content columns carry kilobytes a row: one join and an offsets buffer beat the builder.
        offsets = array.array("i", [0])
        offsets.extend(itertools.accumulate(map(len, values)))
        if offsets[-1] < 2**31:
            return pa.Array.from_buffers(
                kind, len(values), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
            )
    return pa.array(values, type=kind)


def _flat(record: dict[str, Any], names: tuple[str, ...]) -> Row:
    return {n: record.get(n) for n in names}


def _fields(table: str) -> tuple[str, ...]:
    return tuple(f.name for f in SCHEMAS[table] if f.name not in _SOURCE_NAMES)


_SOURCE_NAMES = {n for n, _ in _SOURCE}


_REQ = _fields("requests")
_REJ = _fields("rejections")
_DISP = _fields("dispatches")
_ATT = _fields("attempts")
_OUT = _fields("outcomes")
_DL = _fields("deadletters")
_REV = _fields("reviews")
_POL = _fields("policy_events")
_SHADOW = _fields("shadow_decisions")
_CIRCUIT = _fields("circuit_events")
_SWITCH = _fields("kill_switches")
_REFUSED = _fields("refusals")
_ENV = tuple(n for n, _ in _ENVELOPE)


def _decided(r: dict[str, Any]) -> Rows:
    res, rt, b, dec = r["residency"], r["routing"], r["budget"], r["decode"] or {}
    row = _flat(r, _ENV)
    row.update(
        feature=r["feature"],
        verdict=r["verdict"],
        verdict_reason=r["verdict_reason"],
        policy_version=r["policy_version"],
        home_region=res["home_region"],
        allowed_regions=res["allowed_regions"],
        residency_rule=res["rule_id"],
        transfer_basis=res["transfer_basis"],
        complexity=rt["complexity"],
        floor_tier=rt["floor_tier"],
        preferred_tier=rt["preferred_tier"],
        tier=b["tier"] if r["verdict"] == "dispatch" else rt["tier"],
        deployment_id=b["deployment_id"] if r["verdict"] == "dispatch" else rt["deployment_id"],
        eligible=rt["eligible"],
        budget_action=b["action"],
        budget_window=b["window"],
        estimated_cost_micros=b["estimated_cost_micros"],
        tenant_budget_micros=b["tenant_budget_micros"],
        tenant_committed_micros=b["tenant_committed_micros"],
        feature_budget_micros=b["feature_budget_micros"],
        feature_committed_micros=b["feature_committed_micros"],
        decode_strategy=dec.get("strategy"),
        latency_slo_ms=dec.get("latency_slo_ms"),
        predicted_latency_ms=dec.get("predicted_latency_ms"),
        fits_slo=dec.get("fits_slo"),
        state_version=r["state_version"],
        policy_stage=r["policy_stage"],
        reasons=_reasons(r["reasons"]),
        confidence=rt.get("confidence", 1.0),
        fallbacks=rt.get("fallbacks") or [],
        latency_basis=dec.get("basis"),
        latency_observations=[
            {k: o[k] for k in ("deployment_id", "strategy", "p50_ms", "p95_ms", "samples")}
            for o in dec.get("observations") or []
        ],
        review_deadline=r.get("review_deadline"),
        control_mode=r.get("control_mode") or "",
    )
    return [("decisions", row)]


def _reasons(reasons: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"seq": i, "stage": x["stage"], "kind": x["kind"], "subject": x["subject"], "detail": x["detail"]}
        for i, x in enumerate(reasons)
    ]


def _resolved(r: dict[str, Any]) -> Rows:
    b, dec = r.get("budget") or {}, r.get("decode") or {}
    row = _flat(r, _ENV)
    row.update(
        feature=r["feature"],
        resolution=r["resolution"],
        review_event_id=r["review_event_id"],
        reviewer=r["reviewer"],
        review_reason=r["review_reason"],
        verdict_reason=r["verdict_reason"],
        policy_version=r["policy_version"],
        deployment_id=r.get("deployment_id"),
        budget_action=b.get("action"),
        estimated_cost_micros=b.get("estimated_cost_micros"),
        decode_strategy=dec.get("strategy"),
        state_version=r["state_version"],
        reasons=_reasons(r.get("reasons") or []),
    )
    return [("resolutions", row)]


def _dispatched(r: dict[str, Any]) -> Rows:
    row = _flat(r, _DISP)
    row["fallbacks"] = [f["deployment_id"] for f in r.get("fallbacks") or []]
    return [("dispatches", row)]


def _settled(r: dict[str, Any]) -> Rows:
    row = _flat(r, _ENV)
    row.update(
        feature=r["feature"],
        budget_window=r["window"],
        reserved_micros=r["reserved_micros"],
        actual_micros=r["actual_micros"],
        tenant_spent_micros=r["tenant_spent_micros"],
        feature_spent_micros=r["feature_spent_micros"],
        state_version=r["state_version"],
    )
    return [("settlements", row)]


ROW_BUILDERS: dict[type[Event], Callable[[dict[str, Any]], Rows]] = {
    InferenceRequested: lambda r: [("requests", _flat(r, _REQ))],
    RequestRejected: lambda r: [("rejections", _flat(r, _REJ))],
    RequestDecided: _decided,
    BudgetSettled: _settled,
    DispatchRequested: _dispatched,
    ModelCallAttempted: lambda r: [("attempts", _flat(r, _ATT))],
    OutcomeRecorded: lambda r: [("outcomes", _flat(r, _OUT))],
    DeadLettered: lambda r: [("deadletters", _flat(r, _DL))],
    ReviewRecorded: lambda r: [("reviews", _flat(r, _REV))],
    PolicyStageChanged: lambda r: [("policy_events", _flat(r, _POL))],
    ShadowDecisionRecorded: lambda r: [("shadow_decisions", _flat(r, _SHADOW))],
    EscalationResolved: _resolved,
    CircuitStateChanged: lambda r: [("circuit_events", _flat(r, _CIRCUIT))],
    KillSwitchChanged: lambda r: [("kill_switches", _flat(r, _SWITCH))],
    ActRefused: lambda r: [("refusals", _flat(r, _REFUSED))],
}
