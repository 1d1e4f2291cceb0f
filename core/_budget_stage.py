"""The budget stage: reserve the estimate on the chosen deployment, or downgrade, or deny.

Depends on state: the committed amounts of the budget window (the tenant's and the feature's).
Everything else it reads was worked out by ``route`` (``core/_route.py``).
"""

from __future__ import annotations

from typing import Literal

import msgspec

from nexuscore.core._budget import Window
from nexuscore.core._route import Route
from nexuscore.policy import Deployment
from nexuscore.schemas import BudgetDecision, Reason

BudgetAction = Literal["reserved", "downgraded", "denied", "not_applicable"]


class Budgeted(msgspec.Struct, frozen=True, kw_only=True):
    """What the budget allows: the deployment that fits (None: denied) and the failover chain."""

    fitting: Deployment | None
    action: BudgetAction
    # The fitting deployment, then the same tier's others that the budget allows, cheapest first.
    chain: tuple[Deployment, ...]
    # The options rejected for the budget, and the downgrade, if any.
    reasons: tuple[Reason, ...]


def budget_stage(routed: Route, window: Window) -> Budgeted:
    """The first of the route's options that fits both the tenant's and the feature's budget."""
    chosen = routed.chosen
    assert chosen is not None, "the budget stage follows a route that chose a deployment"
    tenant_committed = window.tenant_committed
    feature_committed = window.feature_committed(routed.feature)
    tenant_budget, feature_budget = routed.tenant_budget_micros, routed.feature_budget_micros
    reasons: list[Reason] = []
    fitting: Deployment | None = None
    for d in routed.options:
        estimate = routed.cost(d)
        if tenant_committed + estimate > tenant_budget:
            why = f"tenant budget: {tenant_committed} + {estimate} > {tenant_budget} micro-USD"
        elif feature_committed + estimate > feature_budget:
            why = f"feature budget: {feature_committed} + {estimate} > {feature_budget} micro-USD"
        else:
            fitting = d
            break
        reasons.append(Reason(stage="budget", kind="rejected_alternative", subject=d.id, detail=why))
    if fitting is None:
        return Budgeted(fitting=None, action="denied", chain=(), reasons=tuple(reasons))
    if fitting is not chosen:
        detail = f"downgraded from {chosen.id} to fit the budget"
        reasons.append(Reason(stage="budget", kind="note", subject=fitting.id, detail=detail))

    def fits(d: Deployment) -> bool:
        estimate = routed.cost(d)
        return tenant_committed + estimate <= tenant_budget and feature_committed + estimate <= feature_budget

    others = sorted(
        (d for d in routed.eligible if d.tier == fitting.tier and d is not fitting and fits(d)),
        key=lambda d: (routed.cost(d), d.id),
    )
    return Budgeted(
        fitting=fitting,
        action="reserved" if fitting is chosen else "downgraded",
        chain=(fitting, *others),
        reasons=tuple(reasons),
    )


def budget_decision(
    routed: Route, day: str, window: Window, action: BudgetAction, d: Deployment | None, estimate: int
) -> BudgetDecision:
    """The budget record of a decision: the action, the estimate held and the window's totals."""
    return BudgetDecision(
        action=action,
        window=day,
        estimated_cost_micros=estimate,
        tenant_budget_micros=routed.tenant_budget_micros,
        tenant_committed_micros=window.tenant_committed,
        feature_budget_micros=routed.feature_budget_micros,
        feature_committed_micros=window.feature_committed(routed.feature),
        deployment_id=d.id if d else None,
        tier=d.tier if d else None,
    )
