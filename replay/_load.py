"""What a columnar replay reads of the evidence: three queries, their columns, and one order.

Requests come with their recorded decision (or rejection) and outcome joined on (tenant, request):
request ids are unique per tenant only. Where the evidence holds two rows for one key (a redelivery
the projector kept, or a hostile producer), the latest by log position is the one replayed against,
so the choice never depends on file-listing or hash order. The requests' rows come in no particular
order (what is read of a row never depends on its place), and the history's order
(``_history_order``) is a total order over (tenant, state version, kind, log position): the same
store gives the same sequence on every run.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.kernel import EvidenceError
from nexuscore.projections import EvidenceStore

_WHERE = (
    "WHERE ($tenant IS NULL OR tenant_id = $tenant) AND ($since IS NULL OR occurred_at >= $since) "
    "AND ($until IS NULL OR occurred_at < $until)"
)
# Every row of a table: where no (tenant, request) has two rows among the chosen requests' (the
# usual case, seen when the join gives one row per request), the same as ``_LATEST``, for less.
_EVERY = "SELECT {columns} FROM {table}"
# The latest row per (tenant, request) of a table, among the chosen requests' rows: its log position
# found on two narrow columns first (a window over the wide rows would sort them all).
_LATEST = (
    "SELECT {columns} FROM {table} t SEMI JOIN (SELECT tenant_id, request_id, "
    "max(struct_pack(p := src_partition, o := src_offset)) AS pos FROM {table} "
    "SEMI JOIN (SELECT tenant_id, request_id FROM chosen) c USING (tenant_id, request_id) GROUP BY ALL) l "
    "ON t.tenant_id = l.tenant_id AND t.request_id = l.request_id AND t.src_partition = l.pos.p "
    "AND t.src_offset = l.pos.o"
)
# Only what replay reads: the prompt, the reasons' prose and the responses stay on disk.
_KEY = "tenant_id, request_id, src_partition, src_offset, "
_REQUEST_COLUMNS = (
    _KEY + "occurred_at, feature, task_type, risk_class, data_classification, required_capabilities, "
    "complexity, prompt_chars, max_output_tokens, latency_slo_ms"
)
# The unit separator: cannot occur in an identifier, so lists travel as one string each.
SEP = "\x1f"
# Lists become strings as they are read (the join then carries less). The latency observations
# come by their own query (``_OBSERVED``): few decisions have any, and carrying the list column
# through the join costs about as much as three flat columns, for every row.
_DECISION_COLUMNS = (
    _KEY + "occurred_at, policy_digest, verdict, tier, deployment_id, budget_action, estimated_cost_micros, "
    f"decode_strategy, array_to_string(allowed_regions, '{SEP}') AS allowed_regions, tenant_committed_micros, "
    "feature_committed_micros, budget_window, state_version, complexity, floor_tier, preferred_tier, "
    f"array_to_string(eligible, '{SEP}') AS eligible, array_to_string(fallbacks, '{SEP}') AS fallbacks, "
    "predicted_latency_ms, tenant_budget_micros, feature_budget_micros, {control_mode} AS control_mode"
)
# Decisions written before control_mode existed name their kill switch in a reason: read (the
# reasons are the bulk of a decision's row) only when the rows read hold such decisions.
_LEGACY_CONTROL_MODE = (
    "coalesce(control_mode, CASE WHEN len(list_filter(reasons, lambda x: x.stage = 'admission' "
    "AND x.subject IN ('kill_switch', 'offline'))) > 0 THEN 'legacy' ELSE '' END)"
)
# Names and columns are ours; filters travel as bound parameters.
_REQUESTS = f"""
WITH chosen AS (SELECT {_REQUEST_COLUMNS} FROM requests {_WHERE}),
dec AS ({{dec}}),
rej AS ({{rej}}),
outc AS ({{outc}})
SELECT r.tenant_id, r.request_id, r.feature, r.task_type, r.risk_class, r.data_classification,
  array_to_string(r.required_capabilities, '{SEP}') AS capabilities, r.complexity, r.prompt_chars,
  r.max_output_tokens, r.latency_slo_ms,
  CASE WHEN j.request_id IS NOT NULL THEN 'rejections' WHEN d.request_id IS NOT NULL THEN 'decisions'
       ELSE 'missing' END AS rec_table,
  epoch_us(coalesce(j.occurred_at, d.occurred_at, r.occurred_at)) AS now_us,
  {{rec_digest}} AS rec_digest, j.reason_code AS rec_code,
  j.reason AS rec_reason,
  d.verdict, d.tier, d.deployment_id, d.budget_action, d.estimated_cost_micros, d.decode_strategy,
  d.allowed_regions, d.tenant_committed_micros, d.feature_committed_micros, d.budget_window,
  d.state_version, d.complexity AS rec_complexity, d.floor_tier, d.preferred_tier, d.eligible, d.fallbacks,
  d.predicted_latency_ms, d.tenant_budget_micros, d.feature_budget_micros,
  CASE WHEN j.request_id IS NOT NULL THEN '' ELSE d.control_mode END AS control_mode,
  o.out_row,
  r.src_partition, r.src_offset
FROM chosen r LEFT JOIN dec d USING (tenant_id, request_id) LEFT JOIN rej j USING (tenant_id, request_id)
  LEFT JOIN outc o USING (tenant_id, request_id)
"""  # noqa: S608
_OUT_ROW = (
    "row_number() OVER (ORDER BY tenant_id, request_id, src_partition, src_offset, deployment_id, "
    "input_tokens, output_tokens, cost_micros) - 1 AS out_row"
)
# The rows in no particular order (sorting the wide rows costs more than the rest of the query):
# the history's order is worked out on the keys (``_history_order``).
_JOINED = {
    "dec": ("decisions", _DECISION_COLUMNS),
    "rej": ("rejections", _KEY + "occurred_at, policy_digest, reason_code, reason"),
    "outc": ("outcomes", _KEY + "deployment_id, input_tokens, output_tokens, cost_micros, " + _OUT_ROW),
}
# The outcomes joined (a few rows) come by their own query, in the order of their ``out_row``: the
# join carries that one number instead of four columns that are null on most rows. Ordered by every
# column read, ties are between rows that read the same: the numbering is the same in both queries.
_OUTCOMES = f"""
WITH chosen AS (SELECT {_REQUEST_COLUMNS} FROM requests {_WHERE}),
outc AS ({{outc}})
SELECT tenant_id, request_id, deployment_id AS out_deployment, input_tokens AS out_input,
  output_tokens AS out_output, cost_micros AS out_cost
FROM outc ORDER BY out_row
"""  # noqa: S608
_COUNT = f"SELECT count(*) AS n FROM requests {_WHERE}"  # noqa: S608
# The decisions with latency observations, by (tenant, request): of every decision where no key has
# two rows among the chosen requests' (the join's own test), else of the latest, as the join reads.
_OBSERVED = (
    "SELECT tenant_id, request_id, latency_observations AS observations FROM decisions "
    "WHERE len(latency_observations) > 0 AND ($tenant IS NULL OR tenant_id = $tenant)"
)
_LATEST_OBSERVED = (
    f"WITH chosen AS (SELECT tenant_id, request_id FROM requests {_WHERE}) "  # noqa: S608
    "SELECT tenant_id, request_id, observations FROM ("
    + _LATEST.format(table="decisions", columns="tenant_id, request_id, latency_observations AS observations")
    # Two rows at one log position (a hostile store): the same one wins on every run.
    + ") WHERE len(observations) > 0 ORDER BY tenant_id, request_id, observations"
)


def _requests_sql(latest: bool, control_mode: str, digests: bool | Sequence[str] = True) -> str:
    # The recorded policy's digest (64 characters a row) only where the replay reads it; with the
    # digests known, a row's place among them ($digests) instead, and the digest only where it is
    # none of them (a million digests read as strings cost about as much as four other columns).
    digest = "coalesce(j.policy_digest, d.policy_digest)" if digests is not False else "NULL::VARCHAR"
    if digests is not True and digests is not False:
        position = f"list_position(CAST($digests AS VARCHAR[]), {digest})"
        digest = f"CASE WHEN {position} IS NULL THEN {digest} END AS rec_digest, {position} - 1 AS rec_policy"
    else:
        digest += " AS rec_digest"
    sql = _REQUESTS.replace("{rec_digest} AS rec_digest", digest)
    for name, (table, columns) in _JOINED.items():
        sql = sql.replace(
            "{" + name + "}", (_LATEST if latest else _EVERY).format(table=table, columns=columns)
        )
    return sql.replace("{control_mode}", control_mode)


def _outcomes_sql(latest: bool) -> str:
    """The outcomes the requests' query joins, in the order of their ``out_row``."""
    _, columns = _JOINED["outc"]
    return _OUTCOMES.replace(
        "{outc}", (_LATEST if latest else _EVERY).format(table="outcomes", columns=columns)
    )


_FOLLOWING = f"""
WITH chosen AS (SELECT tenant_id, request_id FROM requests {_WHERE})
SELECT tenant_id, request_id, state_version, {{columns}} src_partition, src_offset
FROM {{table}} SEMI JOIN chosen USING (tenant_id, request_id)
"""  # noqa: S608
# Every request chosen (no filter): every row. A row whose request is not in the store follows no
# decision the fold makes (it finds nothing held or escalated), so it changes nothing.
_EVERY_FOLLOWING = (
    "SELECT tenant_id, request_id, state_version, {columns} src_partition, src_offset FROM {table}"
)
_LAST = 2**62  # after every state version: requests no decided request follows

KIND_REQUEST, KIND_SETTLEMENT, KIND_RESOLUTION = 0, 1, 2
_NO_OBSERVATIONS = pa.table(
    {
        "tenant_id": pa.array([], pa.string()),
        "request_id": pa.array([], pa.string()),
        "observations": pa.array([]),
    }
)


_NO_OUTCOMES = pa.table(
    {
        "tenant_id": pa.array([], pa.string()),
        "request_id": pa.array([], pa.string()),
        "out_deployment": pa.array([], pa.string()),
        "out_input": pa.array([], pa.int64()),
        "out_output": pa.array([], pa.int64()),
        "out_cost": pa.array([], pa.int64()),
    }
)


_FORMATS: dict[pa.DataType, Literal["b", "i", "q", "d"]] = {
    pa.int8(): "b",
    pa.int32(): "i",
    pa.int64(): "q",
    pa.float64(): "d",
}


def values_of(column: pa.Array | pa.ChunkedArray) -> Sequence[Any]:
    """A numeric column's values as Python reads them: read in place from Arrow's buffer where it
    has no nulls (no Python object per row until a row is read: a list of a million ints costs its
    build and some 40 MB of memory touched, and the fold reads most rows once); else as a list."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    code = _FORMATS.get(column.type)
    if code is None or column.null_count or len(column) == 0:
        listed: list[Any] = column.to_pylist()
        return listed
    return memoryview(column.buffers()[1]).cast(code)[column.offset : column.offset + len(column)]


def arrow_of(values: array[Any], kind: pa.DataType) -> pa.Array:
    """An ``array.array`` (of ``kind``'s width) as an Arrow array over the same memory."""
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


class Columns:
    """One table's columns in log order: as Arrow, and each as a Python list once it is asked for
    (the fold reads most columns vectorised, a few row by row)."""

    __slots__ = ("_lists", "rows", "table")

    def __init__(self, table: pa.Table) -> None:
        self.table, self.rows = table, table.num_rows
        self._lists: dict[str, list[Any]] = {}

    def __getitem__(self, name: str) -> list[Any]:
        found = self._lists.get(name)
        if found is None:
            found = self._lists[name] = self.table.column(name).to_pylist()
        return found

    def arrow(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)


class History:
    """What a replay reads: the three tables' columns, and the order of their rows."""

    __slots__ = (
        "_order",
        "digests",
        "interleaved",
        "observations",
        "outcomes",
        "request_order",
        "requests",
        "resolutions",
        "settlements",
    )

    def __init__(
        self,
        requests: Columns,
        settlements: Columns,
        resolutions: Columns,
        order: pa.Table,
        observations: Columns | None = None,
        digests: list[str] | None = None,
        outcomes: Columns | None = None,
    ) -> None:
        self.requests, self.settlements, self.resolutions = requests, settlements, resolutions
        # The recorded outcomes the requests' ``out_row`` numbers (a row per served request).
        self.outcomes = outcomes or Columns(_NO_OUTCOMES)
        # The digests the requests' ``rec_policy`` places refer to (None: they carry no places).
        self.digests = digests
        # The recorded decisions' latency observations, where there are any: (tenant, request, list).
        self.observations = observations or Columns(_NO_OBSERVATIONS)
        # The history in order: each row's kind (KIND_*) and its index in its table's columns.
        self._order = order
        kind, index = order.column("kind").combine_chunks(), order.column("index").combine_chunks()
        is_request = pc.equal(kind, KIND_REQUEST)
        # The requests' row indices in that order.
        self.request_order: pa.Array = index.filter(is_request)
        # The rest (settlements and resolutions, a few), each as (how many requests come before it,
        # its kind, its index): the fold runs over the requests and takes these in on the way.
        before = pc.cumulative_sum(pc.cast(is_request, pa.int64()))
        others = pc.invert(is_request)
        self.interleaved: list[tuple[int, int, int]] = list(
            zip(
                before.filter(others).to_pylist(),
                kind.filter(others).to_pylist(),
                index.filter(others).to_pylist(),
                strict=True,
            )
        )

    @property
    def order(self) -> list[tuple[int, int]]:
        """The history in order: (kind, index) per row."""
        return list(
            zip(self._order.column("kind").to_pylist(), self._order.column("index").to_pylist(), strict=True)
        )


def _tenant_ranks(tables: list[pa.Table]) -> list[pa.Array]:
    """Each row's tenant as its rank among every tenant of ``tables`` (string order): integers sort
    the same as the names, for less."""
    names = sorted({t for table in tables for t in pc.unique(table.column("tenant_id")).to_pylist()})
    value_set = pa.array(names, pa.string())
    return [
        pc.index_in(table.column("tenant_id").combine_chunks().cast(pa.string()), value_set=value_set)
        for table in tables
    ]


def _keys(
    table: pa.Table, tenant: pa.Array, kind: int, version: pa.ChunkedArray, sub: pa.Array | int
) -> pa.Table:
    n = table.num_rows
    return pa.table(
        {
            "tenant": tenant,
            "version": version,
            "sub": sub if isinstance(sub, pa.Array) else pa.repeat(pa.scalar(sub, pa.int8()), n),
            "kind": pa.repeat(pa.scalar(kind, pa.int8()), n),
            "partition": table.column("src_partition"),
            "offset": table.column("src_offset"),
            # 0, 1, 2... without a Python int per row.
            "index": pc.cast(pc.indices_nonzero(pa.repeat(pa.scalar(True), n)), pa.int64()),
        }
    )


def _request_versions(requests: pa.Table, tenant: pa.Array) -> pa.ChunkedArray:
    """Each request's place among its tenant's state versions: its decision's, or, for a request
    with no recorded decision (it touched no state), the next decided request's in log order: a
    backward fill over the rows in (tenant, log position) order that never crosses into the next
    tenant, put back in the table's order."""
    n = requests.num_rows
    if n == 0:
        return pa.chunked_array([pa.array([], pa.int64())])
    position = _packed_positions([requests])
    if position is not None and pc.max(tenant).as_py() < 2**12:
        # One integer per row (tenant above the log position): one sort key where there were three.
        tenant64 = pc.cast(tenant, pa.int64())
        order = pc.sort_indices(pc.add(pc.multiply(tenant64, 2**_POSITION_BITS), position[0]))
    else:
        keys = pa.table(
            {
                "tenant": tenant,
                "partition": requests.column("src_partition"),
                "offset": requests.column("src_offset"),
            }
        )
        order = pc.sort_indices(keys, sort_keys=[(k, "ascending") for k in keys.column_names])
    tenants = tenant.take(order)
    # A tenant's last row, where no later decided request of the tenant can follow.
    last = pa.concat_arrays([pc.not_equal(tenants.slice(0, n - 1), tenants.slice(1)), pa.array([True])])
    decided = pc.equal(requests.column("rec_table").take(order).combine_chunks(), "decisions")
    versions = pc.cast(requests.column("state_version").take(order).combine_chunks(), pa.int64())
    int64 = pa.int64()
    ends = pc.if_else(last, pa.scalar(_LAST, int64), pa.scalar(None, int64))
    filled = pc.fill_null_backward(pc.if_else(decided, versions, ends))
    # Back in the table's order: the sort's permutation inverted (no second sort).
    return pa.chunked_array([filled.take(pc.inverse_permutation(pc.cast(order, pa.int64())))])


def _history_order(requests: pa.Table, settlements: pa.Table, resolutions: pa.Table) -> pa.Table:
    """Per tenant, the order the decision agent saw: decisions, settlements and resolutions by
    state version, and requests with no decision just before the next decided request."""
    tenants = _tenant_ranks([requests, settlements, resolutions])
    version = _request_versions(requests, tenants[0])
    decided = pc.equal(requests.column("rec_table"), "decisions")
    sub = pc.cast(pc.if_else(decided, 0, -1), pa.int8())
    keys = pa.concat_tables(
        [
            _keys(requests, tenants[0], KIND_REQUEST, version, sub.combine_chunks()),
            _keys(
                settlements,
                tenants[1],
                KIND_SETTLEMENT,
                pc.cast(settlements.column("state_version"), pa.int64()),
                0,
            ),
            _keys(
                resolutions,
                tenants[2],
                KIND_RESOLUTION,
                pc.cast(resolutions.column("state_version"), pa.int64()),
                0,
            ),
        ]
    )
    names: tuple[str, ...] = ("tenant", "version", "sub", "kind", "partition", "offset")
    positions = _packed_positions([requests, settlements, resolutions])
    if positions is not None:
        # (sub, kind, log position) as one integer: sub + 1 and kind (0..2) above the position.
        within = pc.add(pc.multiply(pc.cast(keys.column("sub"), pa.int64()), 3), keys.column("kind"))
        tail = pc.add(
            pc.multiply(pc.add(within, 3), 2**_POSITION_BITS),
            pa.chunked_array([c for p in positions for c in p.chunks], pa.int64()),
        )
        keys, names = keys.append_column("tail", tail), ("tenant", "version", "tail")
    order = pc.sort_indices(keys, sort_keys=[(n, "ascending") for n in names])
    return keys.select(["kind", "index"]).take(order)


# A log position (partition, offset) as one integer, partition above offset, where every one fits:
# partitions below 2**10, offsets below 2**40 (a topic's partitions and offsets in practice).
_OFFSET_BITS, _POSITION_BITS = 40, 50


def _packed_positions(tables: list[pa.Table]) -> list[pa.ChunkedArray] | None:
    """Each table's log positions packed (``_POSITION_BITS``), ordered as (partition, offset) are;
    None if any partition or offset is null or out of range (then they are sorted as two keys)."""
    for table in tables:
        for name, bits in (("src_partition", _POSITION_BITS - _OFFSET_BITS), ("src_offset", _OFFSET_BITS)):
            column = table.column(name)
            bounds = pc.min_max(column).as_py()
            if column.null_count or (table.num_rows and not 0 <= bounds["min"] <= bounds["max"] < 2**bits):
                return None
    return [
        pc.add(
            pc.multiply(pc.cast(t.column("src_partition"), pa.int64()), 2**_OFFSET_BITS),
            t.column("src_offset"),
        )
        for t in tables
    ]


# The counts replay multiplies by prices (int64 arithmetic over columns): the schemas allow far less
# (max_output_tokens <= 32,768), so a value outside these bounds is a tampered or corrupt store, and
# is refused here rather than overflowing mid-fold.
_COUNT_BOUNDS = {"prompt_chars": (0, 2**40), "max_output_tokens": (0, 2**31)}
_OUTCOME_BOUNDS = {"out_input": (0, 2**31), "out_output": (0, 2**31)}


def _unmarked(requests: pa.Table) -> bool:
    """Does any row read have a recorded decision with no control_mode?"""
    decided = pc.equal(requests.column("rec_table"), "decisions")
    return bool(pc.any(pc.and_(decided, pc.is_null(requests.column("control_mode")))).as_py())


def _check_counts(requests: pa.Table, bounds_of: dict[str, tuple[int, int]]) -> None:
    """Every count in its bounds (``bounds_of``), or an EvidenceError naming the first row
    (tenant, request) and column that is not."""
    for name, (low, high) in bounds_of.items():
        column = requests.column(name)
        bounds = pc.min_max(column)
        least, most = bounds["min"].as_py(), bounds["max"].as_py()
        if least is None or (low <= least and most <= high):
            continue
        bad = pc.or_(pc.less(column, low), pc.greater(column, high))
        row = pc.index(pc.fill_null(bad, False), True).as_py()
        raise EvidenceError(
            f"evidence row (tenant {requests.column('tenant_id')[row].as_py()!r}, request "
            f"{requests.column('request_id')[row].as_py()!r}): {name} is {column[row].as_py()}, "
            f"outside [{low}, {high}]: the store is corrupt or was tampered with"
        )


def load_history(
    store: EvidenceStore,
    tenant: str | None,
    since: datetime | None,
    until: datetime | None,
    *,
    digests: bool | Sequence[str] = True,
) -> History:
    """The chosen requests (by tenant and time) with what was recorded of them, and the
    settlements and resolutions that follow them, whatever their own times. Without ``digests``
    the recorded policies' digests are not read (a replay under one policy does not need them);
    with a list of digests, each row's place among them (``rec_policy``) is, and the recorded
    digest only where it is none of them."""
    params: dict[str, Any] = {"tenant": tenant, "since": since, "until": until}
    known = None if isinstance(digests, bool) else list(digests)
    asked = params if known is None else {**params, "digests": known}
    mode = "control_mode"
    requests = store.query(_requests_sql(False, mode, digests), asked)
    if _unmarked(requests):
        # Decisions written before control_mode existed, among those read: read again, the kill
        # switch found in their reasons (the rows of the latest decisions are among these rows).
        mode = _LEGACY_CONTROL_MODE
        requests = store.query(_requests_sql(False, mode, digests), asked)
    latest = requests.num_rows != store.query(_COUNT, params).column("n")[0].as_py()
    if latest:
        # A (tenant, request) with two rows in a table: the latest by log position is replayed against.
        requests = store.query(_requests_sql(True, mode, digests), asked)
    observed = store.query(_LATEST_OBSERVED, params) if latest else store.query(_OBSERVED, {"tenant": tenant})
    outcomes = store.query(_outcomes_sql(latest), params)
    _check_counts(requests, _COUNT_BOUNDS)
    # The outcomes some request joined (the rest is never read).
    _check_counts(outcomes.take(pc.drop_null(requests.column("out_row"))), _OUTCOME_BOUNDS)
    every = tenant is None and since is None and until is None
    following, bound = (_EVERY_FOLLOWING, None) if every else (_FOLLOWING, params)
    settlements = store.query(following.format(table="settlements", columns=""), bound)
    resolutions = store.query(
        following.format(table="resolutions", columns="resolution, epoch_us(occurred_at) AS at_us,"), bound
    )
    return History(
        requests=Columns(requests),
        settlements=Columns(settlements),
        resolutions=Columns(resolutions),
        order=_history_order(requests, settlements, resolutions),
        observations=Columns(observed),
        digests=known,
        outcomes=Columns(outcomes),
    )
