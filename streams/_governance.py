"""The governance log as the decider sees it: policy promotions, checked and folded into a Registry.

Every decider reads ``nexus.governance`` from the beginning at start (so that all agree on what is
active), then follows it: a promotion is taken up without a restart. Each step is checked again
here, against this decider's own trust store: a refused one is logged with its reason, and the
decider keeps serving with the policy it had.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore import _signing
from nexuscore._clock import Clock
from nexuscore.core import NO_CONTROLS, Controls, derive_id, kill_switch_message
from nexuscore.errors import DecodeError, PolicyError, PolicyRefused
from nexuscore.policy import PolicySignature, SignedPolicy, TrustStore, check_signatures, parse_policy
from nexuscore.policy._promotion import REVIEWERS_FOR_ACTIVE, Registry, check_promotion
from nexuscore.schemas import AvroCodec, Event, KillSwitchChanged, PolicyStageChanged
from nexuscore.streams._kafka import new_producer, start_client
from nexuscore.streams._topics import Topics, partition_counts

log = logging.getLogger(__name__)
POLICY_KEY = b"policy"  # one key, so every policy event is in one partition, in order
BOOTSTRAP = "bootstrap"


class PolicyHolder:
    """The registry and the operators' controls the agent reads on every event; the follower swaps
    them as promotions and kill switches arrive."""

    def __init__(self, registry: Registry, controls: Controls = NO_CONTROLS) -> None:
        self.registry = registry
        self.controls = controls


def sign_kill_switch(event: KillSwitchChanged, key: Ed25519PrivateKey) -> KillSwitchChanged:
    """The event with the operator's key id and signature over what it switches."""
    keyed = msgspec.structs.replace(event, key_id=_signing.key_id(key.public_key()), signature="")
    return msgspec.structs.replace(keyed, signature=_signing.sign(key, kill_switch_message(keyed)))


def check_kill_switch(event: KillSwitchChanged, trust: TrustStore, now: datetime) -> str | None:
    """Why a kill switch must not be taken up (None: it holds): an operator's valid signature."""
    trusted = trust.get(event.key_id)
    if trusted is None:
        return f"signed by key {event.key_id or '(none)'}, which is not in the trust store"
    if "operator" not in trusted.roles:
        return f"key {event.key_id} ({trusted.name}) is not an operator's"
    if trusted.revoked_at is not None and trusted.revoked_at <= now:
        return f"key {event.key_id} ({trusted.name}) was revoked {trusted.revoked_at.isoformat()}"
    if not _signing.verify(trusted.key(), kill_switch_message(event), event.signature):
        return "the signature does not match the event"
    return None


def signed_from_event(event: PolicyStageChanged, trust: TrustStore, now: datetime) -> SignedPolicy:
    """The event's policy, if its signatures hold against ``trust`` (PolicyRefused otherwise)."""
    try:
        policy = parse_policy(event.document, f"promotion {event.event_id}")
    except PolicyError as exc:
        raise PolicyRefused("invalid_content", f"{exc}") from exc
    if policy.digest != event.policy_digest:
        raise PolicyRefused(
            "bad_signature",
            f"the promoted document has digest {policy.digest}, the event names {event.policy_digest}",
        )
    try:
        signatures = msgspec.json.decode(event.signatures or "{}", type=dict[str, list[PolicySignature]])
    except msgspec.DecodeError as exc:
        raise PolicyRefused("bad_signature", f"unreadable signatures: {exc}") from exc
    found = signatures.get("signatures", [])
    if not found:
        raise PolicyRefused("unsigned", f"policy {policy.digest[:19]}… refused (unsigned): no signatures")
    return check_signatures(
        policy, event.document.encode(), found, trust, now, source=f"policy {policy.digest[:19]}…"
    )


def accept(
    registry: Registry, event: PolicyStageChanged, trust: TrustStore, now: datetime
) -> tuple[Registry, str | None]:
    """Fold one promotion in if it holds; otherwise keep the registry and say why not."""
    try:
        signed = signed_from_event(event, trust, now)
    except PolicyRefused as exc:
        return registry, str(exc)
    if event.reason == BOOTSTRAP and event.from_stage == "" and event.to_stage == "active":
        if registry.active is not None:
            same = registry.active.digest == signed.policy.digest
            return registry, None if same else "a bootstrap policy is taken only while none is active"
        reviewers = {s.key_id for s in signed.signatures if s.role == "reviewer"}
        if len(reviewers) < REVIEWERS_FOR_ACTIVE:
            return (
                registry,
                f"the bootstrap policy needs {REVIEWERS_FOR_ACTIVE} reviewers' signatures, it has {len(reviewers)}",
            )
        return registry.apply(signed, "active"), None
    reason = check_promotion(
        registry,
        signed,
        event.to_stage,
        replay_report=event.replay_report.encode(),
        replay_report_digest_claimed=event.replay_report_digest,
        canary_share=event.canary_share,
    )
    if reason is not None:
        return registry, reason
    return registry.apply(signed, event.to_stage, event.canary_share), None


def bootstrap_event(
    signed: SignedPolicy, document: bytes, signatures_json: str, actor: str, now: datetime
) -> PolicyStageChanged:
    policy = signed.policy
    return PolicyStageChanged(
        event_id=derive_id("policy", policy.digest, BOOTSTRAP),
        request_id="",
        tenant_id="",
        occurred_at=now,
        producer=actor,
        policy_digest=policy.digest,
        policy_version=policy.version,
        from_stage="",
        to_stage="active",
        actor=actor,
        signers=[s.key_id for s in signed.signatures],
        reason=BOOTSTRAP,
        document=document.decode(),
        signatures=signatures_json,
    )


class GovernanceFollower:
    """Reads the governance topic (every partition, no consumer group) and folds it."""

    def __init__(
        self, bootstrap: str, topics: Topics, trust: TrustStore, clock: Clock, holder: PolicyHolder
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topics.governance
        self.trust = trust
        self.clock = clock
        self.holder = holder
        self.codec = AvroCodec()
        self.positions: dict[TopicPartition, int] = {}
        self.refusals: list[str] = []

    def fold(self, value: bytes | None) -> None:
        try:
            event: Event = self.codec.decode(value, (PolicyStageChanged, KillSwitchChanged))
        except DecodeError:
            return  # anything else on the topic is not a governance step
        if isinstance(event, KillSwitchChanged):
            refused = check_kill_switch(event, self.trust, self.clock.now())
            if refused is not None:
                self.refusals.append(refused)
                log.warning("kill switch %s refused: %s", event.event_id, refused)
                return
            self.holder.controls = self.holder.controls.apply(event)
            where = "global" if event.scope == "global" else f"{event.scope} {event.target}"
            log.warning("inference %s (%s) by %s: %s", event.mode, where, event.actor, event.reason)
            return
        assert isinstance(event, PolicyStageChanged)
        registry, refused = accept(self.holder.registry, event, self.trust, self.clock.now())
        if refused is not None:
            self.refusals.append(refused)
            log.warning(
                "promotion of %s to %s refused: %s", event.policy_digest[:19], event.to_stage, refused
            )
        elif registry is not self.holder.registry:
            log.warning(
                "policy %s %s is now %s", event.policy_version, event.policy_digest[:19], event.to_stage
            )
        self.holder.registry = registry

    async def _consumer(self) -> AIOKafkaConsumer:
        counts = await partition_counts(self.bootstrap, (self.topic,))
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await start_client(consumer, self.bootstrap)
        partitions = [TopicPartition(self.topic, p) for p in range(counts[self.topic])]
        consumer.assign(partitions)
        for tp in partitions:
            if tp in self.positions:
                consumer.seek(tp, self.positions[tp])
            else:
                await consumer.seek_to_beginning(tp)
        return consumer

    async def catch_up(self) -> Registry:
        """Read the log to its current end: the registry every decider starts from."""
        consumer = await self._consumer()
        try:
            ends = await consumer.end_offsets(list(consumer.assignment()))

            async def behind() -> bool:
                for tp, end in ends.items():
                    if await consumer.position(tp) < end:
                        return True
                return False

            while await behind():
                await self._poll(consumer)
        finally:
            await consumer.stop()
        return self.holder.registry

    async def follow(self, stopping: asyncio.Event | None = None) -> None:
        consumer = await self._consumer()
        try:
            while stopping is None or not stopping.is_set():
                await self._poll(consumer)
        finally:
            await consumer.stop()

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        for tp, records in (await consumer.getmany(timeout_ms=500)).items():
            for r in records:
                self.fold(r.value)
            self.positions[tp] = records[-1].offset + 1


async def publish_governance(
    bootstrap: str, topics: Topics, event: PolicyStageChanged | KillSwitchChanged
) -> None:
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        await producer.send_and_wait(topics.governance, AvroCodec().encode(event), key=POLICY_KEY)
    finally:
        await producer.stop()
