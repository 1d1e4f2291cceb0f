"""The data-plane worker: consume dispatches, call the model, record every attempt and the outcome.

It holds no state a restart would need, so it uses aiokafka's batch API directly rather than a faust
agent (the field notes measured faust's per-event overhead). Offsets are committed only after the
batch's outcomes are acknowledged by the broker: a crash repeats calls, never loses them, and the
repeated outcome carries the same event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import OrderedDict, defaultdict
from collections.abc import AsyncIterator, Callable, Mapping

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from nexuscore.core import envelope_from
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError, ProviderError
from nexuscore.observe import Tally, batch_done, event_span
from nexuscore.policy import cost_micros
from nexuscore.providers import ChatRequest, ChatResult, ProviderAdapter, adapter_for
from nexuscore.schemas import (
    AvroCodec,
    CircuitStateChanged,
    DispatchRequested,
    FallbackTarget,
    ModelCallAttempted,
    OutcomeRecorded,
)
from nexuscore.streams._circuits import CircuitBoard, follow_circuits
from nexuscore.transport import Topics, dead_letter, new_consumer, new_producer, start_client

log = logging.getLogger(__name__)
PRODUCER = "nexuscore.worker"


class RetryPolicy:
    """Full-jitter exponential backoff (AWS architecture blog's 'full jitter')."""

    def __init__(self, max_attempts: int = 3, base_s: float = 0.05, cap_s: float = 1.0) -> None:
        self.max_attempts = max_attempts
        self.base_s = base_s
        self.cap_s = cap_s

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


def targets_of(d: DispatchRequested) -> list[FallbackTarget]:
    """The dispatch's own deployment, then its fallbacks in order."""
    primary = FallbackTarget(
        deployment_id=d.deployment_id,
        provider=d.provider,
        endpoint=d.endpoint,
        model=d.model,
        region=d.region,
        decode_strategy=d.decode_strategy,
        input_price_micros_per_1k=d.input_price_micros_per_1k,
        output_price_micros_per_1k=d.output_price_micros_per_1k,
    )
    return [primary, *d.fallbacks]


def worker_id() -> str:
    """This worker's name on the circuits topic: each worker must tell its own events from others'."""
    return f"{PRODUCER}@{socket.gethostname()}:{os.getpid()}"


class Caller:
    """Calls one dispatch's deployment with retries, failing over along the decision's fallbacks.

    Each deployment gets up to ``retry.max_attempts`` attempts (full jitter between them) unless its
    circuit opens; then the next fallback is tried. A deployment outside the dispatch's allowed
    regions is never called, whatever the dispatch says: residency is checked here again.
    """

    def __init__(
        self,
        adapters: Mapping[str, ProviderAdapter],
        clock: Clock,
        *,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
        endpoint_override: str | None = None,
        sleep: Callable[[float], object] = asyncio.sleep,
        circuits: CircuitBoard | None = None,
        call_timeout_s: float = 30.0,
        routes: Mapping[str, str] | None = None,
        incarnation: str | None = None,
    ) -> None:
        self.adapters = adapters
        # Attempt ids include this process's incarnation: a dispatch called again after a crash
        # (its offset not yet committed) records its second calls beside the first ones, so the
        # evidence shows every call that reached a provider.
        self.incarnation = incarnation or f"{worker_id()}:{os.urandom(6).hex()}"
        self.clock = clock
        self.retry = retry or RetryPolicy()
        self.rng = rng or random.Random()  # noqa: S311  # jitter, not cryptography
        self.endpoint_override = endpoint_override
        self.sleep = sleep
        self.circuits = circuits or CircuitBoard(clock, worker_id())
        self.call_timeout_s = call_timeout_s
        self.routes = dict(routes or {})

    def _adapter(self, t: FallbackTarget) -> ProviderAdapter:
        # Overridden endpoints are simulated providers, which speak the OpenAI-compatible API.
        overridden = self.endpoint_override or t.deployment_id in self.routes
        return self.adapters["openai" if overridden else t.provider]

    def _endpoint(self, t: FallbackTarget) -> str:
        return self.routes.get(t.deployment_id) or self.endpoint_override or t.endpoint

    async def call(
        self, d: DispatchRequested, traceparent: str = ""
    ) -> tuple[list[ModelCallAttempted], OutcomeRecorded]:
        attempts: list[ModelCallAttempted] = []
        skipped: list[str] = []
        started = time.perf_counter()
        result: ChatResult | None = None
        error = ""
        last: FallbackTarget | None = None
        for target in targets_of(d):
            if target.region not in d.allowed_regions:
                skipped.append(
                    f"{target.deployment_id}: region {target.region} is outside the allowed regions"
                )
                continue
            if not await self.circuits.admit(target.deployment_id, target.region, d.request_id, d.tenant_id):
                skipped.append(f"{target.deployment_id}: circuit open")
                continue
            last = target
            result, error = await self._call_target(d, target, attempts, traceparent)
            if result is not None:
                break
        latency_ms = (time.perf_counter() - started) * 1000
        if last is None:
            error = "no deployment could be called: " + "; ".join(skipped)
            last = targets_of(d)[0]
        return attempts, self._outcome(d, last, result, max(1, len(attempts)), latency_ms, error, skipped)

    async def _call_target(
        self,
        d: DispatchRequested,
        t: FallbackTarget,
        attempts: list[ModelCallAttempted],
        traceparent: str = "",
    ) -> tuple[ChatResult | None, str]:
        request = ChatRequest(
            model=t.model,
            prompt=d.prompt,
            max_output_tokens=d.max_output_tokens,
            idempotency_key=d.idempotency_key,
            decode_strategy=t.decode_strategy,
            timeout_s=self.call_timeout_s,
            traceparent=traceparent,
        )
        error = ""
        for n in range(1, self.retry.max_attempts + 1):
            t0 = time.perf_counter()
            try:
                result = await self._adapter(t).complete(self._endpoint(t), request)
            except ProviderError as exc:
                attempts.append(
                    self._attempt(
                        d, t, len(attempts) + 1, "error", t0, exc.status_code, exc.retryable, str(exc)
                    )
                )
                error = str(exc)
                await self.circuits.record(t.deployment_id, t.region, d.request_id, d.tenant_id, False, error)
                if not exc.retryable or n == self.retry.max_attempts:
                    break
                if self.circuits.state(t.deployment_id) == "open":
                    break  # fail over now rather than retry a deployment found failing
                await self._sleep(self.retry.delay(n, self.rng))
                continue
            attempts.append(self._attempt(d, t, len(attempts) + 1, "ok", t0, 200, False, ""))
            await self.circuits.record(t.deployment_id, t.region, d.request_id, d.tenant_id, True)
            return result, ""
        return None, error

    async def _sleep(self, seconds: float) -> None:
        awaitable = self.sleep(seconds)
        if asyncio.iscoroutine(awaitable) or isinstance(awaitable, asyncio.Future):
            await awaitable

    def _attempt(
        self,
        d: DispatchRequested,
        t: FallbackTarget,
        n: int,
        status: str,
        t0: float,
        http: int | None,
        retryable: bool,
        error: str,
    ) -> ModelCallAttempted:
        return ModelCallAttempted(
            **envelope_from(d, "attempt", n, self.incarnation, producer=PRODUCER, now=self.clock.now()),
            attempt=n,
            deployment_id=t.deployment_id,
            region=t.region,
            status=status,  # type: ignore[arg-type]  # "ok" or "error" from call()
            http_status=http,
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
            retryable=retryable,
            error=error,
        )

    def _outcome(
        self,
        d: DispatchRequested,
        t: FallbackTarget,
        result: ChatResult | None,
        attempts: int,
        latency_ms: float,
        error: str,
        skipped: list[str],
    ) -> OutcomeRecorded:
        if result is None:
            result = _FAILED
        # Never bill beyond what was asked for: the budget reserved for max_output_tokens.
        out_tokens = min(result.output_tokens, d.max_output_tokens)
        return OutcomeRecorded(
            **envelope_from(d, "outcome", producer=PRODUCER, now=self.clock.now()),
            status="failed" if result is _FAILED else "answered",
            feature=d.feature,
            deployment_id=t.deployment_id,
            model=t.model,
            model_version=result.model_version,
            region=t.region,
            attempts=attempts,
            input_tokens=result.input_tokens,
            output_tokens=out_tokens,
            cost_micros=cost_micros(
                result.input_tokens, out_tokens, t.input_price_micros_per_1k, t.output_price_micros_per_1k
            ),
            latency_ms=round(latency_ms, 3),
            response=result.text,
            finish_reason=result.finish_reason,
            error=error if result is _FAILED else "",
            data_subject=d.data_subject,
            decode_strategy=t.decode_strategy,
            latency_slo_ms=d.latency_slo_ms,
            predicted_latency_ms=d.predicted_latency_ms,
            skipped=skipped,
        )

    def refused(self, d: DispatchRequested, why: str) -> OutcomeRecorded:
        """The outcome of a dispatch not called at all (a full bulkhead): failed, nothing billed."""
        return self._outcome(d, targets_of(d)[0], None, 1, 0.0, why, [])


# What a call that never succeeded reports: no tokens, no cost.
_FAILED = ChatResult(text="", input_tokens=0, output_tokens=0, finish_reason="error", model_version="")


class _Offsets:
    """Which offsets of each partition are still being worked on, so that only a contiguous prefix
    of finished work is ever committed: a crash repeats calls, never skips them."""

    def __init__(self) -> None:
        self.pending: dict[TopicPartition, set[int]] = defaultdict(set)
        self.next_offset: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}

    def started(self, tp: TopicPartition, offset: int) -> None:
        self.pending[tp].add(offset)
        self.next_offset[tp] = offset + 1

    def finished(self, tp: TopicPartition, offset: int) -> None:
        self.pending[tp].discard(offset)

    def keep_only(self, assigned: set[TopicPartition]) -> None:
        """Forget partitions a rebalance took away: their new owner resumes from the last commit,
        and committing them from here would fail for ever."""
        for tp in set(self.next_offset) - assigned:
            del self.next_offset[tp]
            self.pending.pop(tp, None)
            self.committed.pop(tp, None)

    def committable(self) -> dict[TopicPartition, int]:
        offsets = {tp: min(self.pending[tp], default=nxt) for tp, nxt in self.next_offset.items()}
        return {tp: o for tp, o in offsets.items() if self.committed.get(tp) != o}


class Bulkhead:
    """A cap on one tenant's concurrent calls, and on how many more may wait for a slot.

    A tenant over both is refused at once (a failed outcome, "bulkhead full"), rather than left to
    hold the worker's fetch: one tenant's flood must not starve the others.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._waiting: dict[str, int] = defaultdict(int)
        self.refused = 0

    def full(self, tenant: str) -> bool:
        slots = self._slots.get(tenant)
        return slots is not None and slots.locked() and self._waiting[tenant] >= self.queue

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        slots = self._slots.setdefault(tenant, asyncio.Semaphore(self.concurrency))
        self._waiting[tenant] += 1
        try:
            await slots.acquire()
        finally:
            self._waiting[tenant] -= 1
        try:
            yield
        finally:
            slots.release()


class Worker:
    """Consumes ``nexus.dispatch`` and keeps up to ``concurrency`` model calls in flight.

    Fetching goes on while calls run (a slow call holds one slot, not a whole batch); offsets are
    committed every ``commit_interval_s`` up to the first call not yet acknowledged by the broker.
    Each tenant may hold ``tenant_concurrency`` of the slots at most (its bulkhead).
    """

    def __init__(
        self,
        bootstrap: str,
        caller: Caller,
        clock: Clock,
        *,
        topics: Topics = Topics(),
        max_batch: int = 500,
        concurrency: int = 256,
        tenant_concurrency: int | None = None,
        commit_interval_s: float = 0.2,
        called_limit: int = 200_000,
        instance_id: str | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        # Static group membership: a worker restarted under the same id takes its partitions back
        # at once, where a new member waits for the dead one's session to time out and a rebalance.
        self.instance_id = instance_id
        self.caller = caller
        self.clock = clock
        self.topics = topics
        self.max_batch = max_batch
        per_tenant = tenant_concurrency or max(1, concurrency // 4)
        self.bulkhead = Bulkhead(per_tenant, queue=4 * per_tenant)
        # Dispatches taken off the topic and not yet recorded: calls in flight plus those waiting
        # for their tenant's bulkhead.
        self.pending = asyncio.Semaphore(concurrency + self.bulkhead.queue)
        self.slots = asyncio.Semaphore(concurrency)
        self.commit_interval_s = commit_interval_s
        self.codec = AvroCodec()
        self.stopping = asyncio.Event()
        self.processed = 0
        # Dispatches this worker has called (or is calling), by event id: a dispatch published
        # again (a decider re-emitting after its crash, a rebalance back to this worker) is
        # recognised and not called a second time. Bounded: the oldest ids are forgotten first.
        self.called: OrderedDict[str, asyncio.Event] = OrderedDict()
        self.called_limit = called_limit
        self.repeats = 0
        self.tally = Tally("worker")  # for the metrics, counted per fetch

    async def run(self) -> None:
        consumer = new_consumer(
            self.bootstrap,
            [self.topics.dispatch],
            self.topics.group("nexuscore-workers"),
            group_instance_id=self.instance_id,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
        )
        producer = new_producer(self.bootstrap)
        await start_client(producer, self.bootstrap)
        try:
            await start_client(consumer, self.bootstrap)
        except BaseException:
            await producer.stop()
            raise

        async def publish(event: CircuitStateChanged) -> None:
            key = event.deployment_id.encode()
            await producer.send(self.topics.circuits, self.codec.encode(event), key=key)

        self.caller.circuits.publish = publish
        circuits = asyncio.create_task(
            follow_circuits(self.bootstrap, self.topics, self.caller.circuits, self.stopping)
        )
        offsets = _Offsets()
        tasks: set[asyncio.Task[None]] = set()
        last_commit = time.monotonic()
        try:
            while not self.stopping.is_set():
                batches = await consumer.getmany(timeout_ms=50, max_records=self.max_batch)
                batch_done(self.tally, "worker", consumer, batches, self.caller.circuits.breakers)
                for tp, records in batches.items():
                    for record in records:
                        await self.pending.acquire()  # back-pressure: fetch no faster than calls finish
                        offsets.started(tp, record.offset)
                        task = asyncio.create_task(self._run_one(record, tp, producer, offsets))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)
                if time.monotonic() - last_commit >= self.commit_interval_s:
                    await self._commit(consumer, offsets)
                    last_commit = time.monotonic()
                if circuits.done():
                    circuits.result()  # the follower failed: stop with its error, not silently
            if tasks:
                await asyncio.gather(*tasks)
            await self._commit(consumer, offsets)
        finally:
            self.stopping.set()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(Exception):
                await circuits
            self.caller.circuits.publish = None
            await consumer.stop()
            await producer.stop()

    async def _commit(self, consumer: AIOKafkaConsumer, offsets: _Offsets) -> None:
        offsets.keep_only(consumer.assignment())
        todo = offsets.committable()
        if not todo:
            return
        try:
            await consumer.commit(todo)
        except KafkaError as exc:
            # After a rebalance these partitions belong to another worker, which resumes from the
            # last committed offset: the calls since then are repeated, with the same event ids.
            log.warning("offset commit failed (%s); another worker will repeat these calls", exc)
            return
        offsets.committed.update(todo)

    async def _run_one(
        self, record: ConsumerRecord, tp: TopicPartition, producer: AIOKafkaProducer, offsets: _Offsets
    ) -> None:
        try:
            try:
                futures = await self._handle(record, producer)
            except (KafkaError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001  # no input may stop the worker
                log.exception("dispatch at %s:%s could not be processed", tp, record.offset)
                futures = [
                    await self._dead_letter(record, producer, f"internal error: {type(exc).__name__}: {exc}")
                ]
            for future in futures:
                await future
            offsets.finished(tp, record.offset)  # a no-op if the partition was revoked meanwhile
            self.processed += 1
        except Exception:
            # Left pending: the offset is never committed past it, and the worker must be restarted
            # to retry it. Only a failure of the broker itself gets here.
            log.exception("dispatch at %s:%s could not be recorded", tp, record.offset)
        finally:
            self.pending.release()

    async def _dead_letter(
        self, record: ConsumerRecord, producer: AIOKafkaProducer, reason: str
    ) -> asyncio.Future[object]:
        dl = dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            reason,
            PRODUCER,
            self.clock.now(),
        )
        self.tally.add(dl)
        future: asyncio.Future[object] = await producer.send(
            self.topics.deadletter, self.codec.encode(dl), key=record.topic.encode()
        )
        return future

    def _first_call(self, dispatch_id: str) -> asyncio.Event | None:
        """None the first time a dispatch id is seen (within the bound): the caller may call the
        provider. Afterwards, the event that is set once the first call's outcome is acknowledged."""
        done = self.called.get(dispatch_id)
        if done is not None:
            self.called.move_to_end(dispatch_id)
            return done
        self.called[dispatch_id] = asyncio.Event()
        if len(self.called) > self.called_limit:
            self.called.popitem(last=False)
        return None

    async def _handle(
        self, record: ConsumerRecord, producer: AIOKafkaProducer
    ) -> list[asyncio.Future[object]]:
        try:
            d = self.codec.decode(record.value, (DispatchRequested,))
            assert isinstance(d, DispatchRequested)
        except DecodeError as exc:
            return [await self._dead_letter(record, producer, str(exc))]
        if record.key != d.request_id.encode():
            # The decider keys a dispatch by its request: anything else was not written by it.
            why = f"message key {record.key!r:.80} is not the request id {d.request_id!r}"
            return [await self._dead_letter(record, producer, why)]
        first = self._first_call(d.event_id)
        if first is not None:
            # Already called by this worker: calling again would bill the tenant twice. This copy
            # is done only once the first call's outcome is acknowledged (its offset may be the
            # same one, delivered again after a rebalance: committing past it before would lose
            # the call if the worker died now).
            self.repeats += 1
            log.warning(
                "dispatch %s of %s seen again at %s; not called twice",
                d.event_id,
                d.request_id,
                record.offset,
            )
            return [asyncio.ensure_future(first.wait())]
        done = self.called[d.event_id]
        span = event_span("worker", "nexuscore.call", d, record.headers)  # the trace context, onward
        attempts: list[ModelCallAttempted] = []
        if self.bulkhead.full(d.tenant_id):
            self.bulkhead.refused += 1
            why = (
                f"bulkhead full: tenant {d.tenant_id} has {self.bulkhead.concurrency} calls in flight "
                f"and {self.bulkhead.queue} waiting"
            )
            outcome = self.caller.refused(d, why)
        else:
            async with self.bulkhead.slot(d.tenant_id), self.slots:
                attempts, outcome = await self.caller.call(d, span.traceparent)
        self.tally.extend(attempts)
        self.tally.add(outcome)
        key = d.tenant_id.encode()
        futures = [
            await producer.send(self.topics.attempts, self.codec.encode(a), key=key, headers=span.headers)
            for a in attempts
        ]
        futures.append(
            await producer.send(
                self.topics.outcomes, self.codec.encode(outcome), key=key, headers=span.headers
            )
        )
        span.end()
        return [asyncio.ensure_future(_acknowledged(futures, done))]


async def _acknowledged(futures: list[asyncio.Future[object]], done: asyncio.Event) -> None:
    """Wait for the broker to take every record of one dispatch, then say so to its repeats."""
    for future in futures:
        await future
    done.set()


def default_adapters(client: httpx.AsyncClient | None = None) -> dict[str, ProviderAdapter]:
    return {kind: adapter_for(kind, client) for kind in ("openai", "anthropic")}
