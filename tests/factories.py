"""Builders of test inputs shared by the test tiers (plain functions, no mocks)."""

from __future__ import annotations

import random
import zlib
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from aiokafka import ConsumerRecord
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore._synthetic import synthetic_requests
from nexuscore.core import (
    EMPTY_STATE,
    BudgetState,
    Reservation,
    derive_id,
    on_outcome,
    on_request,
    on_review,
    timeout_review,
)
from nexuscore.kernel.clock import FixedClock
from nexuscore.policy import RoutingPolicy, TrustStore, default_policy
from nexuscore.projections import LocalKeyStore, Projector
from nexuscore.schemas import (
    AvroCodec,
    CircuitStateChanged,
    DeadLettered,
    DispatchRequested,
    Event,
    InferenceRequested,
    OutcomeRecorded,
    RequestDecided,
    ReviewRecorded,
)
from nexuscore.transport import Topics

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
    "ReviewRecorded": "reviews",
    "PolicyStageChanged": "governance",
    "EscalationResolved": "decisions",
    "CircuitStateChanged": "circuits",
    "KillSwitchChanged": "governance",
    "ActRefused": "decisions",
}


def _key_of(e: Event) -> bytes:
    """The message key the stage that writes ``e`` gives it (each topic's contract)."""
    if isinstance(e, DispatchRequested):
        return e.request_id.encode()
    if isinstance(e, DeadLettered):
        return e.source_topic.encode()
    if isinstance(e, CircuitStateChanged):
        return e.deployment_id.encode()
    return e.tenant_id.encode()


def signing_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))  # fixed: tests are repeatable


def offline_projector(root: Path, keystore: LocalKeyStore | None = None) -> Projector:
    """A projector over ``root`` that never reaches a broker (``recover``, ``add``, ``flush`` only),
    signing with the test key, for the policy's tenants."""
    return Projector(
        "unused:9092",
        root,
        signing_key(),
        FixedClock(T0),
        regions={t.id: t.home_region for t in POLICY.tenants},
        keystore=keystore,
    )


def project(
    root: Path,
    events: list[Event],
    *,
    key: Ed25519PrivateKey | None = None,
    partitions: int = 2,
    flush_every: int = 0,
    policy: RoutingPolicy = POLICY,
    trust: TrustStore | None = None,
    raw: Sequence[tuple[str, bytes | None, bytes | None]] = (),
) -> Projector:
    """Project ``events`` into a sealed store under ``root`` exactly as the projector does from Kafka
    (decode, dedup, encrypt, seal, commit), with records made by hand: the log is this list, each
    appended by the broker at its event's time (``raw``: undecodable (topic, key, value) after it).
    ``trust`` judges governance acts and reviews."""
    topics = Topics()
    projector = Projector(
        "unused:9092",
        root,
        key or signing_key(),
        FixedClock(T0),
        regions={t.id: t.home_region for t in policy.tenants},
        topics=topics,
        trust=trust,
    )
    manifest = projector.recover()
    codec = AvroCodec()
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    batches: dict[Any, Any] = {}
    messages = [
        (getattr(topics, _TOPIC_OF[type(e).__name__]), _key_of(e), codec.encode(e), e.occurred_at)
        for e in events
    ] + [(getattr(topics, topic), key, value, T0) for topic, key, value in raw]
    for n, (topic, key, value, at) in enumerate(messages, 1):
        partition = 0 if topic == topics.governance else zlib.crc32(key or b"") % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        if offset < manifest.positions.get((topic, partition), 0):
            continue  # already projected: a restarted projector seeks past it
        record = ConsumerRecord(
            topic=topic, partition=partition, offset=offset, timestamp=int(at.timestamp() * 1000),
            timestamp_type=1, key=key, value=value, checksum=None, serialized_key_size=0,
            serialized_value_size=0, headers=(),
        )  # fmt: skip
        projector.add(batches, record)
        if flush_every and n % flush_every == 0:
            projector.flush(batches)
            batches = {}
    if batches:
        projector.flush(batches)
    return projector


# --- a recorded history: what the decider and the workers would have written --------------------


def run_history(policy: RoutingPolicy, n: int, seed: int, start: datetime = T0) -> list[Event]:
    """What the decision agent and the workers would have recorded, outcomes arriving out of order."""
    rng = random.Random(seed)
    states: dict[str, BudgetState] = defaultdict(lambda: EMPTY_STATE)
    held: dict[str, Reservation] = {}
    events: list[Event] = []
    in_flight: list[DispatchRequested] = []

    def finish_one() -> None:
        d = in_flight.pop(rng.randrange(len(in_flight)))
        out_tokens = rng.randint(1, d.max_output_tokens)
        cost = -(-(8 * d.input_price_micros_per_1k + out_tokens * d.output_price_micros_per_1k) // 1000)
        outcome = OutcomeRecorded(
            event_id=derive_id(d.event_id, "outcome"), request_id=d.request_id, tenant_id=d.tenant_id,
            occurred_at=d.occurred_at, producer="w", status="answered", feature=d.feature,
            deployment_id=d.deployment_id, model=d.model, model_version="v", region=d.region, attempts=1,
            input_tokens=8, output_tokens=out_tokens, cost_micros=cost, latency_ms=3.0, response="r",
            finish_reason="stop",
        )  # fmt: skip
        events.append(outcome)
        reservation = held.pop(d.request_id)
        states[d.tenant_id], settled = on_outcome(
            states[d.tenant_id], reservation, outcome, "decider", d.occurred_at
        )
        events.extend(settled)

    def review(req: InferenceRequested, escalated: RequestDecided) -> list[Event]:
        """A person approves or denies the escalation, or nobody does before its deadline."""
        assert escalated.review_deadline is not None
        action = rng.choice(["approved", "denied", "timed_out"])
        at = (
            escalated.review_deadline + timedelta(seconds=1)
            if action == "timed_out"
            else escalated.occurred_at
        )
        r = timeout_review(escalated, at) if action == "timed_out" else ReviewRecorded(
            event_id=derive_id(req.request_id, "review"), request_id=req.request_id, tenant_id=req.tenant_id,
            occurred_at=at, producer="reviewer", action=action,  # type: ignore[arg-type]  # one of the three
            reviewer="carol@bank", reason=f"{action} in a test", deadline=escalated.review_deadline,
        )  # fmt: skip
        states[req.tenant_id], reservation, out = on_review(
            states[req.tenant_id], req, escalated, r, policy, "decider", at
        )
        if reservation is not None:
            held[req.request_id] = reservation
        return [r, *out]

    for req in synthetic_requests(policy, n, seed=seed, start=start, run="replay-test"):
        states[req.tenant_id], reservation, out = on_request(
            states[req.tenant_id], req, policy, "decider", req.occurred_at
        )
        if reservation is not None:
            held[req.request_id] = reservation
        events.append(req)
        events.extend(out)
        if isinstance(out[0], RequestDecided) and out[0].verdict == "escalated":
            reviewed = review(req, out[0])
            events.extend(reviewed)
            out = reviewed
        in_flight.extend(e for e in out if isinstance(e, DispatchRequested))
        while in_flight and rng.random() < 0.5:
            finish_one()
    while in_flight:
        finish_one()
    return events
