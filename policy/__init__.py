"""Routing policies: validated, canonicalised and content-addressed."""

from nexuscore.policy._model import (
    DEFAULT_POLICY_PATH,
    DecodeStrategy,
    Deployment,
    EscalationRule,
    Feature,
    Match,
    ResidencyRule,
    RoutingPolicy,
    RoutingRule,
    Tenant,
    cost_micros,
    default_policy,
    load_policy,
    parse_policy,
    tier_rank,
)

__all__ = [
    "DEFAULT_POLICY_PATH",
    "DecodeStrategy",
    "Deployment",
    "EscalationRule",
    "Feature",
    "Match",
    "ResidencyRule",
    "RoutingPolicy",
    "RoutingRule",
    "Tenant",
    "cost_micros",
    "default_policy",
    "load_policy",
    "parse_policy",
    "tier_rank",
]
