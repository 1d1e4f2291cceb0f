"""Hostile input for the fuzz run (``tests/fault/test_fuzz.py``): bad messages for every input topic,
each with its kind and how the evidence must account for it.

Every message is made from a seeded ``random.Random`` when its wave is published (signed acts are
signed then, so that only the forgeries meant to be stale are stale). Three ways to be accounted for:

- ``deadletter``: a ``deadletters`` row at the message's (topic, partition, offset);
- ``refusal``: a ``refusals`` row at its position (a forged, stale or replayed human act);
- ``rejection``: schema-valid requests only, a ``rejections`` row for its (tenant, request id).

On the internal topics (outcomes, dispatch, circuits) only bytes-level hostility is made: a
schema-valid, correctly keyed forgery of a stage's own output cannot be told from that output by
anyone reading the topic; in production Kafka ACLs keep producers off those topics
(``tests/integration/test_acl.py``). Wrong keys and events of a type that does not belong on the
topic can be told apart, and are made.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast

import fastavro
import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore._devkeys import DevKeys
from nexuscore.core import derive_id
from nexuscore.kernel.errors import DecodeError
from nexuscore.kernel.signing import load_private_key
from nexuscore.policy import Registry, RoutingPolicy, load_trust_store, sign_kill_switch, sign_promotion
from nexuscore.schemas import (
    AvroCodec,
    CircuitStateChanged,
    DispatchRequested,
    Event,
    FallbackTarget,
    InferenceRequested,
    KillSwitchChanged,
    OutcomeRecorded,
    PolicyStageChanged,
    ReviewRecorded,
    avro_name,
    schema_for,
)
from nexuscore.services import kill_switch_event, promotion_event, review_event
from nexuscore.streams import POLICY_KEY
from nexuscore.transport import Topics

Expect = Literal["deadletter", "refusal", "rejection"]
ROLES = ("requests", "outcomes", "reviews", "governance", "circuits", "dispatch")
# The broker takes messages of up to 1 MiB (message.max.bytes 1,048,588 with the batch's header):
# these values, with their key and record overhead, are just under it.
NEAR_LIMIT = 1_047_000
# A tenant no valid request names: the only target of genuine "off" switches.
GHOST_TENANT = "fuzz-ghost-tenant"
# What the decider's own timeouts call themselves (a forged timeout pretends to be one).
DECIDER = "nexuscore.decider"


@dataclass
class Hostile:
    """One hostile message: what it is, its bytes, and how the evidence must account for it."""

    kind: str
    role: str
    key: bytes | None
    value: bytes | None
    expect: Expect
    # Schema-valid requests: the (tenant, request id) their rejection names.
    tenant_id: str = ""
    request_id: str = ""
    # Where the broker put it (from the producer's RecordMetadata).
    topic: str = ""
    partition: int = -1
    offset: int = -1
    # Bytes of the value (-1: a tombstone); kept once the value itself is dropped after sending.
    size: int = 0

    def __post_init__(self) -> None:
        self.size = -1 if self.value is None else len(self.value)


@dataclass
class Genuine:
    """A genuine act published during the run (not hostile): it must be taken, and its bytes are
    replayed later as hostile messages."""

    kind: str
    role: str
    key: bytes
    value: bytes
    event_id: str
    topic: str = ""
    partition: int = -1
    offset: int = -1


def topic_of(topics: Topics, role: str) -> str:
    return str(getattr(topics, role))


class Keys:
    """The private keys the acts are signed with: the operator (alice, also a reviewer), a reviewer
    without the operator role (bob), and a key the trust store does not know (mallory)."""

    def __init__(self, keys: DevKeys, rng: random.Random) -> None:
        assert keys.operator is not None and keys.reviewer is not None
        self.operator = load_private_key(keys.operator)
        self.reviewer = load_private_key(keys.reviewer)
        # Seeded, so a rerun signs with the same unknown key.
        self.stranger = Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
        trust = load_trust_store(keys.trust_store)
        names = {entry.name for entry in trust.keys}
        self.operator_name, self.reviewer_name = "alice@demo", "bob@demo"
        assert {self.operator_name, self.reviewer_name} <= names, names
        self.policy_path: Path = keys.policy
        self.operator_path: Path = keys.operator
        self.trust_store = keys.trust_store
        self.trust = trust


class Factory:
    """Makes hostile messages of every kind for every input topic, from one seeded RNG."""

    def __init__(
        self, rng: random.Random, policy: RoutingPolicy, topics: Topics, keys: Keys, run: str
    ) -> None:
        self.rng = rng
        self.policy = policy
        self.topics = topics
        self.keys = keys
        self.run = run
        self.codec = AvroCodec()
        self.n = 0
        self._parsed: dict[type[Event], Any] = {}
        self.genuine_switches: list[Genuine] = []
        # Kinds per role: (kind, weight, maker). Makers take the time of publication.
        self.kinds: dict[str, list[tuple[str, float, Callable[[datetime], Hostile]]]] = {
            role: self._bytes_kinds(role) for role in ROLES
        }
        self.kinds["requests"] += self._request_kinds()
        self.kinds["reviews"] += self._review_kinds()
        self.kinds["governance"] += self._governance_kinds()

    # --- plan ------------------------------------------------------------------------------------

    def plan(self, total: int, huge_prompts: int, near_limit: int) -> list[tuple[str, str]]:
        """``total`` (role, kind) pairs over every role, shuffled: a fixed few near the broker's
        limit and with 600 KiB prompts, the rest drawn by weight."""
        out: list[tuple[str, str]] = []
        roles = [ROLES[i % len(ROLES)] for i in range(near_limit)]
        for i, role in enumerate(roles):
            valid_request = role == "requests" and i % 2 == 0
            out.append(
                (
                    role,
                    "near 1 MiB valid request (ASCII prompt)"
                    if valid_request
                    else "near 1 MiB of random bytes",
                )
            )
        out += [("requests", "600 KiB prompt of 4-byte UTF-8 characters")] * huge_prompts
        shares = {
            "requests": 0.28,
            "reviews": 0.14,
            "governance": 0.16,
            "outcomes": 0.14,
            "circuits": 0.14,
            "dispatch": 0.14,
        }
        rest = max(0, total - len(out))
        for role in self.rng.choices(list(shares), weights=list(shares.values()), k=rest):
            kinds = self.kinds[role]
            kind = self.rng.choices([k for k, _, _ in kinds], weights=[w for _, w, _ in kinds])[0]
            out.append((role, kind))
        self.rng.shuffle(out)
        return out

    def make(self, role: str, kind: str, now: datetime) -> Hostile:
        special: dict[str, Callable[[datetime], Hostile]] = {
            "near 1 MiB of random bytes": lambda _: self._near_limit(role),
            "near 1 MiB valid request (ASCII prompt)": self._near_limit_request,
            "600 KiB prompt of 4-byte UTF-8 characters": self._huge_prompt,
        }
        maker = special.get(kind) or next(m for k, _, m in self.kinds[role] if k == kind)
        h = maker(now)
        # Its kind may differ only for a replay with nothing to replay yet (a forgery instead).
        assert h.role == role, (role, kind, h.role)
        return h

    # --- valid events to start from ----------------------------------------------------------------

    def _id(self, what: str) -> str:
        self.n += 1
        return derive_id(self.run, "fuzz", what, self.n)

    def _tenant(self) -> tuple[str, str]:
        tenant = self.rng.choice(self.policy.tenants)
        return tenant.id, self.rng.choice(tenant.features).id

    def _other_tenant(self, tenant_id: str) -> str:
        return self.rng.choice([t.id for t in self.policy.tenants if t.id != tenant_id])

    def request(self, now: datetime, **fields: Any) -> InferenceRequested:
        tenant, feature = self._tenant()
        rid = "fuzz-" + self._id("request")[:24]
        base = InferenceRequested(
            event_id=rid,
            request_id=rid,
            tenant_id=tenant,
            occurred_at=now,
            producer="fuzz.client",
            feature=feature,
            task_type=self.rng.choice(self.policy.task_types),
            risk_class=self.rng.choice(("low", "medium", "high", "critical")),
            data_classification=self.rng.choice(("public", "internal", "confidential", "restricted")),
            prompt="summarise the account history of the customer " * self.rng.randint(1, 20),
            max_output_tokens=self.rng.choice((64, 128, 256)),
        )
        return msgspec.structs.replace(base, **fields) if fields else base

    def outcome(self, now: datetime) -> OutcomeRecorded:
        tenant, feature = self._tenant()
        d = self.rng.choice(self.policy.deployments)
        rid = "fuzz-" + self._id("outcome")[:24]
        return OutcomeRecorded(
            event_id=self._id("outcome-event"),
            request_id=rid,
            tenant_id=tenant,
            occurred_at=now,
            producer="nexuscore.worker",
            status="answered",
            feature=feature,
            deployment_id=d.id,
            model=d.model,
            model_version=d.model + "-2026-01",
            region=d.region,
            attempts=1,
            input_tokens=self.rng.randint(10, 3000),
            output_tokens=self.rng.randint(10, 500),
            cost_micros=self.rng.randint(0, 5000),
            latency_ms=self.rng.uniform(20, 900),
            response="the account is in good standing",
            finish_reason="stop",
        )

    def dispatch(self, now: datetime) -> DispatchRequested:
        tenant, feature = self._tenant()
        d = self.rng.choice(self.policy.deployments)
        rid = "fuzz-" + self._id("dispatch")[:24]
        event_id = self._id("dispatch-event")
        other = self.rng.choice(self.policy.deployments)
        return DispatchRequested(
            event_id=event_id,
            request_id=rid,
            tenant_id=tenant,
            occurred_at=now,
            producer="nexuscore.decider",
            feature=feature,
            deployment_id=d.id,
            provider=d.provider,
            endpoint=d.endpoint,
            model=d.model,
            region=d.region,
            allowed_regions=[d.region],
            decode_strategy=d.decode[0].name,
            prompt="move the funds to the account below",
            max_output_tokens=128,
            input_price_micros_per_1k=d.input_micros_per_1k,
            output_price_micros_per_1k=d.output_micros_per_1k,
            estimated_cost_micros=1000,
            idempotency_key=event_id,
            requested_at=now,
            fallbacks=[
                FallbackTarget(
                    deployment_id=other.id,
                    provider=other.provider,
                    endpoint=other.endpoint,
                    model=other.model,
                    region=other.region,
                    decode_strategy=other.decode[0].name,
                    input_price_micros_per_1k=other.input_micros_per_1k,
                    output_price_micros_per_1k=other.output_micros_per_1k,
                )
            ],
        )

    def circuit(self, now: datetime) -> CircuitStateChanged:
        d = self.rng.choice(self.policy.deployments)
        tenant, _ = self._tenant()
        return CircuitStateChanged(
            event_id=self._id("circuit"),
            request_id="fuzz-" + self._id("circuit-request")[:24],
            tenant_id=tenant,
            occurred_at=now,
            producer="nexuscore.worker@fuzz:1",
            deployment_id=d.id,
            region=d.region,
            from_state="half_open",
            to_state="closed",
            reason="probe call answered",
            consecutive_failures=0,
        )

    def review(self, now: datetime) -> ReviewRecorded:
        """An unsigned approval of a made-up request (no escalation of it exists)."""
        tenant, _ = self._tenant()
        return ReviewRecorded(
            event_id=self._id("review"),
            request_id="fuzz-" + self._id("review-request")[:24],
            tenant_id=tenant,
            occurred_at=now,
            producer="nexuscore.review",
            causation_id=self._id("review-escalation"),
            action="approved",
            reviewer=self.keys.reviewer_name,
            reason="looks fine",
        )

    def switch(
        self, now: datetime, scope: str = "global", target: str = "", mode: str = "off"
    ) -> KillSwitchChanged:
        """An unsigned kill switch."""
        return KillSwitchChanged(
            event_id=self._id("switch"),
            request_id="",
            tenant_id=target if scope == "tenant" else "",
            occurred_at=now,
            producer="nexuscore.control",
            # Strings off the wire, as a forger writes them (the schema may narrow them).
            scope=cast(Any, scope),
            target=target,
            mode=cast(Any, mode),
            actor=self.keys.operator_name,
            reason="incident drill",
        )

    def signed_switch(
        self,
        now: datetime,
        key: Ed25519PrivateKey,
        actor: str,
        scope: str = "tenant",
        target: str | None = None,
        mode: str = "off",
    ) -> KillSwitchChanged:
        if target is None:
            target = "" if scope == "global" else self._tenant()[0]
        return kill_switch_event(scope, target, mode, f"fuzz {self.n}", key, actor, now)

    # --- encodings -------------------------------------------------------------------------------

    def encode(self, event: Event) -> bytes:
        return self.codec.encode(event)

    def raw_encode(self, event: Event, **fields: Any) -> bytes:
        """``event`` with ``fields`` replaced, Avro-encoded without any validation: fastavro with
        the schema from ``schema_for`` and the 10-byte header of a valid encoding of the type."""
        cls = type(event)
        parsed = self._parsed.get(cls)
        if parsed is None:
            parsed = self._parsed[cls] = fastavro.parse_schema(schema_for(cls))
        header = self.codec.encode(event)[:10]
        record = msgspec.to_builtins(event, builtin_types=(datetime, bytes))
        record.update(fields)
        out = io.BytesIO()
        out.write(header)
        fastavro.schemaless_writer(out, parsed, record)
        return out.getvalue()

    def undecodable(self, role: str, value: bytes | None) -> bool:
        """True when no reader of ``role``'s topic can decode ``value`` as an event of that topic."""
        try:
            self.codec.decode(value, EXPECTED[role])
        except DecodeError:
            return True
        return False

    def _corrupt(self, role: str, valid: bytes, how: str) -> bytes:
        """A truncated, bit-flipped or extended copy of ``valid`` that no reader can decode."""
        for _ in range(200):
            if how == "truncated":
                out = valid[: self.rng.randrange(1, len(valid))]
            elif how == "trailing":
                out = valid + self.rng.randbytes(self.rng.randint(1, 64))
            else:
                flipped = bytearray(valid)
                for _ in range(self.rng.randint(1, 8)):
                    i = self.rng.randrange(len(flipped))
                    flipped[i] ^= 1 << self.rng.randrange(8)
                out = bytes(flipped)
            if self.undecodable(role, out):
                return out
        raise AssertionError(f"could not make an undecodable {how} copy for {role}")

    # --- bytes-level hostility, on every topic ----------------------------------------------------

    def _sample(self, role: str, now: datetime) -> Event:
        makers: dict[str, Callable[[datetime], Event]] = {
            "requests": self.request,
            "outcomes": self.outcome,
            "reviews": self.review,
            "governance": self.switch,
            "circuits": self.circuit,
            "dispatch": self.dispatch,
        }
        return makers[role](now)

    def _key_of(self, role: str, event: Event) -> bytes:
        if role in ("requests", "outcomes", "reviews"):
            return event.tenant_id.encode()
        if role == "dispatch":
            return event.request_id.encode()
        if role == "circuits":
            assert isinstance(event, CircuitStateChanged)
            return event.deployment_id.encode()
        return POLICY_KEY

    def _bytes_kinds(self, role: str) -> list[tuple[str, float, Callable[[datetime], Hostile]]]:
        name = avro_name(EXPECTED[role][0])

        def bad(kind: str, how: str) -> Callable[[datetime], Hostile]:
            def make(now: datetime) -> Hostile:
                event = self._sample(role, now)
                key = self._key_of(role, event)
                if how == "random":
                    value: bytes | None = self.rng.randbytes(self.rng.randint(1, 4096))
                elif how == "empty":
                    value = b""
                elif how == "tombstone":
                    value = None
                else:
                    value = self._corrupt(role, self.encode(event), how)
                return Hostile(kind, role, key, value, "deadletter")

            return make

        kinds: list[tuple[str, float, Callable[[datetime], Hostile]]] = [
            ("random bytes", 3, bad("random bytes", "random")),
            (f"truncated {name}", 3, bad(f"truncated {name}", "truncated")),
            (f"bit-flipped {name}", 3, bad(f"bit-flipped {name}", "flipped")),
            (
                f"trailing bytes after the {name} body",
                1,
                bad(f"trailing bytes after the {name} body", "trailing"),
            ),
            ("empty value", 1, bad("empty value", "empty")),
            ("tombstone (no value)", 1, bad("tombstone (no value)", "tombstone")),
        ]
        for other in ALIEN[role]:
            kind = f"event of another type ({avro_name(other)})"
            kinds.append((kind, 0.5, self._alien(role, kind, other)))
        if role == "governance":
            return kinds
        wrong_key = {
            "requests": "keyed by another tenant",
            "outcomes": "keyed by another tenant",
            "reviews": "keyed by another tenant",
            "dispatch": "keyed by its tenant, not its request id",
            "circuits": "keyed by another deployment",
        }[role]
        kinds.append((wrong_key, 2, self._wrong_key(role, wrong_key)))
        out_of_range = OUT_OF_RANGE.get(role)
        if out_of_range is not None:
            field, value = out_of_range
            kind = f"field out of range ({field} {value})"
            kinds.append((kind, 1, self._out_of_range(role, kind, field, value)))
        kinds.append(("no key", 0.5, self._no_key(role)))
        return kinds

    def _alien(self, role: str, kind: str, cls: type[Event]) -> Callable[[datetime], Hostile]:
        def make(now: datetime) -> Hostile:
            makers: dict[type[Event], Callable[[datetime], Event]] = {
                InferenceRequested: self.request,
                OutcomeRecorded: self.outcome,
                ReviewRecorded: self.review,
                KillSwitchChanged: self.switch,
                CircuitStateChanged: self.circuit,
                DispatchRequested: self.dispatch,
            }
            event = makers[cls](now)
            # Keyed as the topic's own events are, so only the type gives it away.
            if role in ("requests", "outcomes", "reviews"):
                key = event.tenant_id.encode()
            elif role == "dispatch":
                key = event.request_id.encode()
            elif role == "circuits":
                key = self.rng.choice(self.policy.deployments).id.encode()
            else:
                key = POLICY_KEY
            return Hostile(kind, role, key, self.encode(event), "deadletter")

        return make

    def _wrong_key(self, role: str, kind: str) -> Callable[[datetime], Hostile]:
        def make(now: datetime) -> Hostile:
            event = self._sample(role, now)
            if role == "dispatch":
                key = event.tenant_id.encode()
            elif role == "circuits":
                assert isinstance(event, CircuitStateChanged)
                key = self.rng.choice(
                    [d.id for d in self.policy.deployments if d.id != event.deployment_id]
                ).encode()
            else:
                key = self._other_tenant(event.tenant_id).encode()
            return Hostile(kind, role, key, self.encode(event), "deadletter")

        return make

    def _out_of_range(self, role: str, kind: str, field: str, value: object) -> Callable[[datetime], Hostile]:
        """Valid Avro, correctly keyed, but outside the contract's bounds: malformed input."""

        def make(now: datetime) -> Hostile:
            event = self._sample(role, now)
            encoded = self.raw_encode(event, **{field: value})
            assert self.undecodable(role, encoded), kind
            return Hostile(kind, role, self._key_of(role, event), encoded, "deadletter")

        return make

    def _no_key(self, role: str) -> Callable[[datetime], Hostile]:
        def make(now: datetime) -> Hostile:
            return Hostile("no key", role, None, self.encode(self._sample(role, now)), "deadletter")

        return make

    def _near_limit(self, role: str) -> Hostile:
        value = self.rng.randbytes(NEAR_LIMIT - self.rng.randint(0, 512))
        key = self._key_of(role, self._sample(role, datetime.now(UTC)))
        return Hostile("near 1 MiB of random bytes", role, key, value, "deadletter")

    # --- requests: schema-valid with hostile field values ---------------------------------------------

    def _rejected(self, kind: str, event: InferenceRequested, value: bytes | None = None) -> Hostile:
        value = value if value is not None else self.raw_encode(event)
        key = event.tenant_id.encode()
        # Schema-valid and correctly keyed: the decider must decide it, and admission refuse it.
        decoded = self.codec.decode(value, (InferenceRequested,))
        assert decoded == event, kind
        return Hostile(kind, "requests", key, value, "rejection", event.tenant_id, event.request_id)

    def _invalid_request(self, kind: str, **fields: Any) -> Callable[[datetime], Hostile]:
        def make(now: datetime) -> Hostile:
            event = self.request(now)
            value = self.raw_encode(event, **fields)
            assert self.undecodable("requests", value), kind
            return Hostile(kind, "requests", event.tenant_id.encode(), value, "deadletter")

        return make

    def _near_limit_request(self, now: datetime) -> Hostile:
        event = self.request(now)
        overhead = len(self.raw_encode(event, prompt=""))
        prompt = "".join(self.rng.choices("abcdefghij klmnop", k=NEAR_LIMIT - overhead - 8))
        return self._rejected(
            "near 1 MiB valid request (ASCII prompt)", msgspec.structs.replace(event, prompt=prompt)
        )

    def _huge_prompt(self, now: datetime) -> Hostile:
        # 600 KiB of 4-byte characters (U+10000 and up): 153,600 characters.
        chars = [chr(0x10000 + self.rng.randrange(0x1000)) for _ in range(600 * 1024 // 4)]
        event = self.request(now, prompt="".join(chars))
        return self._rejected("600 KiB prompt of 4-byte UTF-8 characters", event)

    def _request_kinds(self) -> list[tuple[str, float, Callable[[datetime], Hostile]]]:
        def unknown_task(now: datetime) -> Hostile:
            task = self.rng.choice(("wire_transfer", "launch_missiles", "", "chat ", "CHAT", "drop table"))
            event = self.request(now, task_type=task or "x" * 200)
            return self._rejected("unknown task type", event)

        def unknown_tenant(now: datetime) -> Hostile:
            tenant = self.rng.choice(
                ("fuzz-evil-bank", "acme-bank ", "ACME-BANK", "t" * 200, "tenant\u200bzero")
            )
            event = self.request(now, tenant_id=tenant)
            return self._rejected("unknown tenant", event)

        def unknown_feature(now: datetime) -> Hostile:
            event = self.request(now, feature=self.rng.choice(("fuzz-feature", "admin", "*", "../../etc")))
            return self._rejected("unknown feature", event)

        def long_id(now: datetime) -> Hostile:
            rid = ("fuzz-long-" + self._id("long")) * 4
            return self._invalid_request("129-character request id", request_id=rid[:129])(now)

        def control_id(now: datetime) -> Hostile:
            bad = self.rng.choice(("\x00", "\x07", "\n", "\x1b[31m", "\x7f", "\r"))
            rid = f"fuzz-{self._id('ctl')[:12]}{bad}x"
            return self._invalid_request("request id with control characters", request_id=rid)(now)

        return [
            ("empty request id", 1.5, self._invalid_request("empty request id", request_id="")),
            ("129-character request id", 1.5, long_id),
            ("request id with control characters", 1.5, control_id),
            (
                "field out of range (max_output_tokens 0)",
                1,
                self._invalid_request("field out of range (max_output_tokens 0)", max_output_tokens=0),
            ),
            ("unknown risk class", 1, self._invalid_request("unknown risk class", risk_class="apocalyptic")),
            ("empty event id", 0.5, self._invalid_request("empty event id", event_id="")),
            ("unknown task type", 2, unknown_task),
            ("unknown tenant", 2, unknown_tenant),
            ("unknown feature", 2, unknown_feature),
        ]

    # --- reviews of made-up requests (those of real escalations are made during the run) ------------

    def _review_kinds(self) -> list[tuple[str, float, Callable[[datetime], Hostile]]]:
        def unsigned(now: datetime) -> Hostile:
            event = self.review(now)
            return Hostile(
                "unsigned review of a made-up request",
                "reviews",
                event.tenant_id.encode(),
                self.encode(event),
                "refusal",
            )

        def stranger(now: datetime) -> Hostile:
            base = self.review(now)
            event = review_event(
                base.request_id,
                base.tenant_id,
                base.causation_id,
                "approved",
                "fine",
                self.keys.stranger,
                "mallory@evil",
                now,
            )
            return Hostile(
                "review of a made-up request by an unknown key",
                "reviews",
                event.tenant_id.encode(),
                self.encode(event),
                "refusal",
            )

        def timeout(now: datetime) -> Hostile:
            base = self.review(now)
            event = msgspec.structs.replace(
                base,
                action="timed_out",
                reviewer=DECIDER,
                producer=DECIDER,
                reason="no review before the deadline",
                deadline=now,
            )
            return Hostile(
                "forged timeout of a made-up request",
                "reviews",
                event.tenant_id.encode(),
                self.encode(event),
                "refusal",
            )

        return [
            ("unsigned review of a made-up request", 1, unsigned),
            ("review of a made-up request by an unknown key", 1, stranger),
            ("forged timeout of a made-up request", 1, timeout),
        ]

    # --- governance: forged, stale and replayed kill switches and promotions ----------------------------

    def _governance_kinds(self) -> list[tuple[str, float, Callable[[datetime], Hostile]]]:
        k = self.keys

        def act(kind: str, event: PolicyStageChanged | KillSwitchChanged, key: bytes = POLICY_KEY) -> Hostile:
            value = self.encode(event)
            # An act the contract itself rules out (an unknown scope, say) is malformed input.
            return Hostile(
                kind,
                "governance",
                key,
                value,
                "deadletter" if self.undecodable("governance", value) else "refusal",
            )

        def real_target(now: datetime, scope: str) -> str:
            return "" if scope == "global" else self._tenant()[0]

        def unsigned_switch(now: datetime) -> Hostile:
            scope = self.rng.choice(("global", "tenant"))
            return act("unsigned kill switch", self.switch(now, scope, real_target(now, scope)))

        def non_operator(now: datetime) -> Hostile:
            return act(
                "kill switch signed by a non-operator", self.signed_switch(now, k.reviewer, k.reviewer_name)
            )

        def unknown_key(now: datetime) -> Hostile:
            return act(
                "kill switch signed by an unknown key",
                self.signed_switch(now, k.stranger, "mallory@evil", scope="global"),
            )

        def tampered(now: datetime) -> Hostile:
            event = self.signed_switch(now, k.operator, k.operator_name, target=GHOST_TENANT)
            # Signed for the ghost tenant, then pointed at a real one.
            real = self._tenant()[0]
            return act(
                "kill switch altered after signing",
                msgspec.structs.replace(event, target=real, tenant_id=real),
            )

        def other_name(now: datetime) -> Hostile:
            return act(
                "kill switch in another operator's name", self.signed_switch(now, k.operator, k.reviewer_name)
            )

        def stale(now: datetime) -> Hostile:
            then = now - timedelta(minutes=self.rng.randint(16, 600))
            return act(
                "stale kill switch (signed long ago)", self.signed_switch(then, k.operator, k.operator_name)
            )

        def future(now: datetime) -> Hostile:
            then = now + timedelta(minutes=self.rng.randint(3, 600))
            return act(
                "kill switch signed in the future",
                self.signed_switch(then, k.operator, k.operator_name, scope="global"),
            )

        def invalid(now: datetime) -> Hostile:
            event = sign_kill_switch(
                msgspec.structs.replace(
                    self.switch(now, "tenant", self._tenant()[0]),
                    scope=self.rng.choice(("galaxy", "GLOBAL", "")),
                ),
                k.operator,
            )
            return act("kill switch with an unknown scope (signed)", event)

        def wrong_key(now: datetime) -> Hostile:
            event = self.switch(now, "global", "")
            return act("unsigned kill switch keyed by a tenant", event, self._tenant()[0].encode())

        def replayed(now: datetime) -> Hostile:
            if not self.genuine_switches:
                return unsigned_switch(now)
            g = self.rng.choice(self.genuine_switches)
            return Hostile("genuine kill switch replayed", "governance", g.key, g.value, "refusal")

        def promotion_unsigned(now: datetime) -> Hostile:
            return act("unsigned promotion", self._promotion(now, None))

        def promotion_reviewer(now: datetime) -> Hostile:
            return act("promotion signed by a non-operator", self._promotion(now, k.reviewer))

        def promotion_stranger(now: datetime) -> Hostile:
            return act("promotion signed by an unknown key", self._promotion(now, k.stranger))

        def promotion_version(now: datetime) -> Hostile:
            event = self._promotion(now, None)
            version = self.rng.choice(("0.0.0", event.policy_version + "-evil", ""))
            return act(
                "promotion with a wrong policy_version",
                self._sign(msgspec.structs.replace(event, policy_version=version)),
            )

        def promotion_deep(now: datetime) -> Hostile:
            depth = 5000
            # Flow sequences, flow mappings, compact block sequences: about 10-20 KB each.
            document = self.rng.choice(
                ("[" * depth + "]" * depth, "{a: " * depth + "x" + "}" * depth, "- " * depth + "x")
            )
            event = msgspec.structs.replace(self._promotion(now, None), document=document)
            return act("promotion with a 5,000-level-deep YAML document", self._sign(event))

        def promotion_stale(now: datetime) -> Hostile:
            return act(
                "stale promotion (signed long ago)",
                self._sign(self._promotion(now - timedelta(hours=2), None)),
            )

        return [
            ("unsigned kill switch", 1, unsigned_switch),
            ("kill switch signed by a non-operator", 1, non_operator),
            ("kill switch signed by an unknown key", 1, unknown_key),
            ("kill switch altered after signing", 1, tampered),
            ("kill switch in another operator's name", 1, other_name),
            ("stale kill switch (signed long ago)", 1, stale),
            ("kill switch signed in the future", 1, future),
            ("kill switch with an unknown scope (signed)", 0.5, invalid),
            ("unsigned kill switch keyed by a tenant", 0.5, wrong_key),
            ("genuine kill switch replayed", 1.5, replayed),
            ("unsigned promotion", 0.5, promotion_unsigned),
            ("promotion signed by a non-operator", 0.5, promotion_reviewer),
            ("promotion signed by an unknown key", 0.3, promotion_stranger),
            ("promotion with a wrong policy_version", 0.5, promotion_version),
            ("promotion with a 5,000-level-deep YAML document", 0.5, promotion_deep),
            ("stale promotion (signed long ago)", 0.3, promotion_stale),
        ]

    def _promotion(self, now: datetime, key: Ed25519PrivateKey | None) -> PolicyStageChanged:
        """A step of the run's policy (signed by both reviewers) to shadow; signed by ``key``."""
        event = promotion_event(
            self.keys.policy_path, "shadow", self.keys.operator_path, self.keys.trust, Registry(), b"", 0.0,
            f"fuzz step {self._id('promotion')[:8]}", now,
        )  # fmt: skip
        unsigned = msgspec.structs.replace(event, key_id="", signature="")
        if key is None:
            return unsigned
        actor = {
            id(self.keys.operator): self.keys.operator_name,
            id(self.keys.reviewer): self.keys.reviewer_name,
        }
        return sign_promotion(
            msgspec.structs.replace(unsigned, actor=actor.get(id(key), "mallory@evil")), key
        )

    def _sign(self, event: PolicyStageChanged) -> PolicyStageChanged:
        return sign_promotion(
            msgspec.structs.replace(event, actor=self.keys.operator_name), self.keys.operator
        )

    # --- genuine acts ------------------------------------------------------------------------------

    def genuine_switch(self, now: datetime, mode: str) -> Genuine:
        """A genuine operator switch for the ghost tenant (no valid request names it)."""
        event = kill_switch_event(
            "tenant", GHOST_TENANT, mode, "fuzz drill", self.keys.operator, self.keys.operator_name, now
        )
        g = Genuine(
            f"genuine kill switch ({mode}, ghost tenant)",
            "governance",
            POLICY_KEY,
            self.encode(event),
            event.event_id,
        )
        self.genuine_switches.append(g)
        return g


# What each topic's readers expect (a message of another type is malformed there).
EXPECTED: dict[str, tuple[type[Event], ...]] = {
    "requests": (InferenceRequested,),
    "outcomes": (OutcomeRecorded,),
    "reviews": (ReviewRecorded,),
    "governance": (KillSwitchChanged, PolicyStageChanged),
    "circuits": (CircuitStateChanged,),
    "dispatch": (DispatchRequested,),
}
# A field of each internal topic's event pushed outside the contract (Avro still reads it).
OUT_OF_RANGE: dict[str, tuple[str, object]] = {
    "outcomes": ("cost_micros", -1),
    "dispatch": ("max_output_tokens", 0),
    "circuits": ("consecutive_failures", -1),
}
# Well-formed events of types that do not belong on each topic.
ALIEN: dict[str, tuple[type[Event], ...]] = {
    "requests": (OutcomeRecorded, ReviewRecorded),
    "outcomes": (InferenceRequested, DispatchRequested),
    "reviews": (InferenceRequested, KillSwitchChanged),
    "governance": (ReviewRecorded, InferenceRequested),
    "circuits": (InferenceRequested, OutcomeRecorded),
    "dispatch": (InferenceRequested, OutcomeRecorded),
}
