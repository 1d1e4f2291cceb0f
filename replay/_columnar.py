"""Replay as a columnar, cached computation.

The evidence comes out of DuckDB as columns (``replay/_load.py``), each turned into a Python list
once. Per request, the core's ``Planner`` (``core/_plan.py``) gives the decision's outcome: what
depends on the request's decision-relevant attributes and the policy (residency, eligible
deployments, floor, tier, escalation) is worked out once per coarse key by ``route`` itself; what
depends on state (the budget window's committed amounts, the latency observations) is a short
per-row computation. Budgets are plain integers per tenant and day, folded exactly as
``core/_budget.py`` folds them (``_Budget``), so every recorded decision is reproduced.

It compares what the evidence records of each decision's outcome (verdict, tier, deployment, budget
action, estimate, decode strategy) and its context (allowed regions, committed amounts, window,
state version, complexity, floor and preferred tiers, eligible deployments, failover chain,
predicted latency, budgets). Not compared here: the reasons' prose, which ``replay_reference`` compares in
full (a property test checks that both give the same report on generated histories).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, date, datetime, timedelta
from typing import Any

from nexuscore.core import Observed, Outcome, Planner, Shape
from nexuscore.policy import RoutingPolicy, cost_micros
from nexuscore.projections import EvidenceStore
from nexuscore.replay._load import KIND_REQUEST, KIND_SETTLEMENT, SEP, History, load_history
from nexuscore.replay._replay import PRODUCER, Change, Key, ReplayReport, unknown_policy
from nexuscore.schemas import InferenceRequested

_EPOCH = date(1970, 1, 1)
_DAY_US = 86_400_000_000
_OUTCOME = ("verdict", "tier", "deployment_id", "budget_action", "estimated_cost_micros", "decode_strategy")
_CONTEXT = (
    "allowed_regions", "tenant_committed_micros", "feature_committed_micros", "budget_window",
    "state_version", "complexity", "floor_tier", "preferred_tier", "eligible", "fallbacks",
    "predicted_latency_ms", "tenant_budget_micros", "feature_budget_micros",
)  # fmt: skip
_REC_CONTEXT = tuple("rec_complexity" if f == "complexity" else f for f in _CONTEXT)
# One request's row, as a tuple: what deciding reads, then the recorded outcome and context.
_ROW = (
    "tenant_id", "request_id", "feature", "task_type", "risk_class", "data_classification", "capabilities",
    "complexity", "prompt_chars", "max_output_tokens", "latency_slo_ms", "rec_table", "now_us", "rec_digest",
    "control_mode", "observations", "served", "out_cost", *_OUTCOME, *_REC_CONTEXT,
)  # fmt: skip
_DECIDING = _ROW.index("served") + 1
_REC_TABLE, _SERVED, _OUT_COST = _ROW.index("rec_table"), _ROW.index("served"), _ROW.index("out_cost")
_OUTCOME_AT = slice(_OUT_COST + 1, _OUT_COST + 1 + len(_OUTCOME))
_CONTEXT_AT = slice(_OUTCOME_AT.stop, _OUTCOME_AT.stop + len(_REC_CONTEXT))


class _Budget:
    """One tenant's ``BudgetState`` as mutable integers: per day [tenant settled, tenant reserved,
    feature settled, feature reserved], with the same version count and the same days kept."""

    __slots__ = ("version", "windows")

    def __init__(self) -> None:
        self.version = 0
        self.windows: dict[str, list[Any]] = {}

    def committed(self, day: str, feature: str) -> tuple[int, int]:
        w = self.windows.get(day)
        if w is None:
            return 0, 0
        return w[0] + w[1], w[2].get(feature, 0) + w[3].get(feature, 0)

    def reserve(self, day: str, feature: str, amount: int) -> None:
        w = self._window(day)
        w[1] += amount
        w[3][feature] = w[3].get(feature, 0) + amount
        self._kept()

    def settle(self, day: str, feature: str, reserved: int, actual: int) -> None:
        w = self._window(day)
        w[0] += actual
        w[1] -= reserved
        w[2][feature] = w[2].get(feature, 0) + actual
        w[3][feature] = w[3].get(feature, 0) - reserved
        self._kept()

    def bump(self) -> None:
        self.version += 1

    def _window(self, day: str) -> list[Any]:
        w = self.windows.get(day)
        if w is None:
            w = self.windows[day] = [0, 0, {}, {}]
        return w

    def _kept(self) -> None:
        """``_with_window``: the two newest days, and any day that still has reservations."""
        self.version += 1
        if len(self.windows) > 2:
            newest = set(sorted(self.windows)[-2:])
            for day in [d for d, w in self.windows.items() if d not in newest and not w[1]]:
                del self.windows[day]


# A dispatch awaiting its settlement: day, feature, amount held, chain, request row, policy.
_Held = tuple[str, str, int, tuple[str, ...], int, RoutingPolicy]
# An escalation awaiting its resolution: request row, planner, shape, tokens, complexity, deadline
# (UTC microseconds, or None), the latency observations, the policy.
_Escalated = tuple[int, Planner, Shape, int, float, int | None, Observed | None, RoutingPolicy]


class _Engine:
    def __init__(
        self,
        history: History,
        policy: RoutingPolicy | None,
        recorded_policies: Mapping[str, RoutingPolicy] | None,
        report: ReplayReport,
        keep_changes: int,
    ) -> None:
        self.r = history.requests.data
        self.s = history.settlements.data
        self.v = history.resolutions.data
        self.rows = list(zip(*(self.r[name] for name in _ROW), strict=True))
        self.policy, self.recorded_policies = policy, recorded_policies
        self.report, self.keep_changes = report, keep_changes
        self.planners: dict[str, Planner] = {}
        self.budgets: dict[str, _Budget] = {}
        self.held: dict[Key, _Held] = {}
        self.escalated: dict[Key, _Escalated] = {}
        self.days: dict[int, str] = {}
        self.capabilities: dict[str | None, tuple[str, ...]] = {}
        # Per shape (by identity: the planner keeps them) its allowed regions and eligible
        # deployments as the evidence stores them; per chain its fallbacks.
        self.joined: dict[int, tuple[str, str]] = {}
        self.fallbacks: dict[tuple[str, ...], str] = {}

    # --- lookups, each memoised -------------------------------------------------------------------

    def _day(self, at_us: int) -> str:
        n = at_us // _DAY_US
        day = self.days.get(n)
        if day is None:
            day = self.days[n] = (_EPOCH + timedelta(days=n)).isoformat()
        return day

    def _caps(self, joined: str | None) -> tuple[str, ...]:
        caps = self.capabilities.get(joined)
        if caps is None:
            caps = self.capabilities[joined] = tuple(joined.split(SEP)) if joined else ()
        return caps

    def _joined(self, shape: Shape) -> tuple[str, str]:
        found = self.joined.get(id(shape))
        if found is None:
            found = self.joined[id(shape)] = (SEP.join(shape.allowed_regions), SEP.join(shape.eligible))
        return found

    def _fallbacks(self, chain: tuple[str, ...]) -> str:
        found = self.fallbacks.get(chain)
        if found is None:
            found = self.fallbacks[chain] = SEP.join(chain[1:])
        return found

    def _budget(self, tenant: str) -> _Budget:
        b = self.budgets.get(tenant)
        if b is None:
            b = self.budgets[tenant] = _Budget()
        return b

    def _planner(self, policy: RoutingPolicy) -> Planner:
        p = self.planners.get(policy.digest)
        if p is None:
            p = self.planners[policy.digest] = Planner(policy)
        return p

    def _request(self, i: int, caps: tuple[str, ...]) -> InferenceRequested:
        """The recorded request as ``route`` reads it, its prompt a stand-in of the same length."""
        r = self.r
        return InferenceRequested(
            event_id="replay", request_id=r["request_id"][i], tenant_id=r["tenant_id"][i],
            occurred_at=datetime(1970, 1, 1, tzinfo=UTC), producer=PRODUCER, feature=r["feature"][i],
            task_type=r["task_type"][i], risk_class=r["risk_class"][i],
            data_classification=r["data_classification"][i], prompt="x" * max(1, r["prompt_chars"][i]),
            max_output_tokens=r["max_output_tokens"][i], required_capabilities=list(caps),
            complexity=r["complexity"][i],
        )  # fmt: skip

    @staticmethod
    def _observed(rows: list[dict[str, Any]] | None) -> Observed | None:
        if not rows:
            return None
        return tuple(
            (o["deployment_id"], o["strategy"], o["p50_ms"], o["p95_ms"], o["samples"]) for o in rows
        )

    # --- the three kinds of history -----------------------------------------------------------------

    def request(self, i: int) -> bool:
        """Re-decide a recorded request and compare; False if its policy is unknown."""
        row = self.rows[i]
        (tenant, request_id, feature, task, risk, classification, joined_caps, complexity, chars,
         max_out, slo, rec_table, now_us, rec_digest, control_mode, observations, served) = row[:_DECIDING]  # fmt: skip
        key = (tenant, request_id)
        policy = (
            self.policy if self.recorded_policies is None else self.recorded_policies.get(rec_digest or "")
        )
        if policy is None:
            unknown_policy(self.report, key, {"policy_digest": rec_digest}, self.keep_changes)
            return False
        planner = self.planners.get(policy.digest) or self._planner(policy)
        caps = self.capabilities.get(joined_caps)
        if caps is None:
            caps = self._caps(joined_caps)
        plan_key, tokens, cx = planner.key(
            (tenant, feature, task, risk, classification, caps), complexity, chars, max_out
        )
        shape = planner.shape(plan_key) or planner.learn(plan_key, self._request(i, caps))
        day = self.days.get(now_us // _DAY_US) or self._day(now_us)
        budget = self.budgets.get(tenant) or self._budget(tenant)
        observed = self._observed(observations) if observations else None
        version, committed = budget.version, budget.committed(day, feature)
        outcome = planner.decide(shape, tokens, cx, max_out, slo, committed, observed)
        verdict = outcome.verdict
        if verdict == "escalated":
            s = shape.escalation_deadline_s
            deadline = now_us + s * 1_000_000 if s else None
            self.escalated[key] = (i, planner, shape, tokens, cx, deadline, observed, policy)
        if control_mode:
            # An operator's kill switch made it: its effect on the budget (none of the decision's
            # own), never compared.
            if verdict != "rejected":
                budget.bump()
            self.report.requests += 1
            self.report.operator_overrides += 1
            return True
        if verdict == "dispatch":
            self._dispatched(i, key, (day, feature, outcome, policy), budget)
        elif verdict != "rejected":
            budget.bump()
        self._count(row, outcome, shape, policy)
        self._compare(i, key, (outcome, shape, policy), (day, version, committed))
        return True

    def _dispatched(
        self, i: int, key: Key, decided: tuple[str, str, Outcome, RoutingPolicy], budget: _Budget
    ) -> None:
        day, feature, outcome, policy = decided
        amount = outcome.estimated_cost_micros
        budget.reserve(day, feature, amount)
        self.report.candidate_estimated_micros += amount
        if self.r["served"][i]:
            self.held[key] = (day, feature, amount, outcome.chain, i, policy)
        elif self.r["verdict"][i] != "dispatch" or self.r["rec_table"][i] != "decisions":
            # Never served in the recorded history, and no recorded call to reprice: the estimate
            # stands for what it would have cost. The reservation stays held, as the decider keeps
            # one whose outcome never came (a recorded dispatch with no outcome yet costs nothing
            # on either side).
            self.report.candidate_actual_micros += amount

    def settlement(self, j: int) -> None:
        """A recorded settlement: the candidate's reservation settles at the recorded usage, priced
        on the deployment the candidate's chain would have ended on (the recorded one when the
        chain holds it: a failover happens under both)."""
        key = (self.s["tenant_id"][j], self.s["request_id"][j])
        held = self.held.pop(key, None)
        if held is None:
            return
        day, feature, amount, chain, i, policy = held
        actual = self._bill(i, chain, policy)
        self._budget(key[0]).settle(day, feature, amount, actual)
        self.report.candidate_actual_micros += actual

    def _bill(self, i: int, chain: tuple[str, ...], policy: RoutingPolicy) -> int:
        r = self.r
        served_on = r["out_deployment"][i]
        d = policy.deployments_by_id[served_on if served_on in chain else chain[0]]
        return cost_micros(
            r["out_input"][i], r["out_output"][i], d.input_micros_per_1k, d.output_micros_per_1k
        )

    def resolution(self, j: int) -> None:
        """A person's (or the deadline's) resolution of an escalation the candidate made too: the
        request resumes (``decide`` without the escalation stage) or ends as it did."""
        key = (self.v["tenant_id"][j], self.v["request_id"][j])
        escalated = self.escalated.pop(key, None)
        if escalated is None:
            return
        i, planner, shape, tokens, cx, deadline, observed, policy = escalated
        at = self.v["at_us"][j]
        day, feature, budget = self._day(at), self.r["feature"][i], self._budget(key[0])
        self.report.reviews_applied += 1
        approved = self.v["resolution"][j] not in ("denied", "timed_out")
        if not approved or (deadline is not None and at > deadline):
            budget.bump()
            return
        committed = budget.committed(day, feature)
        slo, max_out = self.r["latency_slo_ms"][i], self.r["max_output_tokens"][i]
        outcome = planner.decide(shape, tokens, cx, max_out, slo, committed, observed, approved=True)
        if outcome.verdict != "dispatch":
            budget.bump()
            return
        amount = outcome.estimated_cost_micros
        budget.reserve(day, feature, amount)
        if self.r["served"][i]:
            self.held[key] = (day, feature, amount, outcome.chain, i, policy)

    # --- the report ---------------------------------------------------------------------------------

    def _count(self, row: tuple[Any, ...], outcome: Outcome, shape: Shape, policy: RoutingPolicy) -> None:
        """The report's totals: estimates and actuals, denials, escalations, residency, decode."""
        report = self.report
        recorded = row[_REC_TABLE] == "decisions"
        rec_verdict, _, _, rec_action, rec_estimate, rec_strategy = row[_OUTCOME_AT]
        if recorded and rec_verdict == "dispatch":
            report.recorded_estimated_micros += rec_estimate
        if row[_SERVED]:
            report.recorded_actual_micros += row[_OUT_COST]
        report.requests += 1
        verdict = outcome.verdict
        if verdict == "dispatch":
            region = policy.deployments_by_id[outcome.deployment_id or ""].region
            report.residency_breaches += region not in shape.allowed_regions
        report.recorded_budget_denials += recorded and rec_action == "denied"
        report.candidate_budget_denials += outcome.budget_action == "denied"
        report.recorded_escalations += recorded and rec_verdict == "escalated"
        report.candidate_escalations += verdict == "escalated"
        if recorded and verdict != "rejected":
            report.decode_changes += rec_strategy != outcome.decode_strategy
            report.residency_changes += row[_CONTEXT_AT][0] != self._joined(shape)[0]

    def _compare(
        self,
        i: int,
        key: Key,
        decided: tuple[Outcome, Shape, RoutingPolicy],
        at: tuple[str, int, tuple[int, int]],
    ) -> None:
        """Recorded against candidate: the same, a different context only, or a different decision."""
        row, report = self.rows[i], self.report
        outcome, shape, policy = decided
        rec_table = row[_REC_TABLE]
        if outcome.verdict == "rejected":
            if rec_table == "rejections" and self.r["rec_code"][i] == outcome.reason_code:
                reason = self._planner(policy).rejection_reason(shape, self._request(i, self._caps(row[6])))
                report.context_differences += self.r["rec_reason"][i] != reason
                return
        elif rec_table == "decisions":
            o = outcome
            if row[_OUTCOME_AT] == (
                o.verdict,
                o.tier,
                o.deployment_id,
                o.budget_action,
                o.estimated_cost_micros,
                o.decode_strategy,
            ):
                day, version, (tenant_committed, feature_committed) = at
                allowed, eligible = self._joined(shape)
                context = (
                    allowed, tenant_committed, feature_committed, day, version, o.complexity, shape.floor,
                    shape.preferred, eligible, self._fallbacks(o.chain), o.predicted_latency_ms,
                    shape.tenant_budget, shape.feature_budget,
                )  # fmt: skip
                report.context_differences += row[_CONTEXT_AT] != context
                return
        self._changed(i, key, outcome)

    def _changed(self, i: int, key: Key, outcome: Outcome) -> None:
        """A different decision: counted, and kept (up to ``keep_changes``) with what differs."""
        report, rec_table = self.report, self.rows[i][_REC_TABLE]
        table = "rejections" if outcome.verdict == "rejected" else "decisions"
        a = _recorded_outcome(self.r, i, rec_table)
        b = _candidate_outcome(outcome, table)
        report.changed += 1
        report.verdict_changes += a.get("verdict") != b.get("verdict") or rec_table != table
        report.deployment_changes += a.get("deployment_id") != b.get("deployment_id")
        report.tier_changes += a.get("tier") != b.get("tier")
        if len(report.changes) < self.keep_changes:
            fields = tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
            report.changes.append(
                Change(request_id=key[1], tenant_id=key[0], fields=fields, recorded=a, candidate=b)
            )


def _recorded_outcome(r: dict[str, list[Any]], i: int, table: str) -> dict[str, Any]:
    if table == "decisions":
        return {"_table": table, **{f: r[f][i] for f in _OUTCOME}}
    if table == "rejections":
        return {"_table": table, "reason_code": r["rec_code"][i]}
    return {"_table": table}


def _candidate_outcome(o: Outcome, table: str) -> dict[str, Any]:
    if table == "rejections":
        return {"_table": table, "reason_code": o.reason_code}
    return {
        "_table": table, "verdict": o.verdict, "tier": o.tier, "deployment_id": o.deployment_id,
        "budget_action": o.budget_action, "estimated_cost_micros": o.estimated_cost_micros,
        "decode_strategy": o.decode_strategy,
    }  # fmt: skip


def fold_history(
    history: History,
    policy: RoutingPolicy | None,
    recorded_policies: Mapping[str, RoutingPolicy] | None,
    report: ReplayReport,
    keep_changes: int,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayReport:
    """Fold ``history`` (in its order) through the planner, filling ``report``."""
    engine = _Engine(history, policy, recorded_policies, report, keep_changes)
    request, settlement, resolution = engine.request, engine.settlement, engine.resolution
    total = history.requests.rows
    for kind, index in history.order:
        if kind == KIND_REQUEST:
            if request(index) and progress is not None and report.requests % 5000 == 0:
                progress(report.requests, total)
        elif kind == KIND_SETTLEMENT:
            settlement(index)
        else:
            resolution(index)
    if progress is not None:
        progress(report.requests, total)
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
    history = load_history(store, tenant, since, until)
    return fold_history(history, policy, recorded_policies, report, keep_changes, progress)
