"""Builders of test inputs shared by the test tiers (plain functions, no mocks)."""

from __future__ import annotations

import zlib
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore._clock import FixedClock
from nexuscore.core import derive_id
from nexuscore.policy import RoutingPolicy, default_policy
from nexuscore.projections import Projector
from nexuscore.schemas import AvroCodec, Event, InferenceRequested
from nexuscore.streams import Topics

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


# --- evidence without a broker: the projector's own path, fed records by hand ---------------------

_TOPIC_OF = {
    "InferenceRequested": "requests",
    "RequestDecided": "decisions",
    "RequestRejected": "decisions",
    "BudgetSettled": "decisions",
    "DispatchRequested": "dispatch",
    "ModelCallAttempted": "attempts",
    "OutcomeRecorded": "outcomes",
    "DeadLettered": "deadletter",
    "ReviewRecorded": "governance",
    "PolicyStageChanged": "governance",
}


def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: tests are repeatable


def project(
    root: Path,
    events: list[Event],
    *,
    key: Ed25519PrivateKey | None = None,
    partitions: int = 2,
    flush_every: int = 0,
    policy: RoutingPolicy = POLICY,
) -> Projector:
    """Project ``events`` into a sealed store under ``root`` exactly as the projector does from Kafka
    (decode, dedup, encrypt, seal, commit), with records made by hand: the log is this list."""
    topics = Topics()
    projector = Projector(
        "unused:9092",
        root,
        key or signing_key(),
        FixedClock(T0),
        regions={t.id: t.home_region for t in policy.tenants},
        topics=topics,
    )
    projector.recover()
    codec = AvroCodec()
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    batches: dict[Any, Any] = {}
    for n, e in enumerate(events, 1):
        topic = getattr(topics, _TOPIC_OF[type(e).__name__])
        partition = zlib.crc32(e.tenant_id.encode()) % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        record = ConsumerRecord(
            topic=topic, partition=partition, offset=offset, timestamp=0, timestamp_type=0,
            key=e.tenant_id.encode(), value=codec.encode(e), checksum=None, serialized_key_size=0,
            serialized_value_size=0, headers=(),
        )  # fmt: skip
        projector.add(batches, record)
        if flush_every and n % flush_every == 0:
            projector.flush(batches)
            batches = {}
    if batches:
        projector.flush(batches)
    return projector
