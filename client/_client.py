"""``NexusClient``: publish requests and await their results over one shared consumer.

The consumer has no group: every client reads every partition of ``nexus.decisions`` and
``nexus.outcomes`` itself (both keyed by tenant), from ``lookback_s`` before it started, so that a
retry after a client restart still finds the first submission's result (the decider decides a
request id once per tenant and does not decide it again). Re-emitted messages (a stage repeating
a batch after a crash) carry the same event id and are dropped. Positions are fixed before
``start`` returns, so no answer to a request sent afterwards can be missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import uuid
from collections.abc import Collection
from types import TracebackType

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError

from nexuscore.client._build import RequestSpec, build_request, encode_checked
from nexuscore.client._results import RESULT_EVENTS, Result, fold
from nexuscore.client._seen import Recent
from nexuscore.client._trace import child_context
from nexuscore.kernel.clock import Clock, SystemClock
from nexuscore.kernel.errors import DecodeError, NexusError
from nexuscore.policy import RoutingPolicy
from nexuscore.schemas import AvroCodec
from nexuscore.transport import (
    KafkaLogin,
    Topics,
    login_options,
    new_producer,
    partition_counts,
    start_client,
)

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (tenant, request id): request ids are unique per tenant only


class ResultTimeout(NexusError):
    """No terminal state (or escalation) within the timeout; ``last`` is where it stood."""

    def __init__(self, tenant_id: str, request_id: str, timeout_s: float, last: Result | None) -> None:
        where = f"last seen {last.status}" if last else "nothing seen of it yet"
        super().__init__(
            f"request {request_id!r} of {tenant_id!r}: no result within {timeout_s:g} s ({where})"
        )
        self.last = last


class Sent(msgspec.Struct, frozen=True):
    """A request on the broker: its ids and the trace it travels in."""

    tenant_id: str
    request_id: str
    trace_id: str
    traceparent: str
    partition: int
    offset: int


class ClientStats(msgspec.Struct):
    published: int = 0
    consumed: int = 0
    duplicates: int = 0  # re-emitted messages dropped by event id
    undecodable: int = 0  # messages on the answer topics that are not valid events: skipped


class NexusClient:
    """Async producer SDK (see the module docstring); use ``async with`` or ``start``/``close``."""

    def __init__(
        self,
        bootstrap: str,
        *,
        namespace: str = "",
        policy: RoutingPolicy | None = None,
        lookback_s: float = 300.0,
        producer: str = "nexuscore.client",
        clock: Clock | None = None,
        capacity: int = 200_000,
        tenants: Collection[str] | None = None,
        login: KafkaLogin | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        # Who the client is on the broker (a producer's own credential); None: the process's
        # login from its environment (``nexuscore.transport._login``), PLAINTEXT when it sets none.
        self.login = login
        self.topics = Topics(namespace)
        self.policy = policy
        self.lookback_s = lookback_s
        self.producer_name = producer
        self.clock = clock or SystemClock()
        self.codec = AvroCodec()
        self.stats = ClientStats()
        # A producer of one tenant need not decode the others' answers (checked on the key).
        self._tenants = None if tenants is None else frozenset(t.encode() for t in tenants)
        self._seen: Recent[Key, bool] = Recent(capacity)
        self._results: Recent[Key, Result] = Recent(capacity)
        self._waiters: dict[Key, set[asyncio.Future[None]]] = {}
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    # --- life cycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        counts = await partition_counts(
            self.bootstrap, (self.topics.decisions, self.topics.outcomes), login=self.login
        )
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            **login_options(self.login),
        )
        await start_client(consumer, self.bootstrap)
        self._consumer = consumer
        try:
            await self._position(
                consumer, [TopicPartition(t, p) for t, n in counts.items() for p in range(n)]
            )
            self._producer = new_producer(self.bootstrap, login=self.login)
            await start_client(self._producer, self.bootstrap)
        except BaseException:
            await self.close()
            raise
        self._task = asyncio.create_task(self._consume(consumer), name="nexus-client-consumer")

    async def _position(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        consumer.assign(partitions)
        since_ms = int((self.clock.now().timestamp() - self.lookback_s) * 1000)
        found = await consumer.offsets_for_times({tp: since_ms for tp in partitions})
        for tp in partitions:
            at = found.get(tp)
            if at is None:
                await consumer.seek_to_end(tp)
            else:
                consumer.seek(tp, at.offset)
            await consumer.position(tp)  # resolved now, not at the first fetch

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    async def __aenter__(self) -> NexusClient:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # --- sending --------------------------------------------------------------------------------

    async def send(
        self, spec: RequestSpec, *, request_id: str | None = None, traceparent: str | None = None
    ) -> Sent:
        """Check and publish one request (``InvalidRequest`` before anything is sent). Keyed by the
        tenant id's UTF-8 bytes; the partition is the default partitioner's (murmur2 of the key)."""
        if self._producer is None:
            raise NexusError("the client is not started (use `async with NexusClient(...)`)")
        rid = uuid.uuid4().hex if request_id is None else request_id
        trace = child_context(traceparent, secrets.token_hex(16), secrets.token_hex(8))
        request = build_request(
            spec, request_id=rid, trace_id=trace.trace_id, now=self.clock.now(), producer=self.producer_name
        )
        value = encode_checked(self.codec, request, self.policy)
        meta = await self._producer.send_and_wait(
            self.topics.requests, value, key=spec.tenant_id.encode(),
            headers=[("traceparent", trace.traceparent.encode())],
        )  # fmt: skip
        self.stats.published += 1
        return Sent(spec.tenant_id, rid, trace.trace_id, trace.traceparent, meta.partition, meta.offset)

    async def submit(
        self,
        spec: RequestSpec,
        *,
        request_id: str | None = None,
        traceparent: str | None = None,
        timeout_s: float = 60.0,
        through_escalation: bool = False,
    ) -> Result:
        """Send, then await the result: terminal, or escalated (with its review deadline) unless
        ``through_escalation``. A retry under the same request id returns the first one's result."""
        sent = await self.send(spec, request_id=request_id, traceparent=traceparent)
        return await self.result(
            sent.tenant_id, sent.request_id, timeout_s, through_escalation=through_escalation
        )

    # --- results --------------------------------------------------------------------------------

    def peek(self, tenant_id: str, request_id: str) -> Result | None:
        """The latest result seen of a request, without waiting."""
        return self._results.get((tenant_id, request_id))

    async def result(
        self, tenant_id: str, request_id: str, timeout_s: float = 60.0, *, through_escalation: bool = True
    ) -> Result:
        """Await a request's terminal state (or its escalation, unless ``through_escalation``);
        ``ResultTimeout`` after ``timeout_s``."""
        key = (tenant_id, request_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            current = self._results.get(key)
            if current is not None and (
                current.terminal or (current.status == "escalated" and not through_escalation)
            ):
                return current
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ResultTimeout(tenant_id, request_id, timeout_s, current)
            if self._task is not None and self._task.done():
                raise NexusError("the client's consumer stopped: see the log")
            changed: asyncio.Future[None] = loop.create_future()
            self._waiters.setdefault(key, set()).add(changed)
            try:
                await asyncio.wait({changed}, timeout=remaining)
            finally:
                waiting = self._waiters.get(key)
                if waiting is not None:
                    waiting.discard(changed)
                    if not waiting:
                        del self._waiters[key]

    # --- the shared consumer --------------------------------------------------------------------

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            try:
                batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            except KafkaError as exc:  # the broker away for a moment: aiokafka reconnects
                log.warning("the client's consumer could not fetch: %s", exc)
                await asyncio.sleep(1.0)
                continue
            for records in batch.values():
                for record in records:
                    self.take(record.key, record.value)

    def take(self, key: bytes | None, value: bytes | None) -> None:
        """Fold one message of the answer topics in (never raises on what it reads)."""
        self.stats.consumed += 1
        if self._tenants is not None and key not in self._tenants:
            return
        try:
            event = self.codec.decode(value)
        except DecodeError:
            self.stats.undecodable += 1
            return
        if not isinstance(event, RESULT_EVENTS) or key != event.tenant_id.encode():
            return  # settlements, shadows, refusals; or a message keyed by another tenant
        if not self._seen.add((event.tenant_id, event.event_id), True):
            self.stats.duplicates += 1
            return
        rkey = (event.tenant_id, event.request_id)
        current = self._results.get(rkey)
        new = fold(current, event)
        if new is None or new is current:
            return
        self._results.put(rkey, new)
        for changed in self._waiters.pop(rkey, set()):
            if not changed.done():
                changed.set_result(None)
