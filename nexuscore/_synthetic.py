"""Synthetic traffic for the demo, the tests and the benchmarks: deterministic for a given seed."""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec
from aiokafka import AIOKafkaProducer

from nexuscore.core import derive_id
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec, InferenceRequested
from nexuscore.transport import Topics

TASKS = (
    "chat",
    "summarise",
    "extract",
    "credit_decision",
    "sanctions_screening",
    "claims_triage",
    "kyc_check",
)
RISKS = ("low", "medium", "high", "critical")
CLASSES = ("public", "internal", "confidential", "restricted")
WORDS = [
    "account",
    "payment",
    "credit",
    "customer",
    "risk",
    "sanctions",
    "claim",
    "policy",
    "review",
    "transfer",
    "limit",
    "balance",
    "report",
]


def synthetic_requests(
    policy: RoutingPolicy, n: int, *, seed: int, start: datetime, run: str
) -> list[InferenceRequested]:
    """``n`` requests over the policy's tenants, features, regions and risk classes.

    About 2% name an unknown tenant, to exercise admission.
    """
    rng = random.Random(seed)  # noqa: S311  # test data, not cryptography
    out = []
    for i in range(n):
        tenant = rng.choice(policy.tenants)
        tenant_id = tenant.id if rng.random() > 0.02 else "unknown-tenant"
        feature = rng.choice(tenant.features).id
        task = rng.choice(TASKS)
        risk = rng.choices(RISKS, weights=(50, 30, 17, 3))[0]
        words = rng.randint(30, 700)
        prompt = " ".join(rng.choice(WORDS) for _ in range(words))
        request_id = derive_id(run, "request", i)
        out.append(
            InferenceRequested(
                event_id=request_id,
                request_id=request_id,
                tenant_id=tenant_id,
                occurred_at=start + timedelta(milliseconds=i),
                producer="nexuscore.synthetic",
                trace_id=derive_id(run, "trace", i),
                feature=feature,
                task_type=task,
                risk_class=risk,  # type: ignore[arg-type]  # drawn from RISKS
                data_classification=rng.choices(CLASSES, weights=(20, 40, 30, 10))[0],  # type: ignore[arg-type]  # drawn from CLASSES
                prompt=prompt,
                max_output_tokens=rng.choice((64, 128, 256, 512)),
                required_capabilities=["tools"] if rng.random() < 0.1 else [],
                complexity=round(rng.random(), 3) if rng.random() < 0.5 else None,
                latency_slo_ms=rng.choice((None, None, 3000, 8000)),
            )
        )
    return out


def malformed_messages(codec: AvroCodec, sample: InferenceRequested) -> list[tuple[str, bytes]]:
    """One message of each kind of bad input the demo and tests publish on purpose (every one must
    reach the dead letters), each keyed by a real tenant."""
    valid = codec.encode(sample)
    # The Struct constructor does not check constraints; the decoder does.
    out_of_range = msgspec.structs.replace(sample, max_output_tokens=0, event_id=sample.event_id + "-bad")
    return [
        ("not avro", b'{"tenant_id": "acme-bank", "prompt": "json is not the contract"}'),
        ("unknown fingerprint", b"\xc3\x01" + b"\x00" * 8 + b"\x02x"),
        ("truncated body", valid[: len(valid) // 2]),
        ("value out of range", codec.encode(out_of_range)),
    ]


async def publish(
    producer: AIOKafkaProducer, topics: Topics, codec: AvroCodec, requests: Iterable[InferenceRequested]
) -> int:
    """Publish requests keyed by tenant; returns how many were acknowledged."""
    futures = [
        await producer.send(topics.requests, codec.encode(r), key=r.tenant_id.encode()) for r in requests
    ]
    for f in futures:
        await f
    return len(futures)
