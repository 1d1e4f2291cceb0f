"""The governance log as the decider sees it: promotion steps and kill switches, judged and folded.

Every decider reads ``nexus.governance`` from the beginning at start (so that all agree on what is
active), then follows it: a promotion or a switch is taken up without a restart. Each act is judged
here by the pure rule ``nexuscore.policy.judge``, against this decider's own trust store: a refused
one is logged with its reason (the projector records it as evidence), and the decider keeps serving
with what it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterator
from datetime import datetime

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore.core import derive_id
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError
from nexuscore.policy import (
    BOOTSTRAP,
    NO_CONTROLS,
    Controls,
    GovernanceState,
    Registry,
    SignedPolicy,
    TrustStore,
    judge,
)
from nexuscore.schemas import AvroCodec, KillSwitchChanged, PolicyStageChanged
from nexuscore.transport import (
    Topics,
    appended_at,
    login_options,
    new_producer,
    partition_counts,
    start_client,
)

log = logging.getLogger(__name__)
POLICY_KEY = b"policy"  # one key, so every policy event is in one partition, in order
# Governance states a decider remembers, to decide an input again under the one that decided it.
EARLIER_STATES = 32


class PolicyHolder:
    """The governance state the agent reads on every event (which policy decides each tenant, which
    kill switches hold); the follower swaps it as the log moves on.

    It remembers the last ``EARLIER_STATES`` states it held, so that a decider recovering from a
    crash decides an input again under the policy that decided it the first time (``pinned``): a
    promotion taken up between a decision and its repetition must not change it."""

    def __init__(self, registry: Registry, controls: Controls = NO_CONTROLS) -> None:
        self._state = GovernanceState(registry=registry, controls=controls)
        self.earlier: deque[GovernanceState] = deque(maxlen=EARLIER_STATES)
        self._pin: GovernanceState | None = None

    @property
    def state(self) -> GovernanceState:
        """The state deciding now: the pinned one within ``pinned``, else the current one."""
        return self._state if self._pin is None else self._pin

    @state.setter
    def state(self, state: GovernanceState) -> None:
        if state != self._state:
            self.earlier.append(self._state)
        self._state = state

    @property
    def current(self) -> GovernanceState:
        """The state the governance log has reached, pinned or not: what its next act is judged on."""
        return self._state

    @property
    def registry(self) -> Registry:
        return self.state.registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self.state = msgspec.structs.replace(self._state, registry=registry)

    @property
    def controls(self) -> Controls:
        return self.state.controls

    @controls.setter
    def controls(self, controls: Controls) -> None:
        self.state = msgspec.structs.replace(self._state, controls=controls)

    @contextlib.contextmanager
    def pinned(self, digest: str, tenant_id: str) -> Iterator[bool]:
        """Within it, the latest state held in which ``digest`` served ``tenant_id`` (yields whether
        one is remembered; if not, the current state serves). No digest: nothing to pin."""
        if not digest:
            yield True
            return
        self._pin = _serving(digest, tenant_id, [self._state, *reversed(self.earlier)])
        try:
            yield self._pin is not None
        finally:
            self._pin = None


def _serving(digest: str, tenant_id: str, states: list[GovernanceState]) -> GovernanceState | None:
    for state in states:
        with contextlib.suppress(LookupError):  # (no active policy in that state)
            if state.registry.for_tenant(tenant_id).digest == digest:
                return state
    return None


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

    def fold(self, value: bytes | None, timestamp_ms: int | None = None) -> None:
        """Take one message of the log: judged (``nexuscore.policy.judge``) against this decider's
        trust store at the broker's append time, so every reader reaches the same verdict. What
        is not a governance act is the projector's to record (it dead-letters nothing here)."""
        try:
            event = self.codec.decode(value, (PolicyStageChanged, KillSwitchChanged))
        except DecodeError as exc:
            self.refusals.append(f"undecodable: {exc}")
            return
        assert isinstance(event, PolicyStageChanged | KillSwitchChanged)
        state, refused = judge(
            self.holder.current, event, self.trust, appended_at(timestamp_ms, self.clock.now())
        )
        self.holder.state = state
        if refused is not None:
            self.refusals.append(str(refused))
            log.warning("governance act %s refused: %s", event.event_id, refused)
        elif isinstance(event, KillSwitchChanged):
            where = "global" if event.scope == "global" else f"{event.scope} {event.target}"
            log.warning("inference %s (%s) by %s: %s", event.mode, where, event.actor, event.reason)
        else:
            log.warning(
                "policy %s %s is now %s", event.policy_version, event.policy_digest[:19], event.to_stage
            )

    async def _consumer(self) -> AIOKafkaConsumer:
        counts = await partition_counts(self.bootstrap, (self.topic,))
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap, enable_auto_commit=False, **login_options()
        )
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
                if tp.partition == 0:  # acts elsewhere are refused by every reader (see the projector)
                    self.fold(r.value, r.timestamp)
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
