"""Replay as a columnar, cached computation.

The evidence comes out of DuckDB as Arrow columns (``replay/_load.py``). Before the fold, every
request row gets its shape and its prices over whole columns (``replay/_rows.py``): what depends
only on the request's decision-relevant attributes and the policy (residency, eligible
deployments, floor, tier, escalation) is worked out once per distinct attribute tuple by the
planner (``core/_plan.py``) and ``route`` itself. The fold is then a scan per tenant, in the order
the decision agent saw, over what depends on state: the budget window's committed amounts (plain
integers per tenant and day, folded exactly as ``core/_budget.py`` folds them, ``_Budget``) and the
latency observations. A row whose cheapest option does not fit the room left is a budget denial
without a call; a dispatch, a downgrade, an escalation or an operator's row calls
``Planner.decide``. The fold keeps per row only what it saw (committed amounts, state version) and
what it decided; the comparison with what was recorded and the report's totals then run over
columns (``replay/_tally.py``).

It compares what the evidence records of each decision's outcome (verdict, tier, deployment, budget
action, estimate, decode strategy) and its context (allowed regions, committed amounts, window,
state version, complexity, floor and preferred tiers, eligible deployments, failover chain,
predicted latency, budgets). Not compared here: the reasons' prose, which ``replay_reference`` compares in
full (a property test checks that both give the same report on generated histories).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from nexuscore.core import Observed, Outcome, Planner, Shape
from nexuscore.policy import RoutingPolicy, cost_micros
from nexuscore.projections import EvidenceStore
from nexuscore.replay._load import KIND_SETTLEMENT, Columns, History, load_history, values_of
from nexuscore.replay._replay import Change, Key, ReplayReport
from nexuscore.replay._rows import BUDGETED, DENIED, Planned, plan_rows
from nexuscore.replay._tally import BUDGET_DENIED, DECIDED, SHAPED, Folded, tally

_DAY_US = 86_400_000_000
_I64 = pa.int64()
# The scan's own kinds of request, beside a shape's (``_rows``): an operator's, a policy unknown.
_CONTROL, _UNKNOWN = 100, 101


class _Budget:
    """One tenant's ``BudgetState`` as mutable integers: per day (a day number) [tenant settled, tenant reserved,
    feature settled, feature reserved], with the same version count and the same days kept."""

    __slots__ = ("seen", "version", "windows")

    def __init__(self) -> None:
        self.version = 0
        self.windows: dict[int, list[Any]] = {}
        # What ``committed`` gave per (day, feature) since the windows last changed, by the scan's
        # one integer for the pair: most requests are read between two changes, and this is one
        # lookup where the sums are five.
        self.seen: dict[int, tuple[int, int]] = {}

    def committed(self, day: int, feature: int) -> tuple[int, int]:
        w = self.windows.get(day)
        if w is None:
            return 0, 0
        return w[0] + w[1], w[2].get(feature, 0) + w[3].get(feature, 0)

    def reserve(self, day: int, feature: int, amount: int) -> None:
        w = self._window(day)
        w[1] += amount
        w[3][feature] = w[3].get(feature, 0) + amount
        self._kept()

    def settle(self, day: int, feature: int, reserved: int, actual: int) -> None:
        w = self._window(day)
        w[0] += actual
        w[1] -= reserved
        w[2][feature] = w[2].get(feature, 0) + actual
        w[3][feature] = w[3].get(feature, 0) - reserved
        self._kept()

    def bump(self) -> None:
        self.version += 1

    def _window(self, day: int) -> list[Any]:
        w = self.windows.get(day)
        if w is None:
            w = self.windows[day] = [0, 0, {}, {}]
        return w

    def _kept(self) -> None:
        """``_with_window``: the two newest days, and any day that still has reservations."""
        self.version += 1
        self.seen.clear()
        if len(self.windows) > 2:
            newest = set(sorted(self.windows)[-2:])
            for day in [d for d, w in self.windows.items() if d not in newest and not w[1]]:
                del self.windows[day]


# A dispatch awaiting its settlement: day, feature, amount held, chain, request row, policy.
_Held = tuple[int, int, int, tuple[str, ...], int, RoutingPolicy]
# An escalation awaiting its resolution: request row, feature, planner, shape, tokens, complexity,
# deadline (UTC microseconds, or None), the latency observations, the policy.
_Escalated = tuple[int, int, Planner, Shape, int, float, int | None, Observed | None, RoutingPolicy]


def _day_numbers(now_us: pa.ChunkedArray) -> pa.Array:
    """Days since 1970-01-01 (floor division: Arrow's integer division truncates)."""
    x = pc.cast(now_us.combine_chunks(), _I64)
    q = pc.divide(x, _DAY_US)
    inexact = pc.and_(pc.less(x, 0), pc.not_equal(pc.multiply(q, _DAY_US), x))
    return pc.subtract(q, pc.cast(inexact, _I64))


def _codes_of(column: pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """A column dictionary-encoded (nulls too), first seen first: (indices as int64, values)."""
    encoded = pc.dictionary_encode(column.combine_chunks(), null_encoding="encode")
    return pc.cast(encoded.indices, _I64), encoded.dictionary


def _served(r: Columns, outcomes: Columns) -> tuple[dict[int, tuple[str, int, int]], set[int]]:
    """The request rows served in the recorded history, with what a settlement reprices by (the
    recorded call: deployment, input and output tokens); and the rows with a recorded dispatch.
    Only those rows: most requests are neither."""
    out_row = r.arrow("out_row")
    at = pc.indices_nonzero(pc.is_valid(out_row))
    calls = outcomes.table.select(["out_deployment", "out_input", "out_output"]).take(out_row.take(at))
    served = dict(
        zip(
            at.to_pylist(),
            zip(*(calls.column(n).to_pylist() for n in calls.column_names), strict=True),
            strict=True,
        )
    )
    dispatch = pc.and_(pc.equal(r.arrow("verdict"), "dispatch"), pc.equal(r.arrow("rec_table"), "decisions"))
    return served, set(pc.indices_nonzero(pc.fill_null(dispatch, False)).to_pylist())


class _ByRow:
    """A column read one row at a time, as Python has the value."""

    __slots__ = ("column",)

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column

    def __getitem__(self, i: int) -> Any:  # noqa: ANN401  # the column's own type
        return self.column[i].as_py()


class _Nullable:
    """A numeric column with nulls, read one row at a time: its values and its validity in place."""

    __slots__ = ("valid", "values")

    def __init__(self, column: pa.ChunkedArray) -> None:
        combined = column.combine_chunks()
        self.values = values_of(pc.fill_null(combined, 0))
        self.valid = values_of(pc.cast(pc.is_valid(combined), pa.int8()))

    def __getitem__(self, i: int) -> Any:  # noqa: ANN401  # the column's own type, or None
        return self.values[i] if self.valid[i] else None


class _Engine:
    def __init__(
        self,
        history: History,
        policy: RoutingPolicy | None,
        recorded_policies: Mapping[str, RoutingPolicy] | None,
        report: ReplayReport,
        keep_changes: int,
    ) -> None:
        r = self.r = history.requests
        self.s, self.v = history.settlements, history.resolutions
        self.policy, self.recorded_policies = policy, recorded_policies
        self.report, self.keep_changes = report, keep_changes
        self.planned = plan_rows(r, policy, recorded_policies, history.digests)
        n = r.rows
        self.budgets: dict[str, _Budget] = {}
        self.held: dict[Key, _Held] = {}
        self.escalated: dict[Key, _Escalated] = {}
        # Per request in the history's order (the scan's): its tenant, feature and day.
        order = history.request_order
        # The tenants' and features' codes as the planner numbered them (first seen first).
        tenant_code, tenants = self.planned.codes.get("tenant_id") or _codes_of(r.arrow("tenant_id"))
        self.tenant_names: list[str] = tenants.to_pylist()
        self.tenant_code = values_of(tenant_code.take(order))
        feature_code, features = self.planned.codes.get("feature") or _codes_of(r.arrow("feature"))
        self.day_number = _day_numbers(r.arrow("now_us")) if n else pa.array([], _I64)
        # (day, feature) as one integer (day * features + feature): the scan's key for a pair.
        self.features = max(1, len(features))
        feature_at = feature_code.take(order)
        self.slot = values_of(pc.add(pc.multiply(self.day_number.take(order), self.features), feature_at))
        control = pc.fill_null(pc.not_equal(r.arrow("control_mode"), ""), False)
        self.control = set(pc.indices_nonzero(control).to_pylist()) if n else set()
        o = history.observations
        self.observed: dict[Key, Observed | None] = {
            (t, q): self._observed(rows)
            for t, q, rows in zip(o["tenant_id"], o["request_id"], o["observations"], strict=True)
        }
        self.folded = Folded(n, self.day_number, order)
        self.settled_tenant: list[str] = self.s["tenant_id"]
        self.settled_request: list[str] = self.s["request_id"]
        v = self.v
        self.resolved = (v["tenant_id"], v["request_id"], v["at_us"], v["resolution"])
        # What the slow path reads by request row (a few rows: the strings and the nullable
        # column one row at a time).
        self.request_ids = _ByRow(r.arrow("request_id"))
        self.now_us = values_of(r.arrow("now_us"))
        self.max_output_tokens = values_of(r.arrow("max_output_tokens"))
        self.latency_slo_ms = _Nullable(r.arrow("latency_slo_ms"))
        self.outcomes = history.outcomes
        self.served, self.recorded_dispatch = _served(r, history.outcomes)

    def budget_of(self, tenant: str) -> _Budget:
        b = self.budgets.get(tenant)
        if b is None:
            b = self.budgets[tenant] = _Budget()
        return b

    @staticmethod
    def _observed(rows: list[dict[str, Any]] | None) -> Observed | None:
        if not rows:
            return None
        return tuple(
            (o["deployment_id"], o["strategy"], o["p50_ms"], o["p95_ms"], o["samples"]) for o in rows
        )

    # --- the three kinds of history -----------------------------------------------------------------

    def unknown_policy(self, i: int, seq: int) -> None:
        """Verify mode, a recorded decision whose policy is not known: it cannot be reproduced."""
        report = self.report
        report.changed += 1
        report.unknown_policies += 1
        if len(self.folded.unknown) < self.keep_changes:
            key = (self.r["tenant_id"][i], self.r["request_id"][i])
            digest = {"policy_digest": self.r["rec_digest"][i]}
            change = Change(
                request_id=key[1], tenant_id=key[0], fields=("policy_digest",), recorded=digest, candidate={}
            )
            self.folded.unknown.append((seq, change))

    def request(self, i: int, p: int, budget: _Budget, at: tuple[str, int, int, int, int]) -> None:
        """Re-decide request row ``i`` (the scan's ``p``-th) with ``Planner.decide``; ``at``: its
        tenant, day and feature, and what the budget window held when the decision agent saw it
        (tenant, feature). What the fold's scan does not do itself."""
        tenant, day, feature, tenant_committed, feature_committed = at
        planner, shape, policy = self.planned.shapes[self.planned.shape_of[i]]
        key = (tenant, self.request_ids[i])
        observed = self.observed.get(key)
        outcome = planner.decide(
            shape, self.planned.tokens_of[i], self.planned.complexity_of[i], self.max_output_tokens[i],
            self.latency_slo_ms[i], (tenant_committed, feature_committed), observed,
        )  # fmt: skip
        verdict = outcome.verdict
        if verdict == "escalated":
            s, now_us = shape.escalation_deadline_s, self.now_us[i]
            deadline = now_us + s * 1_000_000 if s else None
            self.escalated[key] = (
                i, feature, planner, shape, self.planned.tokens_of[i], self.planned.complexity_of[i], deadline,
                observed, policy,
            )  # fmt: skip
        if i in self.control:
            # An operator's kill switch made it: its effect on the budget (none of the decision's
            # own), never compared.
            if verdict != "rejected":
                budget.bump()
            self.report.operator_overrides += 1
            return
        if verdict == "dispatch":
            self._dispatched(i, key, (day, feature, outcome, policy), budget)
            region = policy.deployments_by_id[outcome.deployment_id or ""].region
            self.folded.residency_breaches += region not in shape.allowed_regions
        elif verdict != "rejected":
            budget.bump()
        self.folded.decided[i] = outcome
        self.folded.mode[p] = DECIDED

    def _dispatched(
        self, i: int, key: Key, decided: tuple[int, int, Outcome, RoutingPolicy], budget: _Budget
    ) -> None:
        day, feature, outcome, policy = decided
        amount = outcome.estimated_cost_micros
        budget.reserve(day, feature, amount)
        self.report.candidate_estimated_micros += amount
        if i in self.served:
            self.held[key] = (day, feature, amount, outcome.chain, i, policy)
        elif i not in self.recorded_dispatch:
            # Never served in the recorded history, and no recorded call to reprice: the estimate
            # stands for what it would have cost. The reservation stays held, as the decider keeps
            # one whose outcome never came (a recorded dispatch with no outcome yet costs nothing
            # on either side).
            self.report.candidate_actual_micros += amount

    def settlement(self, j: int) -> None:
        """A recorded settlement: the candidate's reservation settles at the recorded usage, priced
        on the deployment the candidate's chain would have ended on (the recorded one when the
        chain holds it: a failover happens under both)."""
        key = (self.settled_tenant[j], self.settled_request[j])
        held = self.held.pop(key, None)
        if held is None:
            return
        day, feature, amount, chain, i, policy = held
        actual = self._bill(i, chain, policy)
        self.budget_of(key[0]).settle(day, feature, amount, actual)
        self.report.candidate_actual_micros += actual

    def _bill(self, i: int, chain: tuple[str, ...], policy: RoutingPolicy) -> int:
        served_on, input_tokens, output_tokens = self.served[i]
        d = policy.deployments_by_id[served_on if served_on in chain else chain[0]]
        return cost_micros(input_tokens, output_tokens, d.input_micros_per_1k, d.output_micros_per_1k)

    def resolution(self, j: int) -> None:
        """A person's (or the deadline's) resolution of an escalation the candidate made too: the
        request resumes (``decide`` without the escalation stage) or ends as it did."""
        tenants, requests, times, resolutions = self.resolved
        key = (tenants[j], requests[j])
        escalated = self.escalated.pop(key, None)
        if escalated is None:
            return
        i, feature, planner, shape, tokens, cx, deadline, observed, policy = escalated
        at = times[j]
        day, budget = at // _DAY_US, self.budget_of(key[0])
        self.report.reviews_applied += 1
        approved = resolutions[j] not in ("denied", "timed_out")
        if not approved or (deadline is not None and at > deadline):
            budget.bump()
            return
        committed = budget.committed(day, feature)
        slo, max_out = self.latency_slo_ms[i], self.max_output_tokens[i]
        outcome = planner.decide(shape, tokens, cx, max_out, slo, committed, observed, approved=True)
        if outcome.verdict != "dispatch":
            budget.bump()
            return
        amount = outcome.estimated_cost_micros
        budget.reserve(day, feature, amount)
        if i in self.served:
            self.held[key] = (day, feature, amount, outcome.chain, i, policy)

    def take_in(self, interleaved: list[tuple[int, int, int]], taken: int, before: int) -> tuple[int, int]:
        """The settlements and resolutions that come before the ``before``-th request, from the
        ``taken``-th on: how many are taken in then, and the place of the next one (after the last
        request if none is left)."""
        settlement, resolution = self.settlement, self.resolution
        n = len(interleaved)
        while taken < n and interleaved[taken][0] <= before:
            _, kind, j = interleaved[taken]
            if kind == KIND_SETTLEMENT:
                settlement(j)
            else:
                resolution(j)
            taken += 1
        return taken, interleaved[taken][0] if taken < n else 2**62


def _scan_kinds(engine: _Engine, order: pa.Array) -> Sequence[int]:
    """Per request in the scan's order, what the scan does with it: its shape's kind (``_rows``),
    or an operator's row, or a row whose policy is not known."""
    planned = engine.planned
    if not len(order):
        return []
    shape = planned.shape.take(order)
    kinds = pa.array([*planned.kinds, _UNKNOWN], pa.int8())
    kind = kinds.take(pc.if_else(pc.less(shape, 0), len(planned.kinds), shape))
    control = pc.is_in(order, pa.array(sorted(engine.control), _I64))
    return values_of(pc.if_else(pc.and_(control, pc.not_equal(kind, _UNKNOWN)), _CONTROL, kind))


def _slack(planned: Planned, order: pa.Array) -> tuple[Sequence[int], Sequence[int]]:
    """Per request in the scan's order, of a budgeted shape: its tenant's and its feature's budget
    less its cheapest option. The cheapest option does not fit the room left (budget less
    committed) exactly where the committed amount is above this (0 for other rows: never read)."""
    if not len(order):
        return [], []
    shape = pc.if_else(pc.less(planned.shape, 0), pa.scalar(None, pa.int32()), planned.shape).take(order)
    cheapest = planned.cheapest.take(order)
    shapes, out = [s for _, s, _ in planned.shapes], list[Sequence[int]]()
    for budgets in ([s.tenant_budget for s in shapes], [s.feature_budget for s in shapes]):
        slack = pc.subtract(pa.array(budgets, _I64).take(shape), cheapest)
        out.append(values_of(pc.fill_null(slack, 0)))
    return out[0], out[1]


def _scan(engine: _Engine, history: History, progress: Callable[[int, int], None] | None) -> int:
    """The fold, in the history's order; the number of requests. Per request, what the budget
    window holds for its tenant, day and feature; a budget denial where the cheapest option does
    not fit, a shape's own verdict where it needs no state, and ``engine.request`` otherwise. The
    per-request columns it reads and writes are in its own order (``p``), read one after another;
    the settlements and resolutions (a few) are taken in where they come (``History.interleaved``)."""
    order = history.request_order
    kind_of, (tenant_slack, feature_slack) = _scan_kinds(engine, order), _slack(engine.planned, order)
    folded = engine.folded
    tenant_at, feature_at, version_at, mode = (
        folded.tenant_at,
        folded.feature_at,
        folded.version_at,
        folded.mode,
    )
    tenant_names, rows = engine.tenant_names, values_of(order)
    by_code = [engine.budget_of(t) for t in tenant_names]
    total, current, every = len(rows), -1, 5000 if progress is not None else 0
    interleaved = history.interleaved
    # The next settlement's or resolution's place: how many requests come before it.
    taken, at = 0, interleaved[0][0] if interleaved else total + 1
    budget = _Budget()
    # The current tenant's state version as a local (the loop adds 1 on most rows), written back to
    # its budget before anything else reads or changes it (a request decided, a settlement or a
    # resolution taken in, the next tenant's rows), and read again after.
    seen, version = budget.seen, 0
    # Locals: the loop runs once a row.
    request, take_in, unknown, budgeted, denied, shaped, budget_denied, features = (
        engine.request, engine.take_in, _UNKNOWN, BUDGETED, DENIED, SHAPED, BUDGET_DENIED, engine.features,
    )  # fmt: skip
    per_row = zip(kind_of, engine.tenant_code, engine.slot, tenant_slack, feature_slack, strict=True)
    for p, (k, code, slot, t_slack, f_slack) in enumerate(per_row):
        if p == at:
            budget.version = version
            taken, at = take_in(interleaved, taken, p)
            version = budget.version
        if every and p % every == 0 and p and progress is not None:
            progress(p, total)
        if code != current:
            budget.version = version
            current = code
            budget = by_code[code]
            seen, version = budget.seen, budget.version
        if k == unknown:
            engine.unknown_policy(rows[p], p)
            continue
        committed = seen.get(slot)
        if committed is None:
            committed = seen[slot] = budget.committed(*divmod(slot, features))
        t, f = committed
        tenant_at[p], feature_at[p], version_at[p] = t, f, version
        if k == budgeted:
            # The cheapest option fits neither the tenant's nor the feature's room left.
            if t > t_slack or f > f_slack:
                mode[p] = budget_denied
                version += 1
                continue
        elif k <= denied:  # REJECTED or DENIED (0 and 1)
            mode[p] = shaped
            version += k == denied
            continue
        day, feature = divmod(slot, features)
        budget.version = version
        request(rows[p], p, budget, (tenant_names[code], day, feature, t, f))
        version = budget.version
    budget.version = version
    take_in(interleaved, taken, total + 1)
    if progress is not None:
        progress(total, total)
    return total


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Reference counting alone while replaying: the fold makes millions of short-lived objects and
    no cycles, and the collector's passes over the history's million-element lists are pure cost
    (about a seventh of the fold). Restored as it was, whatever happens."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def fold_history(
    history: History,
    policy: RoutingPolicy | None,
    recorded_policies: Mapping[str, RoutingPolicy] | None,
    report: ReplayReport,
    keep_changes: int,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Fold ``history`` (in its order) through the planner, filling ``report``."""
    with _no_cycle_collection():
        engine = _Engine(history, policy, recorded_policies, report, keep_changes)
        report.requests += _scan(engine, history, progress)
        tally(engine.r, engine.outcomes, engine.planned, engine.folded, report, keep_changes)
    return report


def replay(
    store: EvidenceStore,
    policy: RoutingPolicy | None,
    *,
    recorded_policies: Mapping[str, RoutingPolicy] | None = None,
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    progress: Callable[[int, int], None] | None = None,
    keep_changes: int = 1000,
) -> ReplayReport:
    """Re-decide every recorded request under ``policy`` and compare with what was recorded.

    With ``recorded_policies`` (digest -> policy) instead, each request is re-decided under the
    policy its recorded decision names (verify mode): every decision must come out the same.

    ``since``/``until`` bound the requests replayed (by their time); budgets start from nothing at
    ``since``, so spend recorded before it is not counted against the candidate.
    """
    if (policy is None) == (recorded_policies is None):
        raise ValueError("replay under one policy, or under the recorded ones: exactly one")
    report = (
        ReplayReport(policy_version=policy.version, policy_digest=policy.digest)
        if policy is not None
        else ReplayReport(policy_version="recorded", policy_digest="recorded")
    )
    with _no_cycle_collection():
        # Verify mode reads each row's place among the known digests, not the digest itself.
        digests = False if recorded_policies is None else sorted(recorded_policies)
        history = load_history(store, tenant, since, until, digests=digests)
        return fold_history(history, policy, recorded_policies, report, keep_changes, progress)
