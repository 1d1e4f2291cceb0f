"""Builders of test inputs shared by the test tiers (plain functions, no mocks)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from nexuscore.core import derive_id
from nexuscore.policy import RoutingPolicy, default_policy
from nexuscore.schemas import InferenceRequested

T0 = datetime(2026, 11, 25, 9, 0, tzinfo=UTC)
POLICY = default_policy()


def request(**overrides: Any) -> InferenceRequested:
    fields: dict[str, Any] = {
        "event_id": "req-1",
        "request_id": "req-1",
        "tenant_id": "acme-bank",
        "occurred_at": T0,
        "producer": "tests",
        "feature": "support-chat",
        "task_type": "chat",
        "risk_class": "low",
        "data_classification": "public",
        "prompt": "What is the balance on my account?",
        "max_output_tokens": 128,
    }
    fields.update(overrides)
    if "request_id" in overrides and "event_id" not in overrides:
        fields["event_id"] = overrides["request_id"]
    return InferenceRequested(**fields)


def numbered(i: int, **overrides: Any) -> InferenceRequested:
    rid = derive_id("tests", i)
    return request(request_id=rid, event_id=rid, **overrides)


def with_budgets(policy: RoutingPolicy, tenant_usd: str, feature_usd: str) -> RoutingPolicy:
    """The same policy with every tenant's and feature's daily budget replaced."""
    data = policy.model_dump(mode="json")
    for t in data["tenants"]:
        t["daily_budget_usd"] = tenant_usd
        for f in t["features"]:
            f["daily_budget_usd"] = feature_usd
    return RoutingPolicy.model_validate(data)


def replace(event: Any, **changes: Any) -> Any:
    return msgspec.structs.replace(event, **changes)
