"""Circuit breakers per deployment, shared by the workers through ``nexus.circuits``.

Each worker keeps a breaker per deployment (the pure state machine in ``nexuscore.core``). Its own
transitions are published as ``circuit_state_changed.v1`` events, keyed by deployment; every worker
follows the topic and takes up the others' openings, so a deployment one worker found failing is
avoided by all of them within a poll. The events are evidence too: the projector files them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore.core import CLOSED_BREAKER as CLOSED
from nexuscore.core import (
    Breaker,
    BreakerConfig,
    Transition,
    breaker_admit,
    breaker_adopt,
    breaker_record,
    derive_id,
)
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas import AvroCodec, CircuitStateChanged
from nexuscore.transport import Topics, login_options, partition_counts, start_client

log = logging.getLogger(__name__)

Publish = Callable[[CircuitStateChanged], Awaitable[None]]


class CircuitBoard:
    """The breakers of one worker. ``publish`` sends its transitions; ``take_up`` folds others'."""

    def __init__(self, clock: Clock, worker_id: str, config: BreakerConfig | None = None) -> None:
        self.clock = clock
        self.worker_id = worker_id
        self.config = config or BreakerConfig()
        self.breakers: dict[str, Breaker] = {}
        self.publish: Publish | None = None
        self.transitions = 0

    def state(self, deployment: str) -> str:
        return self.breakers.get(deployment, CLOSED).state

    async def admit(self, deployment: str, region: str, request_id: str, tenant_id: str) -> bool:
        allowed, breaker, change = breaker_admit(self.breakers.get(deployment, CLOSED), self.clock.now())
        self.breakers[deployment] = breaker
        await self._announce(deployment, region, request_id, tenant_id, change)
        return allowed

    async def record(
        self, deployment: str, region: str, request_id: str, tenant_id: str, ok: bool, error: str = ""
    ) -> None:
        breaker, change = breaker_record(
            self.breakers.get(deployment, CLOSED), ok, self.clock.now(), self.config, error
        )
        self.breakers[deployment] = breaker
        await self._announce(deployment, region, request_id, tenant_id, change)

    def take_up(self, event: CircuitStateChanged) -> None:
        if event.producer == self.worker_id:
            return
        before = self.breakers.get(event.deployment_id, CLOSED)
        after = breaker_adopt(before, event.to_state, event.open_until)
        if after is not before:
            log.warning(
                "circuit of %s %s by %s: %s",
                event.deployment_id,
                event.to_state,
                event.producer,
                event.reason,
            )
        self.breakers[event.deployment_id] = after

    async def _announce(
        self, deployment: str, region: str, request_id: str, tenant_id: str, change: Transition | None
    ) -> None:
        if change is None:
            return
        self.transitions += 1
        now = self.clock.now()
        log.warning(
            "circuit of %s: %s -> %s (%s)", deployment, change.from_state, change.to_state, change.reason
        )
        if self.publish is None:
            return
        await self.publish(
            circuit_event(self.worker_id, deployment, region, request_id, tenant_id, change, now)
        )


def circuit_event(
    worker_id: str,
    deployment: str,
    region: str,
    request_id: str,
    tenant_id: str,
    change: Transition,
    now: datetime,
) -> CircuitStateChanged:
    return CircuitStateChanged(
        event_id=derive_id("circuit", worker_id, deployment, change.to_state, now.isoformat()),
        request_id=request_id,
        tenant_id=tenant_id,
        occurred_at=now,
        producer=worker_id,
        deployment_id=deployment,
        region=region,
        from_state=change.from_state,
        to_state=change.to_state,
        reason=change.reason,
        consecutive_failures=change.breaker.consecutive_failures,
        open_until=change.breaker.open_until,
    )


def _take_up(codec: AvroCodec, board: CircuitBoard, value: bytes | None, now: datetime) -> None:
    """One message of the circuits topic; what is not a state change is the projector's to record
    as a dead letter, and nothing on the topic may stop the worker that follows it."""
    try:
        event = codec.decode(value, (CircuitStateChanged,))
        assert isinstance(event, CircuitStateChanged)
    except DecodeError:
        return
    if event.to_state == "open" and event.open_until is not None and event.open_until < now:
        return  # an opening long over: nothing to take up
    try:
        board.take_up(event)
    except Exception:  # noqa: BLE001  # a hostile change must not stop the worker
        log.exception("circuit change %s could not be taken up", event.event_id)


async def follow_circuits(
    bootstrap: str, topics: Topics, board: CircuitBoard, stopping: asyncio.Event
) -> None:
    """Fold every worker's transitions into ``board`` until ``stopping`` (no group: all partitions)."""
    codec = AvroCodec()
    counts = await partition_counts(bootstrap, (topics.circuits,))
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, **login_options())
    await start_client(consumer, bootstrap)
    try:
        consumer.assign([TopicPartition(topics.circuits, p) for p in range(counts[topics.circuits])])
        # The history matters only for breakers still open: the newest events of each partition.
        await consumer.seek_to_beginning()
        while not stopping.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            now = board.clock.now()
            for records in batches.values():
                for r in records:
                    _take_up(codec, board, r.value, now)
    finally:
        await consumer.stop()
