"""The default policy as small lookup arrays, so the generator can route whole columns at once."""

from __future__ import annotations

import numpy as np
from aiokafka.partitioner import murmur2

from bench._evidence.synthetic import TENANT_W, TIERS
from nexuscore._synthetic import CLASSES
from nexuscore.policy import RoutingPolicy
from nexuscore.transport import DEFAULT_PARTITIONS


class PolicyTables:
    """The default policy as small lookup arrays the generator indexes.

    Tenants, features and deployments become index codes; residency and the cheapest fitting
    deployment are worked out once per (classification, tenant) "combo" (``classification * 4 +
    tenant``), and per tier and whether tools are needed.
    """

    def __init__(self, policy: RoutingPolicy) -> None:
        self.policy = policy
        self.tenants = [t.id for t in policy.tenants]
        assert len(self.tenants) == len(TENANT_W), "the generator's tenant weights fit the default policy"
        self.regions = list(policy.regions)
        self.home = np.array([self.regions.index(t.home_region) for t in policy.tenants])
        self.partition = np.array(
            [(murmur2(t.encode()) & 0x7FFFFFFF) % DEFAULT_PARTITIONS for t in self.tenants]
        )
        self.tenant_budget = np.array([int(t.daily_budget_usd * 1_000_000) for t in policy.tenants])
        feats = [(ti, f) for ti, t in enumerate(policy.tenants) for f in t.features]
        self.feature_names = [f.id for _, f in feats]
        self.feature_budget = np.array([int(f.daily_budget_usd * 1_000_000) for _, f in feats])
        self.feature_slo = np.array([f.latency_slo_ms for _, f in feats])
        self.feature_base = np.array([sum(len(t.features) for t in policy.tenants[:i]) for i in range(4)])
        self.feature_count = np.array([len(t.features) for t in policy.tenants])
        self._deployments(policy)
        self._residency(policy)
        self._cheapest()
        self._alternatives()
        self.escalation = {e.id: e for e in policy.escalation}
        self.rules = list(policy.routing.rules)

    def _deployments(self, policy: RoutingPolicy) -> None:
        deps = list(policy.deployments)
        self.deps = deps
        self.dep_ids = [d.id for d in deps]
        self.dep_model = [d.model for d in deps]
        self.dep_provider = [d.provider for d in deps]
        self.dep_region = [d.region for d in deps]
        self.dep_tier = np.array([TIERS.index(d.tier) for d in deps])
        self.dep_in = np.array([d.input_micros_per_1k for d in deps], dtype=np.int64)
        self.dep_out = np.array([d.output_micros_per_1k for d in deps], dtype=np.int64)
        self.dep_version = [f"{d.model}-2026-09-{10 + i:02d}" for i, d in enumerate(deps)]
        # Decode strategies: the first two of each deployment (padded), by index and by name.
        self.dep_nstrat = np.array([len(d.decode) for d in deps])
        self.dep_ttft = np.array(
            [[s.ttft_ms for s in d.decode][:2] + [0] * (2 - len(d.decode)) for d in deps]
        )
        self.dep_mspt = np.array(
            [[s.ms_per_output_token for s in d.decode][:2] + [0.0] * (2 - len(d.decode)) for d in deps]
        )
        self.strategy_names = sorted({s.name for d in deps for s in d.decode})
        self.dep_strat = np.array(
            [
                [self.strategy_names.index(s.name) for s in d.decode][:2] + [0] * (2 - len(d.decode))
                for d in deps
            ]
        )
        self.verdict_reason_dispatch = [f"reserved on {d.id} ({d.tier}, {d.region})" for d in deps]

    def _residency(self, policy: RoutingPolicy) -> None:
        """Residency per (classification, tenant)."""
        self.res_rule: list[str] = []
        self.res_basis: list[str] = []
        self.res_allowed: list[list[str]] = []
        self.res_detail: list[str] = []
        for c in CLASSES:
            rule = policy.residency_by_class[c]
            for t in policy.tenants:
                allowed = sorted({t.home_region if r == "home" else r for r in rule.allowed})
                self.res_rule.append(rule.id)
                self.res_basis.append(rule.transfer_basis)
                self.res_allowed.append(allowed)
                self.res_detail.append(
                    f"{c} data of a {t.home_region} tenant: allowed in {', '.join(allowed)}"
                )

    def _cheapest(self) -> None:
        """Chosen deployment per (classification, tenant, tier, needs tools): the cheapest that fits;
        and the eligible deployments per combo, the 16 without tools first, then the 16 with."""
        deps = self.deps
        self.chosen = np.full((len(CLASSES) * 4, len(TIERS), 2), -1)
        self.eligible: list[list[str]] = []
        for combo, allowed in enumerate(self.res_allowed):
            for tools in (0, 1):
                ok = [
                    i
                    for i, d in enumerate(deps)
                    if d.region in allowed and (not tools or "tools" in d.capabilities)
                ]
                if tools == 0:
                    self.eligible.append([deps[i].id for i in ok])
                for tier in range(len(TIERS)):
                    fits = [i for i in ok if self.dep_tier[i] == tier]
                    if fits:
                        self.chosen[combo, tier, tools] = min(
                            fits, key=lambda i: (self.dep_in[i] + self.dep_out[i], deps[i].id)
                        )
        for allowed in self.res_allowed:
            self.eligible.append([d.id for d in deps if d.region in allowed and "tools" in d.capabilities])

    def _alternatives(self) -> None:
        """An alternative each decision names as rejected, per (classification, tenant, tier)."""
        deps = self.deps
        self.alt: list[tuple[str, str, str, str]] = []
        for allowed in self.res_allowed:
            outside = [d for d in deps if d.region not in allowed]
            for tier in range(len(TIERS)):
                if outside:
                    d = outside[tier % len(outside)]
                    self.alt.append(
                        (
                            "residency",
                            "rejected_alternative",
                            d.id,
                            f"region {d.region} is outside {', '.join(allowed)}",
                        )
                    )
                else:
                    above = [d for d in deps if TIERS.index(d.tier) > tier] or deps
                    d = above[0]
                    self.alt.append(
                        (
                            "routing",
                            "rejected_alternative",
                            d.id,
                            f"tier {d.tier} is above {TIERS[tier]}, the smallest adequate tier",
                        )
                    )
