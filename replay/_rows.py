"""What replay works out per request over whole columns, before the fold: each row's shape, and
the prices the budget stage compares.

A request's shape (``core/_plan.py``) is a function of its decision-relevant attributes and of
the outcome of each comparison ``Planner.key`` makes with its numbers (``Planner.cut_points``).
Here those comparisons run over columns (Arrow compute), every attribute column is
dictionary-encoded, and the attributes and comparisons of a row become one integer; the planner
itself (``Planner.key``, then ``Planner.learn``: ``route``) is asked once per distinct integer,
on the first row that has it. Every row then carries a shape id, and no per-row key or lookup
is left.

Per row and shape, the candidates' prices (``policy.cost_micros``, the same integer arithmetic
over columns) give the deployment ``decide`` would choose, its estimate and the cheapest option
of all, which is what the budget stage needs to see that nothing fits: the fold denies those rows
without calling ``decide``, and calls it for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.core import ESTIMATE_TOKENS_CAP, Planner, Shape
from nexuscore.policy import RoutingPolicy
from nexuscore.replay._load import SEP, Columns, values_of
from nexuscore.replay._replay import PRODUCER
from nexuscore.schemas import InferenceRequested

# What the fold does with the rows of a shape (the scan reads REJECTED and DENIED as "at most 1").
REJECTED, DENIED, ESCALATED, BUDGETED, SLOW = range(5)
_ATTRIBUTES = ("tenant_id", "feature", "task_type", "risk_class", "data_classification", "capabilities")
_I64 = pa.int64()
# What ``route`` reads of a recorded request (``_request``).
REQUEST_FIELDS = (
    "request_id", "tenant_id", "feature", "task_type", "risk_class", "data_classification", "capabilities",
    "complexity", "prompt_chars", "max_output_tokens",
)  # fmt: skip


class Planned:
    """Per row: its shape (an index into ``shapes``; -1 when its policy is not known), input tokens
    and complexity; for a priced shape, the chosen deployment (an index into its ``prices`` in id
    order, -1 if none), its estimate and the cheapest option's. Per shape: what the fold does."""

    def __init__(self, rows: int) -> None:
        self.shapes: list[tuple[Planner, Shape, RoutingPolicy]] = []
        self.kinds: list[int] = []
        # Per shape, its prices in id order: (input, output per 1k, deployment id).
        self.by_id: list[list[tuple[int, int, str]]] = []
        self.shape = pa.array([], pa.int32())
        self.tokens = pa.array([], _I64)
        self.complexity = pa.array([], pa.float64())
        # The same as lists, for the fold's scan.
        self.shape_of: Sequence[int] = []
        self.tokens_of: Sequence[int] = []
        self.complexity_of: Sequence[float] = []
        self.chosen = pa.repeat(pa.scalar(-1, _I64), rows)
        self.cost = pa.repeat(pa.scalar(0, _I64), rows)
        self.cheapest = pa.repeat(pa.scalar(0, _I64), rows)
        # Per attribute (``_ATTRIBUTES``): each row's code, first seen first, and the values.
        self.codes: dict[str, tuple[pa.Array, pa.Array]] = {}


def _codes(column: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, pa.Array]:
    """A column dictionary-encoded (nulls too), first seen first: (indices as int64, values)."""
    encoded = pc.dictionary_encode(column, null_encoding="encode")
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return pc.cast(encoded.indices, _I64), encoded.dictionary


def _combined(parts: list[tuple[pa.Array, int]]) -> pa.Array:
    """Several small integer codes (each with its number of values) as one code per row, numbered
    0, 1, 2... by first appearance: mixed-radix, re-encoded whenever the next part could overflow."""
    code, bound = parts[0]
    for part, size in parts[1:]:
        if bound * max(1, size) >= 2**62:
            code, values = _codes(code)
            bound = len(values)
        code, bound = pc.add(pc.multiply(code, size), part), bound * max(1, size)
    return _codes(code)[0]


def _policy_codes(
    requests: Columns,
    policy: RoutingPolicy | None,
    recorded: Mapping[str, RoutingPolicy] | None,
    known: list[str] | None,
) -> tuple[pa.Array, list[RoutingPolicy | None]]:
    """Each row's policy: the one replayed, or the one its recorded decision names (None if none
    is known by that digest). ``known``: the digests the rows' ``rec_policy`` places refer to."""
    if policy is not None:
        return pa.repeat(pa.scalar(0, _I64), requests.rows), [policy]
    assert recorded is not None
    if known is not None:
        # A digest none of those: one code, whose policy is not known.
        codes = pc.fill_null(pc.cast(requests.arrow("rec_policy").combine_chunks(), _I64), len(known))
        return codes, [recorded.get(d) for d in known] + [None]
    codes, digests = _codes(requests.arrow("rec_digest"))
    return codes, [recorded.get(d or "") for d in digests.to_pylist()]


def _estimates(
    planners: list[Planner | None], policy_code: pa.Array, risk: tuple[pa.Array, pa.Array],
    tokens: pa.Array, caps: tuple[pa.Array, pa.Array],
) -> tuple[pa.Array, pa.Array]:  # fmt: skip
    """Per row, the complexity the planner estimates and whether its confidence is low, asked
    once per distinct (policy, risk class, tokens up to where they matter, capabilities listed)."""
    risk_code, risks = risk
    caps_code, joined = caps
    listed = [len(j.split(SEP)) if j else 0 for j in joined.to_pylist()]
    counts = pc.take(pa.array(listed, _I64), caps_code)
    capped = pc.min_element_wise(tokens, ESTIMATE_TOKENS_CAP)
    code = _combined(
        [
            (policy_code, len(planners)),
            (risk_code, len(risks)),
            (capped, ESTIMATE_TOKENS_CAP + 1),
            (counts, max(listed, default=0) + 1),
        ]
    )
    first = _first_rows(code)
    risk_names = risks.to_pylist()
    values, low = [], []
    for p, r, t, n in zip(
        pc.take(policy_code, first).to_pylist(), pc.take(risk_code, first).to_pylist(),
        pc.take(capped, first).to_pylist(), pc.take(counts, first).to_pylist(), strict=True,
    ):  # fmt: skip
        planner = planners[p]
        c, below = planner.estimate(risk_names[r], t, n) if planner is not None else (0.0, False)
        values.append(c)
        low.append(below)
    return pc.take(pa.array(values, pa.float64()), code), pc.take(pa.array(low, pa.bool_()), code)


def _first_rows(code: pa.Array) -> pa.Array:
    """The first row of each code, in code order (codes number first appearances: 0, 1, 2...)."""
    # A code's first row is where the running maximum first reaches it.
    before = pa.concat_arrays([pa.array([-1], _I64), pc.cumulative_max(code).slice(0, len(code) - 1)])
    return pc.indices_nonzero(pc.greater(code, before))


def _count_below(values: pa.Array, cuts: tuple[float, ...] | tuple[int, ...], inclusive: bool) -> pa.Array:
    """bisect_right (``inclusive``: cut <= value) or bisect_left (cut < value) of each value."""
    out = pa.repeat(pa.scalar(0, _I64), len(values))
    compare = pc.less_equal if inclusive else pc.less
    for cut in cuts:
        out = pc.add(out, pc.cast(compare(pa.scalar(cut), values), _I64))
    return out


def plan_rows(
    requests: Columns,
    policy: RoutingPolicy | None,
    recorded: Mapping[str, RoutingPolicy] | None,
    known: list[str] | None = None,
) -> Planned:
    """Each row's shape, tokens and complexity, and the prices of its shape's candidates
    (``known``: the digests the rows' ``rec_policy`` places refer to, if they have any)."""
    planned = Planned(requests.rows)
    if requests.rows == 0:
        return planned
    policy_code, policies = _policy_codes(requests, policy, recorded, known)
    planners = [Planner(p) if p is not None else None for p in policies]
    chars = pc.max_element_wise(pc.cast(requests.arrow("prompt_chars").combine_chunks(), _I64), 1)
    tokens = pc.max_element_wise(pc.divide(chars, 4), 1)
    max_out = pc.cast(requests.arrow("max_output_tokens").combine_chunks(), _I64)
    attributes = [_codes(requests.arrow(name)) for name in _ATTRIBUTES]
    planned.codes = dict(zip(_ATTRIBUTES, attributes, strict=True))
    given = requests.arrow("complexity").combine_chunks()
    estimated, low = _estimates(planners, policy_code, attributes[3], tokens, attributes[5])
    is_given = pc.is_valid(given)
    complexity = pc.if_else(is_given, pc.cast(given, pa.float64()), estimated)
    low = pc.and_(pc.invert(is_given), low)
    needed = pc.add(tokens, max_out)
    parts: list[tuple[pa.Array, int]] = [(policy_code, len(planners))]
    parts += [(code, len(values)) for code, values in attributes]
    parts += [(pc.cast(flag, _I64), 2) for flag in _flags(planners, policy_code, tokens, needed, chars)]
    parts += _comparisons(policy_code, planners, complexity, needed)
    parts += [(pc.cast(is_given, _I64), 2), (pc.cast(low, _I64), 2)]
    combo = _combined(parts)
    first = _first_rows(combo)
    firsts = requests.table.select(list(REQUEST_FIELDS)).take(first)
    combo_shape = _learn(planned, planners, pc.take(policy_code, first).to_pylist(), firsts)
    planned.shape = pc.cast(pc.take(pa.array(combo_shape, _I64), combo), pa.int32())
    planned.tokens, planned.complexity = tokens, complexity
    planned.shape_of, planned.tokens_of = values_of(planned.shape), values_of(tokens)
    planned.complexity_of = values_of(complexity)
    _price(planned, tokens, max_out)
    return planned


def _flags(
    planners: list[Planner | None], policy_code: pa.Array, tokens: pa.Array, needed: pa.Array, chars: pa.Array
) -> list[pa.Array]:
    """Admission's size comparisons, against each row's policy's limits."""
    flags = []
    for attribute, values in (
        ("max_input_tokens", tokens),
        ("max_context_tokens", needed),
        ("max_prompt_bytes", chars),
    ):
        limits = [getattr(p.cut_points(), attribute) if p is not None else 0 for p in planners]
        flags.append(pc.greater(values, pc.take(pa.array(limits, _I64), policy_code)))
    return flags


def _comparisons(
    policy_code: pa.Array, planners: list[Planner | None], complexity: pa.Array, needed: pa.Array
) -> list[tuple[pa.Array, int]]:
    """The complexity's and the context's comparisons with each policy's thresholds: per policy
    over all rows (a row of another policy ignores them: its policy code tells them apart)."""
    out: list[tuple[pa.Array, int]] = []
    nan = pc.is_nan(complexity)
    for n, planner in enumerate(planners):
        if planner is None:
            continue
        c = planner.cut_points()
        mine = pc.equal(policy_code, n) if len(planners) > 1 else None
        below = pc.if_else(nan, len(c.below), _count_below(complexity, c.below, inclusive=True))
        for values, size in (
            (below, len(c.below) + 1),
            (pc.cast(pc.fill_null(pc.greater_equal(complexity, c.mid), False), _I64), 2),
            (_count_below(needed, c.contexts, inclusive=False), len(c.contexts) + 1),
        ):
            out.append((values if mine is None else pc.if_else(mine, values, 0), size))
    return out


def stand_in_request(row: dict[str, Any], caps: tuple[str, ...]) -> InferenceRequested:
    """The recorded request as ``route`` reads it, its prompt a stand-in of the same length."""
    return InferenceRequested(
        event_id="replay", request_id=row["request_id"], tenant_id=row["tenant_id"],
        occurred_at=datetime(1970, 1, 1, tzinfo=UTC), producer=PRODUCER, feature=row["feature"],
        task_type=row["task_type"], risk_class=row["risk_class"],
        data_classification=row["data_classification"], prompt="x" * max(1, row["prompt_chars"]),
        max_output_tokens=row["max_output_tokens"], required_capabilities=list(caps),
        complexity=row["complexity"],
    )  # fmt: skip


def _kind(shape: Shape) -> int:
    if shape.rejection:
        return REJECTED
    if shape.tier is None:
        return DENIED
    if not shape.prices:
        return SLOW
    return BUDGETED if shape.escalation_deadline_s is None else ESCALATED


def _learn(
    planned: Planned, planners: list[Planner | None], policy_codes: list[int], firsts: pa.Table
) -> list[int]:
    """The shape of each distinct row code, from the planner's own key and ``route`` on its first
    row: an index into ``planned.shapes`` (-1 where the policy is not known)."""
    out: list[int] = []
    known: dict[tuple[int, Any], int] = {}
    for p, row in zip(policy_codes, firsts.to_pylist(), strict=True):
        planner = planners[p]
        if planner is None:
            out.append(-1)
            continue
        joined = row["capabilities"]
        caps = tuple(joined.split(SEP)) if joined else ()
        attributes = (
            row["tenant_id"], row["feature"], row["task_type"], row["risk_class"], row["data_classification"], caps
        )  # fmt: skip
        key, _, _ = planner.key(attributes, row["complexity"], row["prompt_chars"], row["max_output_tokens"])
        found = known.get((p, key))
        if found is None:
            shape = planner.shape(key) or planner.learn(key, stand_in_request(row, caps))
            found = known[(p, key)] = len(planned.shapes)
            planned.shapes.append((planner, shape, planner.policy))
            planned.kinds.append(_kind(shape))
            planned.by_id.append(sorted(((i, o, d_id) for i, o, d_id, _ in shape.prices), key=lambda x: x[2]))
        out.append(found)
    return out


def _micros(
    tokens: pa.Array, max_out: pa.Array, input_1k: pa.Array, output_1k: pa.Array, bounded: bool
) -> pa.Array:
    """The amount ``cost_micros`` rounds, over columns: with ``bounded`` (no product or sum can
    overflow int64, checked once on the extremes) without the per-value overflow checks."""
    if bounded:
        return pc.add(pc.multiply(tokens, input_1k), pc.multiply(max_out, output_1k))
    return pc.add_checked(pc.multiply_checked(tokens, input_1k), pc.multiply_checked(max_out, output_1k))


def _rounded(micros: pa.Array, non_negative: bool) -> pa.Array:
    """The micros rounded up to the unit as ``cost_micros`` does (Arrow's integer division truncates,
    so toward zero: up for a negative amount, down for a positive one, which adding 999 first makes
    up). With ``non_negative`` (every count and price is >= 0) no amount is negative: one case only."""
    if non_negative:
        return pc.divide(pc.add(micros, 999), 1000)
    return pc.if_else(pc.greater(micros, 0), pc.divide(pc.add(micros, 999), 1000), pc.divide(micros, 1000))


def _padded(rows: list[list[tuple[int, int]]], shape: pa.Array) -> list[tuple[pa.Array, pa.Array]]:
    """Per shape a list of (input, output) prices, as columns per row: the j-th prices of each
    row's shape (null where its shape has fewer)."""
    width = max((len(p) for p in rows), default=0)
    out = []
    for j in range(width):
        inputs = pa.array([p[j][0] if j < len(p) else None for p in rows], _I64)
        outputs = pa.array([p[j][1] if j < len(p) else None for p in rows], _I64)
        out.append((pc.take(inputs, shape), pc.take(outputs, shape)))
    return out


def _price(planned: Planned, tokens: pa.Array, max_out: pa.Array) -> None:
    """Per row of a priced shape: the deployment ``decide`` chooses (cheapest, then first by id),
    its estimate, and the cheapest of every option the budget stage may fall back to. Over all
    rows at once: each shape's candidates padded to the widest shape's number."""
    priced = [k in (BUDGETED, ESCALATED) for k in planned.kinds]
    shape = pc.if_else(pc.less(planned.shape, 0), pa.scalar(None, pa.int32()), planned.shape)
    candidates = [
        [(i, o) for i, o, _ in by_id] if ok else [] for by_id, ok in zip(planned.by_id, priced, strict=True)
    ]
    lower = [
        [(d.input_micros_per_1k, d.output_micros_per_1k) for d in s.lower] if ok else []
        for (_, s, _), ok in zip(planned.shapes, priced, strict=True)
    ]
    least, most = pc.min_max(tokens).as_py(), pc.min_max(max_out).as_py()
    prices = [x for row in candidates + lower for pair in row for x in pair]
    non_negative = all(x is None or x >= 0 for x in [least["min"], most["min"], *prices])
    # Every amount within int64 (the largest counts times the largest prices): no checks per value.
    top = max((abs(x) for x in prices), default=0)
    extremes = [abs(x) for x in (least["min"], least["max"], most["min"], most["max"]) if x is not None]
    bounded = max(extremes, default=0) * top * 2 < 2**62
    best = best_at = cheapest = None
    for k, (i_1k, o_1k) in enumerate(_padded(candidates, shape)):
        # null where the shape has no k-th candidate
        c = _rounded(_micros(tokens, max_out, i_1k, o_1k, bounded), non_negative)
        if best is None:
            best, best_at, cheapest = c, pc.if_else(pc.is_valid(c), 0, pa.scalar(None, _I64)), c
            continue
        better = pc.fill_null(pc.less(c, best), False)
        best, best_at = pc.if_else(better, c, best), pc.if_else(better, k, best_at)
        cheapest = pc.min_element_wise(cheapest, c)  # nulls skipped
    if best is None or best_at is None or cheapest is None:
        return
    # Rounding up keeps the order: the least of the lower options' amounts, rounded once.
    lowest = None
    for i_1k, o_1k in _padded(lower, shape):
        micros = _micros(tokens, max_out, i_1k, o_1k, bounded)
        lowest = micros if lowest is None else pc.min_element_wise(lowest, micros)
    if lowest is not None:
        cheapest = pc.min_element_wise(cheapest, _rounded(lowest, non_negative))
    planned.chosen = pc.fill_null(best_at, -1)
    planned.cost = pc.fill_null(best, 0)
    planned.cheapest = pc.fill_null(cheapest, 0)
