"""Replay recorded history through the same pure core, under the recorded or a candidate policy.

Order matters for budgets: per tenant, the decision agent applied decisions and settlements in one
sequence, numbered by ``state_version``. Replay re-applies them in that sequence, so replaying with
the recorded policy reproduces every recorded decision exactly, and a candidate policy shows what
would have changed (budget state re-simulated under the candidate's prices).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from typing import Any

import msgspec

from nexuscore.core import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    on_request,
    on_review,
    settle,
)
from nexuscore.policy import Controls, RoutingPolicy, Switch, cost_micros
from nexuscore.projections import ROW_BUILDERS, EvidenceStore, Row
from nexuscore.schemas import (
    DispatchRequested,
    EscalationResolved,
    InferenceRequested,
    LatencyObservation,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
)

PRODUCER = "nexuscore.replay"
# Columns that differ between any two runs or any two policies without the decision changing.
_IGNORED = {
    "event_id",
    "occurred_at",
    "producer",
    "policy_digest",
    "policy_version",
    "src_topic",
    "src_partition",
    "src_offset",
    "data_region",
    "policy_stage",
}
_COMPARED = (
    "_table",
    "verdict",
    "reason_code",
    "tier",
    "deployment_id",
    "budget_action",
    "estimated_cost_micros",
    "decode_strategy",
)


class Change(msgspec.Struct, frozen=True, kw_only=True):
    request_id: str
    tenant_id: str
    fields: tuple[str, ...]
    recorded: dict[str, Any]
    candidate: dict[str, Any]


class ReplayReport(msgspec.Struct, kw_only=True):
    policy_version: str
    policy_digest: str
    requests: int = 0
    # Decisions whose outcome differs: verdict, tier, deployment, budget action, estimate, decode.
    changed: int = 0
    # Decisions with the same outcome whose recorded context differs (reasons, budget committed...).
    # Replay with the recorded policy must give 0 of both.
    context_differences: int = 0
    verdict_changes: int = 0
    deployment_changes: int = 0
    tier_changes: int = 0
    recorded_estimated_micros: int = 0
    candidate_estimated_micros: int = 0
    recorded_actual_micros: int = 0
    candidate_actual_micros: int = 0
    recorded_budget_denials: int = 0
    candidate_budget_denials: int = 0
    recorded_escalations: int = 0
    candidate_escalations: int = 0
    decode_changes: int = 0
    residency_changes: int = 0
    # Candidate dispatches to a region outside the allowed ones: must be 0, or the candidate fails.
    residency_breaches: int = 0
    # Verify mode: recorded decisions whose policy is not known (so they cannot be reproduced).
    unknown_policies: int = 0
    # Decisions an operator's kill switch (off or offline) made: replayed for their effect on the
    # budget, never compared (no policy made them).
    operator_overrides: int = 0
    # Escalations a person resolved, re-applied in their recorded order.
    reviews_applied: int = 0
    changes: list[Change] = msgspec.field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Everything but the list of changes: what a promotion's replay report records."""
        out = msgspec.to_builtins(self)
        del out["changes"]
        out["estimated_delta_micros"] = self.estimated_delta_micros
        out["actual_delta_micros"] = self.actual_delta_micros
        return dict(out)

    @property
    def estimated_delta_micros(self) -> int:
        return self.candidate_estimated_micros - self.recorded_estimated_micros

    @property
    def actual_delta_micros(self) -> int:
        return self.candidate_actual_micros - self.recorded_actual_micros


def _decision_row(event: RequestDecided | RequestRejected) -> tuple[str, Row]:
    record = msgspec.to_builtins(event, builtin_types=(datetime, bytes))
    return ROW_BUILDERS[type(event)](record)[0]


def _comparable(table: str, row: Row) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in _IGNORED}
    out["_table"] = table
    return out


def _override(row: Row) -> Controls | None:
    """The kill switch a recorded decision was made under, as far as it shaped the decision."""
    mode = row.get("control_mode")
    if mode is not None:  # recorded as a fact since decisions carry it
        return Controls(switches=(_switch(mode),)) if mode else None
    # Decisions written before ``control_mode`` existed: the switch is known from its reason.
    for x in row.get("reasons") or []:
        if x["stage"] == "admission" and x["subject"] in ("kill_switch", "offline"):
            mode = (
                "offline"
                if x["subject"] == "offline" or x["detail"].startswith("inference offline")
                else "off"
            )
            return Controls(switches=(_switch(mode),))
    return None


def _switch(mode: str) -> Switch:
    return Switch(scope="global", target="", mode=mode, actor="", reason="", event_id="")


def _observed(row: Row) -> Callable[[str, str], LatencyObservation | None]:
    """What the Latency Controller had observed when the recorded decision was made."""
    seen = {
        (o["deployment_id"], o["strategy"]): LatencyObservation(**o)
        for o in row.get("latency_observations") or []
    }
    return lambda deployment, strategy: seen.get((deployment, strategy))


Key = tuple[str, str]  # (tenant id, request id): request ids are unique per tenant only


def _key(row: Row) -> Key:
    return (row["tenant_id"], row["request_id"])


def _ordered(
    requests: list[Row],
    decisions: dict[Key, Row],
    settlements: list[Row],
    resolutions: list[Row] = (),  # type: ignore[assignment]  # an empty tuple is an empty sequence
) -> Iterator[tuple[str, Row]]:
    """Per tenant, the order the decision agent saw: decisions and settlements by state version,
    and rejected requests (which touch no state) just before the next decided request."""
    items: list[tuple[str, float, int, int, str, Row]] = []
    by_tenant: dict[str, list[Row]] = defaultdict(list)
    for r in requests:
        by_tenant[r["tenant_id"]].append(r)
    for tenant, rows in by_tenant.items():
        rows.sort(key=lambda r: (r["src_partition"], r["src_offset"]))
        pending: list[Row] = []
        for r in rows:
            d = decisions.get(_key(r))
            if d is None:
                pending.append(r)
                continue
            version = d["state_version"]
            items.extend((tenant, version, -1, i, "request", p) for i, p in enumerate(pending))
            pending = []
            items.append((tenant, version, 0, 0, "request", r))
        items.extend((tenant, math.inf, -1, i, "request", p) for i, p in enumerate(pending))
    items.extend((s["tenant_id"], s["state_version"], 0, 0, "settlement", s) for s in settlements)
    items.extend((r["tenant_id"], r["state_version"], 0, 0, "resolution", r) for r in resolutions)
    # A total order: ties (a hostile or duplicated store) fall to the kind, then the log position,
    # never to the order the files were listed in.
    kinds = {"request": 0, "settlement": 1, "resolution": 2}
    items.sort(
        key=lambda it: (it[0], it[1], it[2], it[3], kinds[it[4]], it[5]["src_partition"], it[5]["src_offset"])
    )
    for it in items:
        yield it[4], it[5]


def _stand_in(row: Row) -> str:
    """The prompt as the core sees it: only its length decides (token estimates), and the stored
    prompt is encrypted (and may be erased), so replay uses a stand-in of the same length."""
    chars: int = row["prompt_chars"]
    return "x" * max(1, chars)


class _Recorded(msgspec.Struct, frozen=True, kw_only=True):
    """What the evidence holds of the requests chosen for a replay."""

    requests: list[Row]
    # (tenant, request) -> ("decisions" | "rejections", row)
    recorded: dict[Key, tuple[str, Row]]
    decisions: dict[Key, Row]
    settlements: list[Row]
    resolutions: list[Row]
    outcomes: dict[Key, Row]


def _load(
    store: EvidenceStore, tenant: str | None, since: datetime | None, until: datetime | None
) -> _Recorded:
    """The chosen requests (by tenant and time) and every other row that follows them."""
    where = (
        "WHERE ($tenant IS NULL OR tenant_id = $tenant) AND ($since IS NULL OR occurred_at >= $since) "
        "AND ($until IS NULL OR occurred_at < $until)"
    )
    params: dict[str, Any] = {"tenant": tenant, "since": since, "until": until}

    def rows(table: str) -> list[Row]:
        # Table names are ours; filters travel as bound parameters. Other tables follow the
        # requests chosen, whatever their own times.
        chosen = f"SELECT tenant_id, request_id FROM requests {where}"  # noqa: S608
        sql = (
            f"SELECT * FROM requests {where}"  # noqa: S608
            if table == "requests"
            # Request ids are unique per tenant only: rows follow their (tenant, request) pair.
            else f"SELECT t.* FROM {table} t SEMI JOIN ({chosen}) c USING (tenant_id, request_id)"  # noqa: S608
        )
        # In log order, so that where two rows share a key the later one wins, on every run.
        result: list[Row] = store.query(f"{sql} ORDER BY src_partition, src_offset", params).to_pylist()
        return result

    requests = rows("requests")
    recorded: dict[Key, tuple[str, Row]] = {}
    for table in ("decisions", "rejections"):
        for row in rows(table):
            recorded[_key(row)] = (table, row)
    return _Recorded(
        requests=requests,
        recorded=recorded,
        decisions={rid: row for rid, (t, row) in recorded.items() if t == "decisions"},
        settlements=rows("settlements"),
        resolutions=rows("resolutions"),
        outcomes={_key(o): o for o in rows("outcomes")},
    )


_REQUEST_FIELDS = frozenset(InferenceRequested.__struct_fields__)


def _request(row: Row) -> InferenceRequested:
    """The recorded request as the core takes it, the prompt a stand-in of the same length."""
    fields = {k: v for k, v in row.items() if k in _REQUEST_FIELDS}
    return msgspec.convert({**fields, "prompt": _stand_in(row)}, InferenceRequested)


class _Replayer:
    """One replay's state: budgets per tenant, the reservations held, the deployment chosen per
    request, the escalations awaiting their recorded resolution; and the report it fills."""

    def __init__(
        self,
        recorded: _Recorded,
        policy: RoutingPolicy | None,
        recorded_policies: Mapping[str, RoutingPolicy] | None,
        report: ReplayReport,
        keep_changes: int,
    ) -> None:
        self.recorded = recorded
        self.policy = policy
        self.recorded_policies = recorded_policies
        self.report = report
        self.keep_changes = keep_changes
        self.policy_of: dict[Key, RoutingPolicy] = {}
        self.states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
        self.chosen: dict[Key, str] = {}
        self.chains: dict[Key, tuple[str, ...]] = {}
        self.reservations: dict[Key, Reservation] = {}
        self.escalated: dict[Key, tuple[InferenceRequested, RequestDecided]] = {}

    def resolution(self, row: Row) -> None:
        """A person's (or the deadline's) resolution of an escalation, if the candidate escalated
        it too: the request resumes or ends as it did."""
        tenant_id, request_id = row["tenant_id"], row["request_id"]
        key = (tenant_id, request_id)
        if key not in self.escalated:
            return  # the candidate did not escalate it
        request, escalation = self.escalated.pop(key)
        action = {"denied": "denied", "timed_out": "timed_out"}.get(row["resolution"], "approved")
        review = ReviewRecorded(
            event_id=row["review_event_id"], request_id=request_id, tenant_id=tenant_id,
            occurred_at=row["occurred_at"], producer=PRODUCER, action=action,  # type: ignore[arg-type]  # one of the three
            reviewer=row["reviewer"], reason=row["review_reason"], deadline=escalation.review_deadline,
        )  # fmt: skip
        self.states[tenant_id], reservation, events = on_review(
            self.states[tenant_id], request, escalation, review, self.policy_of[key], PRODUCER,
            row["occurred_at"], latency=_observed(self.recorded.decisions.get(key, {})),
        )  # fmt: skip
        self.report.reviews_applied += 1
        if reservation is not None:
            self.reservations[key] = reservation
            resolved = events[0]
            assert isinstance(resolved, EscalationResolved) and resolved.deployment_id is not None
            self.chosen[key] = resolved.deployment_id
            dispatch = events[1]
            assert isinstance(dispatch, DispatchRequested)
            self.chains[key] = (dispatch.deployment_id, *(f.deployment_id for f in dispatch.fallbacks))

    def settlement(self, row: Row) -> None:
        """A recorded settlement: the candidate's reservation settles at what the recorded call would
        have cost on the deployment the candidate chose."""
        key = _key(row)
        deployment = self.chosen.get(key)
        outcome = self.recorded.outcomes.get(key)
        if deployment is None or outcome is None:
            return
        held = self.reservations.pop(key, None)
        if held is None:
            return
        # The recorded usage, priced (the worker's own function) on the deployment the candidate's
        # chain would have ended on: the recorded one when the chain holds it (a failover happens
        # under both), else the candidate's first.
        served_on = (
            outcome["deployment_id"] if outcome["deployment_id"] in self.chains.get(key, ()) else deployment
        )
        d = self.policy_of[key].deployments_by_id[served_on]
        actual = cost_micros(
            outcome["input_tokens"], outcome["output_tokens"], d.input_micros_per_1k, d.output_micros_per_1k
        )
        self.states[row["tenant_id"]], _ = settle(self.states[row["tenant_id"]], held, actual)
        self.report.candidate_actual_micros += actual

    def request(self, row: Row) -> bool:
        """Re-decide a recorded request and compare; False if its policy is unknown (not counted
        as progress)."""
        key = _key(row)
        request = _request(row)
        rec_table, rec_row = self.recorded.recorded.get(key, ("missing", {}))
        use = (
            self.policy
            if self.recorded_policies is None
            else self.recorded_policies.get(rec_row.get("policy_digest", ""))
        )
        if use is None:
            unknown_policy(self.report, key, rec_row, self.keep_changes)
            return False
        self.policy_of[key] = use
        override = _override(rec_row)
        decided = self._decide(key, request, rec_row, use, override)
        if override is not None:
            self.report.requests += 1
            self.report.operator_overrides += 1
            return True
        table, cand_row = _decision_row(decided)
        if isinstance(decided, RequestDecided) and decided.verdict == "dispatch":
            self._dispatched(key, decided, rec_table == "decisions" and rec_row["verdict"] == "dispatch")
        _count(self.report, key, use, (rec_table, rec_row), (table, cand_row), self.recorded.outcomes)
        _compare(self.report, key, (rec_table, rec_row), (table, cand_row), self.keep_changes)
        return True

    def _decide(
        self,
        key: Key,
        request: InferenceRequested,
        rec_row: Row,
        use: RoutingPolicy,
        override: Controls | None,
    ) -> RequestDecided | RequestRejected:
        """The core's decision, folded into the tenant's budget state, as the decider would."""
        tenant_id = key[0]
        now = rec_row.get("occurred_at") or request.occurred_at
        self.states[tenant_id], reservation, events = on_request(
            self.states[tenant_id], request, use, PRODUCER, now,
            controls=override or Controls(), latency=_observed(rec_row),
        )  # fmt: skip
        if reservation is not None:
            self.reservations[key] = reservation
        decided = events[0]
        assert isinstance(decided, RequestDecided | RequestRejected)
        if isinstance(decided, RequestDecided) and decided.verdict == "escalated":
            self.escalated[key] = (request, decided)
        return decided

    def _dispatched(self, key: Key, decided: RequestDecided, recorded_dispatch: bool) -> None:
        deployment_id = decided.budget.deployment_id
        assert deployment_id is not None
        self.chosen[key] = deployment_id
        self.chains[key] = (deployment_id, *decided.routing.fallbacks)
        self.report.candidate_estimated_micros += decided.budget.estimated_cost_micros
        if key not in self.recorded.outcomes and not recorded_dispatch:
            # Never served in the recorded history, and no recorded call to reprice: the estimate
            # stands for what it would have cost. The reservation stays held, as the decider keeps
            # one whose outcome never came (a recorded dispatch with no outcome yet costs nothing
            # on either side).
            self.report.candidate_actual_micros += decided.budget.estimated_cost_micros


def unknown_policy(report: ReplayReport, key: Key, rec_row: Row, keep_changes: int) -> None:
    """Verify mode, a recorded decision whose policy is not known: it cannot be reproduced."""
    report.requests += 1
    report.changed += 1
    report.unknown_policies += 1
    if len(report.changes) < keep_changes:
        digest = {"policy_digest": rec_row.get("policy_digest")}
        report.changes.append(
            Change(
                request_id=key[1], tenant_id=key[0], fields=("policy_digest",), recorded=digest, candidate={}
            )
        )


def _count(
    report: ReplayReport,
    key: Key,
    use: RoutingPolicy,
    recorded: tuple[str, Row],
    candidate: tuple[str, Row],
    outcomes: dict[Key, Row],
) -> None:
    """The report's totals: estimates and actuals, denials, escalations, residency, decode."""
    (rec_table, rec_row), (table, cand_row) = recorded, candidate
    if rec_table == "decisions" and rec_row["verdict"] == "dispatch":
        report.recorded_estimated_micros += rec_row["estimated_cost_micros"]
    report.recorded_actual_micros += outcomes[key]["cost_micros"] if key in outcomes else 0
    report.requests += 1
    if table == "decisions" and cand_row["verdict"] == "dispatch":
        region = use.deployments_by_id[cand_row["deployment_id"]].region
        report.residency_breaches += region not in cand_row["allowed_regions"]
    report.recorded_budget_denials += rec_row.get("budget_action") == "denied"
    report.candidate_budget_denials += cand_row.get("budget_action") == "denied"
    report.recorded_escalations += rec_row.get("verdict") == "escalated"
    report.candidate_escalations += cand_row.get("verdict") == "escalated"
    if rec_table == table == "decisions":
        report.decode_changes += rec_row["decode_strategy"] != cand_row["decode_strategy"]
        report.residency_changes += rec_row["allowed_regions"] != cand_row["allowed_regions"]


def _compare(
    report: ReplayReport, key: Key, recorded: tuple[str, Row], candidate: tuple[str, Row], keep_changes: int
) -> None:
    """Recorded against candidate: the same, a different context only, or a different decision."""
    (rec_table, rec_row), (table, cand_row) = recorded, candidate
    a, b = _comparable(rec_table, rec_row), _comparable(table, cand_row)
    if a == b:
        return
    fields = tuple(sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)))
    if not (rec_table != table or any(f in _COMPARED for f in fields)):
        # Same decision, different context (e.g. the budget already committed).
        report.context_differences += 1
        return
    report.changed += 1
    report.verdict_changes += a.get("verdict") != b.get("verdict") or rec_table != table
    report.deployment_changes += a.get("deployment_id") != b.get("deployment_id")
    report.tier_changes += a.get("tier") != b.get("tier")
    if len(report.changes) < keep_changes:
        report.changes.append(
            Change(
                request_id=key[1],
                tenant_id=key[0],
                fields=fields,
                recorded={k: a.get(k) for k in _COMPARED if k in a},
                candidate={k: b.get(k) for k in _COMPARED if k in b},
            )
        )


def replay_reference(
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
    """Re-decide every recorded request under ``policy`` with the full ``decide`` (every reason
    rebuilt, whole rows compared) and compare with what was recorded: the reference that the
    columnar ``replay`` is checked against, and the simplest correct way to replay.

    With ``recorded_policies`` (digest -> policy) instead, each request is re-decided under the
    policy its recorded decision names (verify mode): every decision must come out the same.

    ``since``/``until`` bound the requests replayed (by their time); budgets start from nothing at
    ``since``, so spend recorded before it is not counted against the candidate.
    """
    recorded = _load(store, tenant, since, until)
    if (policy is None) == (recorded_policies is None):
        raise ValueError("replay under one policy, or under the recorded ones: exactly one")
    report = (
        ReplayReport(policy_version=policy.version, policy_digest=policy.digest)
        if policy is not None
        else ReplayReport(policy_version="recorded", policy_digest="recorded")
    )
    replayer = _Replayer(recorded, policy, recorded_policies, report, keep_changes)
    total = len(recorded.requests)
    history = _ordered(recorded.requests, recorded.decisions, recorded.settlements, recorded.resolutions)
    for kind, row in history:
        if kind == "resolution":
            replayer.resolution(row)
        elif kind == "settlement":
            replayer.settlement(row)
        elif replayer.request(row) and progress is not None:
            progress(report.requests, total)
    return report
