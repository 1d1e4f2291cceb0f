"""The decision agent on aiokafka's batch API: the same handlers as the faust agent, batched.

Per poll batch, in this order (what becomes durable, and when; a batch's state and offsets are
written while the next batches are decided, by one writer, a group of batches at a time):
1. every message goes through ``Decider.process`` in log order per partition; outputs collect in an
   outbox and Table changes in the changelog state, nothing is sent yet;
2. the outbox is sent at once (idempotent producer, acks=all), behind earlier batches' outputs;
3. once the outputs of every batch of the writer's group are acknowledged, the group's Table
   changes (each row's last value) and its input offsets are written in one Kafka transaction of
   the state's own producer (its transactional id this member's: a restart aborts what a killed
   one left open); then the next group.
A crash before 3 commits repeats the batch (and any later one) against the state before it: the
same inputs under the same state, in the same order, give the same decisions (a decision's time is
its input record's broker timestamp, never the decider's clock), whose outputs carry the same
derived ids and are dropped by every reader (the projector by id, the worker by dispatch id). The
order is the one the published decisions record: a restart decides those inputs again in it
before anything new (``nexuscore.streams._recovery``). State and offsets move together, a group at
a time, and the state is restored reading committed records only. So outputs, state and offsets
agree after any crash, with one transaction per group of batches written in the background, never
one per batch on the decisions' path (see docs/decisions).

Requests, outcomes and reviews are co-partitioned (the range assignor gives partition ``p`` of all
three to one member), and the state of partition ``p`` is restored from partition ``p`` of each
changelog when it is assigned. ``instance_id`` gives the member static membership: a restarted
decider takes its partitions back at once instead of after the session timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
import uuid
from collections.abc import Iterable
from datetime import timedelta

import msgspec
from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.partitioner import DefaultPartitioner

from nexuscore.kernel.clock import Clock
from nexuscore.observe import Headers, batch_done
from nexuscore.policy import TrustStore
from nexuscore.streams._governance import GovernanceFollower, PolicyHolder
from nexuscore.streams._handlers import ROW_CHECKS, Decider, DeciderTables
from nexuscore.streams._recovery import (
    CLOCK_SKEW_MS,
    Cause,
    InputKind,
    causes,
    first_timestamps,
    lost_outputs,
    read_again,
    replay_order,
)
from nexuscore.streams._retention import ANSWER_WINDOW, DEDUPE_WINDOW, EXPIRING, Retention
from nexuscore.streams._state import ChangelogState
from nexuscore.transport import DeciderTable, Topics, login_options, new_producer, start_client

log = logging.getLogger(__name__)
DEADLINE_SCAN_S = 1.0
# Batches decided (their outputs sent) whose state and offsets may wait for the writer at once.
MAX_BATCHES_WAITING = 64
MAX_INPUTS_WAITING = 2_000
# How long the writer lets decided batches gather before it makes them durable as one group.
WRITE_GATHER_S = 0.05
# A transaction of state a killed decider left open holds back every reader of those changelogs
# (they read committed records only) until its restart aborts it, or this long at most.
STATE_TRANSACTION_TIMEOUT_MS = 15_000
# Input keys whose partition is remembered (each tenant on each input topic).
MAX_HOMES_KEPT = 10_000
# A tenant id is at most 200 characters: 800 bytes of UTF-8.
MAX_TENANT_KEY_BYTES = 800


class Outbox:
    """The batch's outputs, in order, until the batch is flushed (``headers``: by output index)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes]] = []
        self.headers: dict[int, Headers] = {}

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        if headers:
            self.headers[len(self.messages)] = headers
        self.messages.append((topic, key, value))


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka ships no type information
    def __init__(self, loop: DeciderLoop) -> None:
        self.loop = loop

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.loop.lock:  # the batch in hand is flushed and committed first
            await self.loop.settled()
            self.loop.rebalances += 1

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self.loop.lock:
            self.loop.rebalances += 1
            try:
                await self.loop.restore({tp.partition for tp in assigned})
            except Exception as exc:  # aiokafka would log it and fetch on: the loop stops instead
                self.loop.failed = exc
                raise


class DeciderLoop:
    """Runs ``Decider`` over the input topics in batches (see the module docstring)."""

    def __init__(
        self,
        bootstrap: str,
        holder: PolicyHolder,
        clock: Clock,
        *,
        topics: Topics,
        reviewers: TrustStore,
        follower: GovernanceFollower | None = None,
        instance_id: str | None = None,
        max_batch: int = 2000,
        transactional: bool = False,
        dedupe_window: timedelta = DEDUPE_WINDOW,
        answer_window: timedelta = ANSWER_WINDOW,
    ) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.follower = follower
        self.instance_id = instance_id
        self.max_batch = max_batch
        self.retention = Retention(
            {DeciderTable.DECIDED: dedupe_window, DeciderTable.ESCALATIONS: dedupe_window,
             DeciderTable.ANSWERS: answer_window}
        )  # fmt: skip
        self.state = ChangelogState(topics, timed=EXPIRING, checks=ROW_CHECKS)
        self.outbox = Outbox()
        tables = DeciderTables(**{t.value: table for t, table in self.state.tables.items()})
        self.decider = Decider(
            tables, holder, clock, self.outbox, topics=topics, reviewers=reviewers, keep_outputs=False,
            trace_headers=True, retention=self.retention,
        )  # fmt: skip
        self.lock = asyncio.Lock()
        self.stopping = asyncio.Event()
        self.held: set[int] = set()
        # Rebalances so far: a fetch that returned while one held the lock is dropped (``_loop``).
        self.rebalances = 0
        self.processed = 0
        # Why restoring an assignment failed (the loop stops rather than decide without state).
        self.failed: BaseException | None = None
        self._restorer: AIOKafkaConsumer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        # Each (topic, key)'s partition by the producers' partitioner, with the topic's partition
        # count it was worked out for (``_process``).
        self._homes: dict[tuple[str, bytes], tuple[int, int]] = {}
        # The alternative measured in docs/decisions: a Kafka transaction per batch (outputs, state
        # and offsets atomically) instead of ordered, idempotent writes.
        self.transactional = transactional
        self._producer: AIOKafkaProducer | None = None
        # The changelogs' own producer: aiokafka keeps one produce request in flight per broker and
        # producer, so a batch's state write on the outputs' producer would hold the next batch's
        # decisions back behind it. (A transaction needs the one producer.)
        self._state_producer: AIOKafkaProducer | None = None
        # Batches decided and sent, whose state and offsets are not yet durable; their writer.
        self._waiting: list[tuple[_FlushJob, list[asyncio.Future[object]]]] = []
        self._writer: asyncio.Task[None] | None = None
        # Set while something waits for the writer to finish (``_settlers`` of them): its gathering
        # pause is cut short. (Made again in ``run``: an Event belongs to the loop that waits on it.)
        self._settling = asyncio.Event()
        self._settlers = 0

    def _new_producer(self) -> AIOKafkaProducer:
        """Made inside the running loop (aiokafka needs one)."""
        if not self.transactional:
            return new_producer(self.bootstrap, linger_ms=0)
        return self._transactional_producer("")

    def _transactional_producer(self, role: str) -> AIOKafkaProducer:
        """A producer whose transactional id is this member's (``role``: which of its producers):
        the same after a restart, so that starting it aborts what the killed one left open."""
        member = self.instance_id or uuid.uuid4().hex
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            **login_options(),
            transactional_id=f"{self.topics.group('nexuscore-decider')}-{role}{member}",
            enable_idempotence=True,
            acks="all",
            linger_ms=0,
            transaction_timeout_ms=STATE_TRANSACTION_TIMEOUT_MS,
        )

    async def restore(self, partitions: set[int]) -> None:
        """Hold ``partitions``: drop the state of those given away, read that of those gained. The
        state of a partition kept across a rebalance stays (every change to it was flushed)."""
        self.state.forget(self.held - partitions)
        new = partitions - self.held
        if new and self._restorer is not None:
            began = time.monotonic()
            read = await self.state.restore(self._restorer, new)
            for name, table in self.state.tables.items():
                if table.restored:
                    self.retention.restored(name, table.restored)
                    table.restored = []
            log.info(
                "restored partitions %s of the decider's state: %d changelog records in %.2f s",
                sorted(new), read, time.monotonic() - began,
            )  # fmt: skip
            await self._decide_again(new)
            self._restorer.unsubscribe()  # nothing left to fetch for it until the next assignment
        self.held = set(partitions)  # once their state is in: what ``held`` says is ready

    async def _decide_again(self, partitions: set[int]) -> None:
        """Decide again, in their first order, the inputs of ``partitions`` whose decisions went
        out but whose state and offsets a crash lost (see ``nexuscore.streams._recovery``); make
        them durable, and go on after them."""
        assert self._consumer is not None, "run() first"
        began = time.monotonic()
        inputs = {
            p: {
                InputKind.REQUEST: TopicPartition(self.topics.requests, p),
                InputKind.OUTCOME: TopicPartition(self.topics.outcomes, p),
                InputKind.REVIEW: TopicPartition(self.topics.reviews, p),
            }
            for p in sorted(partitions)
        }
        starts = await self._durable_offsets([tp for tps in inputs.values() for tp in tps.values()])
        marks = [time.monotonic()]
        orders = await self._lost_orders(inputs, starts)
        marks.append(time.monotonic())
        if not orders:
            return  # no decision went out beyond the durable state
        wanted = {
            tp: {c.input_key for c in order if c.kind == kind}
            for p, order in orders.items()
            for kind, tp in inputs[p].items()
        }
        assert self._restorer is not None, "run() first"
        read = await read_again(self._restorer, starts, wanted, self.decider.codec)
        marks.append(time.monotonic())
        offsets: dict[TopicPartition, int] = {}
        for p, order in orders.items():
            replay, missing = replay_order(order, {kind: read.get(tp, []) for kind, tp in inputs[p].items()})
            self.state.at_partition(p)
            unpinned = 0
            for r, cause in replay:
                # Under the policy that decided it: one promoted since must not change the decision.
                # (An outcome's settlement reads no policy, and its digest is the worker's to write.)
                digest = "" if cause.kind is InputKind.OUTCOME else cause.policy_digest
                with self.decider.holder.pinned(digest, cause.tenant_id) as known:
                    unpinned += not known
                    await self._process(r, len(self._consumer.partitions_for_topic(r.topic) or ()))
                offsets[TopicPartition(r.topic, r.partition)] = r.offset + 1  # each topic in log order
            log.warning(  # an SRE's sign of a crash recovered from
                "partition %d: %d inputs decided again in the order of the %d decisions a crash left "
                "without their state (%d of those inputs were not found again; %d under the policy "
                "serving now, the one that decided them no longer remembered)",
                p, len(replay), len(order), missing, unpinned,
            )  # fmt: skip
        if offsets:
            await self._flush(self._job({}, offsets))
            await self.settled()
            for tp, offset in offsets.items():
                self._consumer.seek(tp, offset)
        marks.append(time.monotonic())
        log.warning(  # where a restart's time went: the SRE's figure against the 2 s target
            "decided again in %.2f s: durable offsets %.2f, decisions read back %.2f, inputs read "
            "again %.2f, decided and made durable %.2f",
            marks[-1] - began, *(b - a for a, b in zip([began, *marks], marks, strict=False)),
        )  # fmt: skip

    async def _lost_orders(
        self, inputs: dict[int, dict[InputKind, TopicPartition]], starts: dict[TopicPartition, int]
    ) -> dict[int, list[Cause]]:
        """Per partition with inputs not durable, the causes of the decisions published for them,
        in the order they were published (``nexuscore.streams._recovery.causes``)."""
        assert self._restorer is not None, "run() first"
        times = await first_timestamps(self._restorer, starts)
        since = {}
        for p, tps in inputs.items():
            first = [times[tp] for tp in tps.values() if tp in times]
            if first:  # outputs come after their input: read back from the first input not durable
                since[TopicPartition(self.topics.decisions, p)] = min(first) - CLOCK_SKEW_MS
        lost = await lost_outputs(self._restorer, since, self.decider.codec)
        orders = {tp.partition: causes(outputs, self.decider.holds) for tp, outputs in lost.items()}
        return {p: order for p, order in orders.items() if order}

    async def _durable_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each input partition's durable offset stands (its beginning if none was committed)."""
        assert self._restorer is not None and self._consumer is not None, "run() first"
        consumer = self._consumer
        # Every topic the recovery reads, in one metadata request: asked one by one, each unknown
        # topic cost the restorer a retry backoff (100 ms each, 0.3 s of a restart).
        decisions = [TopicPartition(self.topics.decisions, tp.partition) for tp in tps]
        self._restorer.assign(list({*tps, *decisions}))
        beginnings = await self._restorer.beginning_offsets(tps)
        # One request to the coordinator per partition (aiokafka asks for one at a time), all in
        # flight at once: in turn, they were most of a restart's recovery (12 round trips, 0.34 s).
        committed = await asyncio.gather(*(consumer.committed(tp) for tp in tps))
        return {tp: beginnings[tp] if c is None else c for tp, c in zip(tps, committed, strict=True)}

    def _new_consumer(self) -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            **login_options(),
            group_id=self.topics.group("nexuscore-decider"),
            group_instance_id=self.instance_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            session_timeout_ms=10_000,
            heartbeat_interval_ms=2_000,
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )

    async def run(self) -> None:
        self._settling = asyncio.Event()
        self._restorer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            # A restore reads several partitions in turn, some at their end: a fetch that waited
            # the default 500 ms there held up the next one (3 s of a restart's recovery).
            fetch_max_wait_ms=20,
            **login_options(),
        )
        self._consumer = consumer = self._new_consumer()
        self._producer = producer = self._new_producer()
        await start_client(producer, self.bootstrap)
        self._state_producer = producer if self.transactional else self._transactional_producer("state-")
        if self._state_producer is not producer:
            await start_client(self._state_producer, self.bootstrap)
        await start_client(self._restorer, self.bootstrap)
        consumer.subscribe(
            [self.topics.requests, self.topics.outcomes, self.topics.reviews], listener=_Rebalance(self)
        )
        follow = asyncio.create_task(self.follower.follow(self.stopping)) if self.follower else None
        # What was loaded so far (modules, the policy) is never garbage: keep the collector off it,
        # and let it run less often, so that a collection does not stall a batch (the tail latency).
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        try:
            await start_client(consumer, self.bootstrap)
            await self._loop(consumer)
        finally:
            self.stopping.set()
            if follow is not None:
                with contextlib.suppress(Exception):
                    await follow
            await consumer.stop()
            await self._restorer.stop()
            await producer.stop()
            if self._state_producer is not producer:
                await self._state_producer.stop()

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        next_scan = time.monotonic() + DEADLINE_SCAN_S
        try:
            while not self.stopping.is_set():
                before = self.rebalances
                batches = await consumer.getmany(timeout_ms=100, max_records=self.max_batch)
                async with self.lock:
                    if self.failed is not None:  # deciding without the partitions' state: never
                        raise RuntimeError("the decider's state could not be restored") from self.failed
                    if self.rebalances != before:
                        # Fetched before a rebalance (or a recovery's seek) that ran meanwhile: the
                        # partitions may be another's now, or decided again already. Every position
                        # was reset (to the committed offset, or where the recovery moved it), so
                        # what is still this decider's comes again.
                        continue
                    for tp, records in batches.items():
                        self.state.at_partition(tp.partition)
                        partitions = len(consumer.partitions_for_topic(tp.topic) or ())
                        for r in records:
                            await self._process(r, partitions)
                        self.processed += len(records)
                    if time.monotonic() >= next_scan:
                        await self.decider.overdue_reviews()
                        next_scan = time.monotonic() + DEADLINE_SCAN_S
                    self.decider.forget_old()  # its tombstones go with this batch's state
                    batch_done(self.decider.tally, "decider", consumer, batches)  # metrics, per batch
                    await self._flush(self._job(batches))
        finally:
            await self.settled()

    async def _process(self, r: ConsumerRecord, partitions: int) -> None:
        """One input, if it is on its tenant's partition (of ``partitions``, 0 if unknown: then
        not checked): a tenant's requests, outcomes and reviews must reach the one decider holding
        its state, in order. A producer that writes to a partition of its choice would otherwise be
        decided against another copy of its budget. (A key longer than any tenant id's is refused
        by the decoding, without hashing it.)"""
        if partitions and r.key and len(r.key) <= MAX_TENANT_KEY_BYTES:
            home = self._home(r.topic, r.key, partitions)
            if home != r.partition:
                reason = f"written to partition {r.partition}; its key's (its tenant's) partition is {home}"
                await self.decider.reject(r.topic, r.partition, r.offset, r.key, r.value, reason)
                return
        await self.decider.process(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)

    def _home(self, topic: str, key: bytes, partitions: int) -> int:
        """The partition the producers' partitioner (murmur2 of the key) gives ``key``."""
        known = self._homes.get((topic, key))
        if known is not None and known[0] == partitions:
            return known[1]
        home: int = DefaultPartitioner()(key, list(range(partitions)), None)
        if len(self._homes) < MAX_HOMES_KEPT:  # keys are tenants; any beyond are a producer's noise
            self._homes[(topic, key)] = (partitions, home)
        return home

    def _job(
        self,
        batches: dict[TopicPartition, list[ConsumerRecord]],
        offsets: dict[TopicPartition, int] | None = None,
    ) -> _FlushJob:
        job = _FlushJob(
            list(self.outbox.messages),
            self.state.snapshot(),
            _next_offsets(batches) if offsets is None else offsets,
            self.outbox.headers,
            sum(len(records) for records in batches.values()),
        )
        self.outbox.messages.clear()
        self.outbox.headers = {}
        return job

    async def settled(self) -> None:
        """Wait until everything decided so far is durable (a rebalance or a stop must not outrun it)."""
        if self._writer is not None:
            writer, self._writer = self._writer, None
            self._settlers += 1
            self._settling.set()
            try:
                await writer  # it returns once nothing is waiting
            finally:
                self._settlers -= 1
                if not self._settlers:
                    self._settling.clear()

    async def _flush(self, job: _FlushJob) -> None:
        """Send the batch's outputs now; its state and offsets follow in the background.

        The outputs go out at once, behind the previous batches' on the one idempotent producer: a
        decision waits for no earlier batch's state write or commit. One writer makes the rest
        durable, a group at a time: everything decided since its last group, its outputs
        acknowledged, then its state changes (the last value of each row: a reservation made and
        settled within the group is written once, as a tombstone), then its offsets. A crash leaves
        state and offsets at a group boundary no later than the outputs; the batches after it are
        decided again from that state, identically (a decision's time is its input record's), and
        every reader drops the copies by id.
        """
        if job.empty:
            return
        if self.transactional:
            await self.settled()
            await self._flush_transaction(job)
            return
        assert self._producer is not None, "run() first"
        sent = [
            await self._producer.send(topic, value, key=key, headers=job.headers.get(i))
            for i, (topic, key, value) in enumerate(job.outputs)
        ]
        self._waiting.append((job, sent))
        if self._writer is not None and self._writer.done():
            self._writer.result()  # a failed write stops the decider: nothing after it may commit
            self._writer = None
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_all())
        # Back-pressure: the broker sets the pace, and what a crash makes the decider decide again
        # (everything after the last durable group) stays about a second's work.
        waiting = sum(job.inputs for job, _ in self._waiting)
        if len(self._waiting) > MAX_BATCHES_WAITING or waiting > MAX_INPUTS_WAITING:
            await self.settled()

    async def _write_all(self) -> None:
        assert self._state_producer is not None, "run() first"
        while self._waiting:
            # On a trickle, let a group gather for a moment: one state write and one commit for
            # many small batches, instead of a round of them between every two batches.
            if sum(job.inputs for job, _ in self._waiting) < MAX_INPUTS_WAITING // 4:
                with contextlib.suppress(TimeoutError):  # unless a rebalance, a stop or a recovery waits
                    await asyncio.wait_for(self._settling.wait(), WRITE_GATHER_S)
            group, self._waiting = self._waiting, []
            for _, sent in group:
                for future in sent:
                    await future
            offsets: dict[TopicPartition, int] = {}
            for job, _ in group:
                offsets.update(job.offsets)
            # The group's state changes and offsets in one transaction: a crash part-way through
            # sending them must not leave, say, a tenant's budget with a reservation but not the
            # decision record that says which request made it (that request would be decided again,
            # against its own reservation). The state is restored reading committed records only.
            async with self._state_producer.transaction():
                for topic, key, value, p in _last_values(job.state for job, _ in group):
                    await self._state_producer.send(topic, value, key=key, partition=p)
                if offsets:
                    await self._state_producer.send_offsets_to_transaction(
                        offsets, self.topics.group("nexuscore-decider")
                    )

    async def _flush_transaction(self, job: _FlushJob) -> None:
        assert self._producer is not None, "run() first"
        async with self._producer.transaction():
            for i, (topic, key, value) in enumerate(job.outputs):
                await self._producer.send(topic, value, key=key, headers=job.headers.get(i))
            for table, row, change, p in job.state:
                await self._producer.send(table, change, key=row, partition=p)
            if job.offsets:
                group = self.topics.group("nexuscore-decider")
                await self._producer.send_offsets_to_transaction(job.offsets, group)


class _FlushJob(msgspec.Struct, frozen=True):
    """What one batch made durable: its outputs, its state changes, its input offsets."""

    outputs: list[tuple[str, bytes, bytes]]
    state: list[tuple[str, bytes, bytes | None, int]]
    offsets: dict[TopicPartition, int]
    headers: dict[int, Headers] = {}  # the outputs' record headers, by index (trace context)
    inputs: int = 0  # how many input records the batch decided

    @property
    def empty(self) -> bool:
        return not (self.outputs or self.state or self.offsets)


def _last_values(
    states: Iterable[list[tuple[str, bytes, bytes | None, int]]],
) -> list[tuple[str, bytes, bytes | None, int]]:
    """The group's state changes, the last value of each changelog row only (changelogs are
    compacted: an earlier value of the same row says nothing a reader needs)."""
    last: dict[tuple[str, int, bytes], tuple[str, bytes, bytes | None, int]] = {}
    for state in states:
        for change in state:
            topic, key, _, partition = change
            last[(topic, partition, key)] = change
    return list(last.values())


def _next_offsets(batches: dict[TopicPartition, list[ConsumerRecord]]) -> dict[TopicPartition, int]:
    return {tp: records[-1].offset + 1 for tp, records in batches.items() if records}
