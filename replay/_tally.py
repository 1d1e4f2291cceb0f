"""The comparison with what was recorded, and the report's totals, over columns.

The fold (``replay/_columnar.py``) leaves per request row how it was decided (``Folded.mode``),
what the budget window held and the state version it saw; the outcome of a row decided by its
shape or denied by the budget follows from its shape and prices (``replay/_rows.py``), that of a
row ``Planner.decide`` decided is kept. Here the candidate's outcome and context become columns,
compared with the recorded ones the way Python compares values (None equals None), and counted.
Only the changes the report keeps (the first ``keep_changes`` in the history's order) and the
rejections whose reason must be compared are looked at row by row.
"""

from __future__ import annotations

from array import array
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.core import Outcome
from nexuscore.replay._load import SEP, Columns, arrow_of
from nexuscore.replay._replay import Change, ReplayReport
from nexuscore.replay._rows import REJECTED, REQUEST_FIELDS, Planned, stand_in_request

# How the fold decided a request row: not compared (an operator's, or its policy unknown), by its
# shape alone (a rejection, a denial with no tier), a budget denial, or by ``Planner.decide``.
UNCOMPARED, SHAPED, BUDGET_DENIED, DECIDED = range(4)
_OUTCOME = ("verdict", "tier", "deployment_id", "budget_action", "estimated_cost_micros", "decode_strategy")
_REC_CONTEXT = (
    "allowed_regions", "tenant_committed_micros", "feature_committed_micros", "budget_window",
    "state_version", "rec_complexity", "floor_tier", "preferred_tier", "eligible", "fallbacks",
    "predicted_latency_ms", "tenant_budget_micros", "feature_budget_micros",
)  # fmt: skip
_CONTEXT = (
    "allowed_regions", "tenant_committed", "feature_committed", "day", "version", "complexity",
    "floor_tier", "preferred_tier", "eligible", "fallbacks", "predicted_latency_ms", "tenant_budget",
    "feature_budget",
)  # fmt: skip
_I64, _STR = pa.int64(), pa.string()


class Folded:
    """What the fold saw and decided per request: in the scan's order (``order``: the request rows
    in the history's order), but the outcomes ``Planner.decide`` gave, by request row."""

    __slots__ = (
        "day_number", "decided", "feature_at", "mode", "order", "residency_breaches", "tenant_at", "unknown",
        "version_at",
    )  # fmt: skip

    def __init__(self, rows: int, day_number: pa.Array, order: pa.Array) -> None:
        self.order = order
        # Machine integers, not lists: no Python int kept per row, and Arrow reads them in place.
        # (Repeated, not built from a zeroed bytes object: its memory would be touched twice.)
        self.mode = array("b", [UNCOMPARED]) * rows
        self.tenant_at, self.feature_at, self.version_at = (array("q", [0]) * rows for _ in range(3))
        self.day_number = day_number  # by request row
        self.decided: dict[int, Outcome] = {}
        # Verify mode's requests whose policy is not known: (place in the order, the change).
        self.unknown: list[tuple[int, Change]] = []
        self.residency_breaches = 0


def _same(a: pa.Array, b: pa.Array) -> pa.Array:
    """``a == b`` per row as Python has it: None equals None, and nothing else."""
    equal = pc.fill_null(pc.equal(a, b), False)
    return pc.or_(equal, pc.and_(pc.is_null(a), pc.is_null(b)))


def _is(a: pa.Array, value: str) -> pa.Array:
    return pc.fill_null(pc.equal(a, value), False)


def _count(mask: pa.Array) -> int:
    return int(pc.sum(pc.cast(mask, _I64)).as_py() or 0)


def _recorded(r: Columns, name: str) -> pa.ChunkedArray:
    """A recorded column as read (in DuckDB's chunks: Arrow compares them with whole arrays)."""
    column = r.arrow(name)
    return column.cast(_STR) if pa.types.is_large_string(column.type) else column


def _per_shape(planned: Planned) -> dict[str, pa.Array]:
    """The shape's part of the outcome and context, one value per shape."""
    shapes = [s for _, s, _ in planned.shapes]
    verdicts = {REJECTED: "rejected"}
    return {
        "verdict": pa.array([verdicts.get(k, "denied") for k in planned.kinds], _STR),
        "tier": pa.array([s.tier for s in shapes], _STR),
        "reason_code": pa.array([s.rejection or None for s in shapes], _STR),
        "tenant_budget": pa.array([s.tenant_budget for s in shapes], _I64),
        "feature_budget": pa.array([s.feature_budget for s in shapes], _I64),
    }


def _shape_strings(planned: Planned) -> dict[str, list[str | None]]:
    """The shape's part of the context that only its own value gives, one value per shape: compared
    with the record without being written out per row (``_same_as_shape``)."""
    shapes = [s for _, s, _ in planned.shapes]
    return {
        "allowed_regions": [SEP.join(s.allowed_regions) for s in shapes],
        "eligible": [SEP.join(s.eligible) for s in shapes],
        "floor_tier": [s.floor for s in shapes],
        "preferred_tier": [s.preferred for s in shapes],
    }


def _same_as_shape(recorded: pa.ChunkedArray, values: list[str | None], shape: pa.Array) -> pa.Array:
    """``_same(recorded, values[shape])`` per row (a null ``shape`` reads as None), without the
    shapes' strings written out per row (the eligible list alone is some 60 MB at a million rows):
    each recorded string becomes its place among the shapes' values, -1 for None, -2 for a string
    no shape has, and the places are compared."""
    distinct = sorted({v for v in values if v is not None})
    place = {v: n for n, v in enumerate(distinct)}
    theirs = pa.array([-1 if v is None else place[v] for v in values], _I64).take(shape)
    found = pc.cast(pc.index_in(recorded, value_set=pa.array(distinct, _STR)), _I64)
    ours = pc.if_else(pc.is_null(recorded), -1, pc.fill_null(found, -2))
    return pc.equal(ours, pc.fill_null(theirs, -1))


def _chosen_ids(planned: Planned, shape: pa.Array) -> pa.Array:
    """Per row, the deployment ``decide`` chooses among its shape's (by their index in id order)."""
    ids: list[str] = []
    offsets: list[int] = []
    for by_id in planned.by_id:
        offsets.append(len(ids))
        ids += [d for _, _, d in by_id]
    chosen = planned.chosen
    at = pc.add(pc.take(pa.array(offsets, _I64), shape), chosen)
    valid = pc.and_(pc.greater_equal(chosen, 0), pc.is_valid(shape))
    return pc.take(pa.array(ids, _STR), pc.if_else(valid, at, pa.scalar(None, _I64)))


_DECIDED = (
    ("verdict", _STR), ("tier", _STR), ("deployment_id", _STR), ("budget_action", _STR),
    ("estimated_cost_micros", _I64), ("decode_strategy", _STR), ("predicted_latency_ms", _I64),
    ("fallbacks", _STR), ("reason_code", _STR),
)  # fmt: skip


def _decided(folded: Folded) -> list[pa.Array]:
    """The fields (``_DECIDED``) of the outcomes ``Planner.decide`` gave, in row order."""
    rows = [
        (o.verdict, o.tier, o.deployment_id, o.budget_action, o.estimated_cost_micros, o.decode_strategy,
         o.predicted_latency_ms, SEP.join(o.chain[1:]), o.reason_code)
        for o in (folded.decided[i] for i in sorted(folded.decided))
    ]  # fmt: skip
    columns = list(zip(*rows, strict=True))
    return [pa.array(values, kind) for values, (_, kind) in zip(columns, _DECIDED, strict=True)]


def _candidate(planned: Planned, folded: Folded, mode: pa.Array, place: pa.Array) -> dict[str, pa.Array]:
    """The candidate's outcome and context per row, as columns (``place``: each request row's
    place in the scan's order)."""
    shape = pc.if_else(pc.less(planned.shape, 0), pa.scalar(None, pa.int32()), planned.shape)
    per = {k: pc.take(v, shape) for k, v in _per_shape(planned).items()}
    denied = pc.equal(mode, BUDGET_DENIED)
    n = len(mode)
    out = dict(per)
    out["verdict"] = pc.if_else(denied, "denied", per["verdict"])
    out["deployment_id"] = pc.if_else(denied, _chosen_ids(planned, shape), pa.scalar(None, _STR))
    out["budget_action"] = pc.if_else(denied, "denied", "not_applicable")
    out["estimated_cost_micros"] = pc.if_else(denied, planned.cost, 0)
    out["decode_strategy"] = pa.nulls(n, _STR)
    out["predicted_latency_ms"] = pa.nulls(n, _I64)
    out["fallbacks"] = pa.repeat(pa.scalar("", _STR), n)
    out["complexity"] = planned.complexity
    if folded.decided:
        mask = pc.equal(mode, DECIDED)
        for (name, _), values in zip(_DECIDED, _decided(folded), strict=True):
            out[name] = pc.replace_with_mask(out[name], mask, values)
    out["tenant_committed"] = arrow_of(folded.tenant_at, _I64).take(place)
    out["feature_committed"] = arrow_of(folded.feature_at, _I64).take(place)
    out["version"] = arrow_of(folded.version_at, _I64).take(place)
    return out


def _days(day_number: pa.Array) -> pa.Array:
    """Each row's budget window as the evidence writes it (ISO date), worked out once per day."""
    from datetime import date, timedelta

    encoded = pc.dictionary_encode(day_number)
    names = [(date(1970, 1, 1) + timedelta(days=d)).isoformat() for d in encoded.dictionary.to_pylist()]
    return pc.take(pa.array(names, _STR), encoded.indices)


def tally(
    r: Columns, outcomes: Columns, planned: Planned, folded: Folded, report: ReplayReport, keep_changes: int
) -> None:
    """Compare every compared row with its recorded decision (or rejection) and count (``outcomes``: the
    recorded outcomes the rows' ``out_row`` numbers)."""
    report.residency_breaches += folded.residency_breaches
    if r.rows == 0:
        _keep(report, folded.unknown, [], keep_changes)
        return
    place = pc.inverse_permutation(folded.order)  # each request row's place in the scan's order
    mode = arrow_of(folded.mode, pa.int8()).take(place)
    c = _candidate(planned, folded, mode, place)
    c["day"] = _days(folded.day_number)
    rec = {name: _recorded(r, name) for name in (*_OUTCOME, *_REC_CONTEXT, "rec_table", "rec_code")}
    compared = pc.not_equal(mode, UNCOMPARED)
    rejected = _is(c["verdict"], "rejected")
    recorded = _is(rec["rec_table"], "decisions")
    same_outcome = _all([_same(rec[f], c[f]) for f in _OUTCOME])
    rejection_match = _all(
        [compared, rejected, _is(rec["rec_table"], "rejections"), _same(rec["rec_code"], c["reason_code"])]
    )
    decision_match = _all([compared, pc.invert(rejected), recorded, same_outcome])
    shape = pc.if_else(pc.less(planned.shape, 0), pa.scalar(None, pa.int32()), planned.shape)
    by_shape = {k: _same_as_shape(rec[k], v, shape) for k, v in _shape_strings(planned).items()}
    same_context = _all(
        [
            by_shape[a] if a in by_shape else _same(rec[a], c[b])
            for a, b in zip(_REC_CONTEXT, _CONTEXT, strict=True)
        ]
    )
    report.context_differences += _count(pc.and_(decision_match, pc.invert(same_context)))
    report.context_differences += _reasons(r, planned, pc.indices_nonzero(rejection_match))
    changed = pc.and_(compared, pc.invert(pc.or_(rejection_match, decision_match)))
    report.changed += _count(changed)
    _count_changes(report, changed, recorded, rejected, rec, c)
    _totals(report, (r, outcomes), (compared, recorded, rejected, by_shape["allowed_regions"]), rec, c)
    changed_at = pc.indices_nonzero(changed)
    first = pc.take(changed_at, pc.sort_indices(pc.take(place, changed_at))).slice(0, keep_changes)
    _keep(report, folded.unknown, _changes(r, c, first, pc.take(place, first)), keep_changes)


def _all(masks: list[pa.Array]) -> pa.Array:
    out = masks[0]
    for m in masks[1:]:
        out = pc.and_(out, m)
    return out


def _count_changes(
    report: ReplayReport, changed: pa.Array, recorded: pa.Array, rejected: pa.Array,
    rec: dict[str, pa.Array], c: dict[str, pa.Array],
) -> None:  # fmt: skip
    """Per changed row, what differs: the verdict (or the table), the deployment, the tier, each as
    the recorded and the candidate outcome name it (a rejection names none of them)."""
    none = pa.scalar(None, _STR)
    table_changed = pc.not_equal(recorded, pc.invert(rejected))
    for name, attribute in (
        ("verdict", "verdict_changes"),
        ("deployment_id", "deployment_changes"),
        ("tier", "tier_changes"),
    ):
        a = pc.if_else(recorded, rec[name].cast(_STR), none)
        b = pc.if_else(rejected, none, c[name])
        differs = pc.invert(_same(a, b))
        if name == "verdict":
            differs = pc.or_(differs, pc.or_(table_changed, pc.invert(_recorded_table_known(rec))))
        setattr(report, attribute, getattr(report, attribute) + _count(pc.and_(changed, differs)))


def _recorded_table_known(rec: dict[str, pa.Array]) -> pa.Array:
    """The recorded table is one the candidate could write (not 'missing')."""
    return pc.or_(_is(rec["rec_table"], "decisions"), _is(rec["rec_table"], "rejections"))


def _totals(
    report: ReplayReport, tables: tuple[Columns, Columns], masks: tuple[pa.Array, pa.Array, pa.Array, pa.Array],
    rec: dict[str, pa.Array], c: dict[str, pa.Array],
) -> None:  # fmt: skip
    """The report's totals over the compared rows: estimates and actuals, denials, escalations,
    decode and residency changes (``tables``: the requests and the outcomes they number; ``masks``:
    the rows compared, recorded as decisions, rejected by the candidate, and with the allowed
    regions recorded)."""
    r, outcomes = tables
    compared, recorded, rejected, same_regions = masks
    on_record = pc.and_(compared, recorded)
    dispatched = pc.and_(on_record, _is(rec["verdict"], "dispatch"))
    report.recorded_estimated_micros += _sum(rec["estimated_cost_micros"], dispatched)
    out_row = r.arrow("out_row").combine_chunks()
    served = pc.and_(compared, pc.is_valid(out_row))
    report.recorded_actual_micros += _sum(outcomes.arrow("out_cost").take(out_row), served)
    report.recorded_budget_denials += _count(pc.and_(on_record, _is(rec["budget_action"], "denied")))
    report.candidate_budget_denials += _count(pc.and_(compared, _is(c["budget_action"], "denied")))
    report.recorded_escalations += _count(pc.and_(on_record, _is(rec["verdict"], "escalated")))
    report.candidate_escalations += _count(pc.and_(compared, _is(c["verdict"], "escalated")))
    decided = pc.and_(on_record, pc.invert(rejected))
    strategy = pc.invert(_same(rec["decode_strategy"], c["decode_strategy"]))
    report.decode_changes += _count(pc.and_(decided, strategy))
    residency = pc.invert(same_regions)
    report.residency_changes += _count(pc.and_(decided, residency))


def _sum(values: pa.Array, mask: pa.Array) -> int:
    return int(pc.sum(pc.filter(values, mask)).as_py() or 0)


def _reasons(r: Columns, planned: Planned, at: pa.Array) -> int:
    """Rejections the candidate makes as recorded: how many give another reason (admission's
    reason names the request's sizes for some codes: worked out on the row)."""
    if len(at) == 0:
        return 0
    shape = planned.shape.take(at)
    # The shape's own reason where it has one (over columns), else the row's (one by one).
    reasons = pa.array([s.rejection_reason or None for _, s, _ in planned.shapes], _STR).take(shape)
    recorded = r.arrow("rec_reason").take(at)
    differ = _count(pc.and_(pc.is_valid(reasons), pc.invert(_same(recorded, reasons))))
    sized = pc.indices_nonzero(pc.is_null(reasons))
    rows = r.table.select([*REQUEST_FIELDS, "rec_reason"]).take(at.take(sized)).to_pylist()
    for s, row in zip(shape.take(sized).to_pylist(), rows, strict=True):
        planner, rejected, _ = planned.shapes[s]
        joined = row["capabilities"]
        request = stand_in_request(row, tuple(joined.split(SEP)) if joined else ())
        differ += row["rec_reason"] != planner.rejection_reason(rejected, request)
    return differ


def _changes(r: Columns, c: dict[str, pa.Array], at: pa.Array, seq: pa.Array) -> list[tuple[int, Change]]:
    """The changes kept, with what differs: (place in the order, change)."""
    names = ("tenant_id", "request_id", "rec_table", "rec_code", *_OUTCOME)
    rows = r.table.select(list(names)).take(at).to_pylist()
    candidate = {k: pc.take(c[k], at).to_pylist() for k in (*_OUTCOME, "reason_code")}
    out = []
    for n, (row, place) in enumerate(zip(rows, seq.to_pylist(), strict=True)):
        table = row["rec_table"]
        a: dict[str, Any] = {"_table": table}
        if table == "decisions":
            a.update({f: row[f] for f in _OUTCOME})
        elif table == "rejections":
            a["reason_code"] = row["rec_code"]
        b: dict[str, Any]
        if candidate["verdict"][n] == "rejected":
            b = {"_table": "rejections", "reason_code": candidate["reason_code"][n]}
        else:
            b = {"_table": "decisions", **{f: candidate[f][n] for f in _OUTCOME}}
        fields = tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
        change = Change(
            request_id=row["request_id"], tenant_id=row["tenant_id"], fields=fields, recorded=a, candidate=b
        )
        out.append((place, change))
    return out


def _keep(
    report: ReplayReport, unknown: list[tuple[int, Change]], changed: list[tuple[int, Change]], keep: int
) -> None:
    """The first ``keep`` changes in the history's order (places are unique: no tie to break)."""
    merged = sorted(unknown + changed, key=lambda x: x[0])
    report.changes.extend(c for _, c in merged[: max(0, keep - len(report.changes))])
