"""The decider on aiokafka's batch API (``nexuscore.streams._loop``) on a real broker: every request
decided once, outputs before state before offsets, state restored from its changelogs."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaConsumer

from nexuscore._synthetic import synthetic_requests
from nexuscore.core import BudgetState, encode_record
from nexuscore.kernel.clock import SystemClock
from nexuscore.policy import Registry, SignedPolicy, TrustStore, default_policy
from nexuscore.schemas import (
    AvroCodec,
    BudgetSettled,
    DispatchRequested,
    Event,
    OutcomeRecorded,
    RequestDecided,
    RequestRejected,
)
from nexuscore.streams import PolicyHolder
from nexuscore.streams._loop import DeciderLoop
from nexuscore.transport import (
    DEFAULT_PARTITIONS,
    DeciderTable,
    Topics,
    ensure_topics,
    new_producer,
    start_client,
)
from tests.factories import T0, numbered, with_budgets
from tests.integration._topics import read_from_start
from tests.waiting import eventually_async

pytestmark = pytest.mark.integration
# A decider's state write, cut short by SIGKILL inside its transaction (``writes``: topic, key, partition).
CUT_SHORT = """
import asyncio
import sys
from aiokafka import AIOKafkaProducer

async def main():
    producer = AIOKafkaProducer(bootstrap_servers={bootstrap!r}, transactional_id={txn!r}, enable_idempotence=True)
    await producer.start()
    await producer.begin_transaction()
    sent = [await producer.send(topic, {value!r}, key=key, partition=p) for topic, key, p in {writes!r}]
    for future in sent:
        await future
    print("written", flush=True)
    sys.stdin.read()  # held open until the test kills it (or closes this pipe)

asyncio.run(main())
"""
CODEC = AvroCodec()
POLICY = default_policy()


async def _publish(bootstrap: str, topics: Topics, n: int, run: str) -> None:
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        requests = synthetic_requests(POLICY, n, seed=11, start=datetime.now(UTC), run=run)
        futures = [
            await producer.send(topics.requests, CODEC.encode(r), key=r.tenant_id.encode()) for r in requests
        ]
        for f in futures:
            await f
    finally:
        await producer.stop()


async def _read(bootstrap: str, topic: str, until: int, timeout_s: float = 60) -> list[Event]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await start_client(consumer, bootstrap)
    events: list[Event] = []
    try:
        async with asyncio.timeout(timeout_s):
            while sum(isinstance(e, RequestDecided | RequestRejected) for e in events) < until:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    events.extend(CODEC.decode(r.value) for r in records)
    finally:
        await consumer.stop()
    return events


async def _run_loop(bootstrap: str, topics: Topics, work: asyncio.Future[object]) -> DeciderLoop:
    holder = PolicyHolder(Registry().apply(SignedPolicy(POLICY, ()), "active"))
    loop = DeciderLoop(
        bootstrap, holder, SystemClock(), topics=topics, reviewers=TrustStore(), instance_id="d1"
    )
    task = asyncio.create_task(loop.run())
    try:
        await work
    finally:
        loop.stopping.set()
        await task
    return loop


def test_every_request_is_decided_once_and_the_state_survives_a_restart(bootstrap: str) -> None:
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))

    async def first() -> list[Event]:
        reading = asyncio.ensure_future(_read(bootstrap, topics.decisions, 300))
        await _publish(bootstrap, topics, 300, "a")
        await _run_loop(bootstrap, topics, reading)
        return reading.result()  # type: ignore[return-value]

    async def second() -> list[Event]:
        reading = asyncio.ensure_future(_read(bootstrap, topics.decisions, 600))
        await _publish(bootstrap, topics, 300, "b")
        await _run_loop(bootstrap, topics, reading)
        return reading.result()  # type: ignore[return-value]

    before = asyncio.run(first())
    after = asyncio.run(second())
    decided = [e for e in after if isinstance(e, RequestDecided | RequestRejected)]
    assert len({(e.tenant_id, e.request_id) for e in decided}) == 600 == len(decided)
    # The budget state went on from where the first run left it: versions only grow, per tenant.
    last_before: dict[str, int] = {}
    for e in before:
        if isinstance(e, RequestDecided):
            last_before[e.tenant_id] = max(last_before.get(e.tenant_id, 0), e.state_version)
    later = [e for e in after[len(before) :] if isinstance(e, RequestDecided)]
    assert later and all(e.state_version > last_before.get(e.tenant_id, -1) for e in later)


def test_outputs_go_out_in_order_the_decision_before_its_dispatch(bootstrap: str) -> None:
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))

    async def run() -> tuple[list[Event], list[Event]]:
        reading = asyncio.ensure_future(_read(bootstrap, topics.decisions, 100))
        await _publish(bootstrap, topics, 100, "c")
        await _run_loop(bootstrap, topics, reading)
        consumer = AIOKafkaConsumer(
            topics.dispatch, bootstrap_servers=bootstrap, auto_offset_reset="earliest"
        )
        await start_client(consumer, bootstrap)
        dispatches: list[Event] = []
        try:
            async with asyncio.timeout(30):
                while not dispatches:
                    for records in (await consumer.getmany(timeout_ms=200)).values():
                        dispatches.extend(CODEC.decode(r.value) for r in records)
        finally:
            await consumer.stop()
        return reading.result(), dispatches  # type: ignore[return-value]

    decisions, dispatches = asyncio.run(run())
    dispatched = {
        (e.tenant_id, e.request_id)
        for e in decisions
        if isinstance(e, RequestDecided) and e.verdict == "dispatch"
    }
    assert {(d.tenant_id, d.request_id) for d in dispatches if isinstance(d, DispatchRequested)} <= dispatched


def test_requests_older_than_the_window_are_forgotten_and_stay_forgotten_after_a_restart(
    bootstrap: str,
) -> None:
    """The decider's memory is bounded: a request decided more than the window ago (and settled,
    or denied) leaves its Tables, with a tombstone on the changelog that a restart honours."""
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    holder = PolicyHolder(Registry().apply(SignedPolicy(POLICY, ()), "active"))

    def decider() -> DeciderLoop:
        return DeciderLoop(
            bootstrap, holder, SystemClock(), topics=topics, reviewers=TrustStore(), instance_id="d1",
            dedupe_window=timedelta(seconds=1), answer_window=timedelta(seconds=1),
        )  # fmt: skip

    async def first() -> tuple[set[bytes], set[bytes]]:
        loop = decider()
        task = asyncio.create_task(loop.run())
        try:
            await _publish(bootstrap, topics, 200, "a")
            decided = loop.state.tables[DeciderTable.DECIDED].rows
            await eventually_async(lambda: len(decided) >= 200, "the first 200 requests decided")
            before = set(decided)
            n = 0

            def forgot() -> bool:
                return len(before - set(decided)) > 0

            # Later requests move the broker's time on; the first ones' memos then age out.
            while not forgot():
                n += 1
                await _publish(bootstrap, topics, 1, f"b{n}")
                with contextlib.suppress(AssertionError):
                    await eventually_async(forgot, "an old memo forgotten", timeout_s=0.5)
        finally:
            loop.stopping.set()
            await task
        return before, before - set(decided)  # once stopped: its last batch's state is written

    async def restart() -> set[bytes]:
        loop = decider()
        task = asyncio.create_task(loop.run())
        try:
            await eventually_async(lambda: loop.held, "partitions assigned and restored")
            return set(loop.state.tables[DeciderTable.DECIDED].rows)
        finally:
            loop.stopping.set()
            await task

    before, forgotten = asyncio.run(first())
    restored = asyncio.run(restart())
    assert forgotten and not forgotten & restored  # the tombstones were written
    assert before - forgotten <= restored  # what was still remembered came back


def test_a_changelog_value_that_is_no_row_is_skipped_at_restore_and_deciding_goes_on(bootstrap: str) -> None:
    """Bytes on a changelog that do not read as a row of its Table (written by someone else, or
    damaged) are not restored: the decider logs and skips them, where it used to keep them and die
    when a handler (the review-deadline timer, a request) read them."""
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))

    async def damage() -> None:
        producer = new_producer(bootstrap)
        await start_client(producer, bootstrap)
        try:
            for topic in topics.changelogs:
                for partition in range(4):
                    await producer.send_and_wait(
                        topic, b"\xc1not msgpack", key=b"acme-bank", partition=partition
                    )
        finally:
            await producer.stop()

    async def run() -> tuple[DeciderLoop, list[Event]]:
        reading = asyncio.ensure_future(_read(bootstrap, topics.decisions, 50))
        await _publish(bootstrap, topics, 50, "a")
        loop = await _run_loop(bootstrap, topics, reading)
        return loop, reading.result()  # type: ignore[return-value]

    asyncio.run(damage())
    loop, events = asyncio.run(run())
    assert loop.state.skipped == len(topics.changelogs) * 4
    decided = [e for e in events if isinstance(e, RequestDecided | RequestRejected)]
    assert len({(e.tenant_id, e.request_id) for e in decided}) == 50


def test_a_state_write_cut_short_is_never_restored_nor_holds_back_later_state(bootstrap: str) -> None:
    # A decider killed while it writes a group's state leaves that write's transaction open. Its
    # restart (same member, same transactional id) aborts it: the restore reads committed records
    # only, so none of it comes back, and no open transaction holds back the committed state written
    # after it (a later restart reads that to its end). The write cut short here puts an absurd
    # budget version for every tenant on every partition: restored, the next decisions would carry
    # versions above it.
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    absurd = 10**12

    def cut_short() -> None:
        """A process that opens the loop's state transaction (as member d1), writes, and is killed."""
        budgets = f"{topics.group('nexuscore-decider')}-{DeciderTable.BUDGETS.value}-changelog"
        value = encode_record(BudgetState(version=absurd))
        writes = [(budgets, t.id.encode(), p) for t in POLICY.tenants for p in range(DEFAULT_PARTITIONS)]
        script = CUT_SHORT.format(
            bootstrap=bootstrap,
            txn=f"{topics.group('nexuscore-decider')}-state-d1",
            writes=writes,
            value=value,
        )
        command = [sys.executable, "-c", script]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
            finally:
                proc.send_signal(signal.SIGKILL)  # in the transaction: neither committed nor aborted
                proc.wait(10)

    async def run(n: int, until: int) -> list[Event]:
        reading = asyncio.ensure_future(_read(bootstrap, topics.decisions, until))
        await _publish(bootstrap, topics, 300, str(n))
        await _run_loop(bootstrap, topics, reading)
        return reading.result()  # type: ignore[return-value]

    def versions(events: list[Event]) -> dict[str, int]:
        last: dict[str, int] = {}
        for e in events:
            if isinstance(e, RequestDecided):
                last[e.tenant_id] = max(last.get(e.tenant_id, 0), e.state_version)
        return last

    first = asyncio.run(run(1, 300))
    cut_short()
    second = asyncio.run(run(2, 600))
    third = asyncio.run(run(3, 900))
    for before, after in ((first, second), (second, third)):
        last = versions(before)
        later = [
            (e.tenant_id, e.state_version) for e in after[len(before) :] if isinstance(e, RequestDecided)
        ]
        assert later and all(last.get(t, -1) < version < absurd for t, version in later), later
    decided = [e for e in third if isinstance(e, RequestDecided | RequestRejected)]
    assert len({(e.tenant_id, e.request_id) for e in decided}) == 900 == len(decided)


class _KilledBeforeItsState(DeciderLoop):
    """A decider whose state and offsets never become durable: as if killed after each batch's
    outputs went out and before its writer wrote the batch's state (the window a crash can hit)."""

    async def _write_all(self) -> None:
        self._waiting.clear()


async def _send(bootstrap: str, topic: str, events: list[Event]) -> None:
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        for e in events:
            await producer.send_and_wait(topic, CODEC.encode(e), key=e.tenant_id.encode())
    finally:
        await producer.stop()


async def _read_until(
    bootstrap: str, topic: str, enough: Callable[[list[Event]], bool], timeout_s: float = 60
) -> list[tuple[bytes, Event]]:
    """Every record of ``topic`` (value and event) from its beginning, until ``enough`` of its events."""
    return await read_from_start(
        bootstrap, topic, lambda read: enough([e for _, e in read]), lambda v: (v, CODEC.decode(v)), timeout_s
    )


def _answered(dispatch: DispatchRequested) -> OutcomeRecorded:
    return OutcomeRecorded(
        event_id=f"o-{dispatch.request_id}", request_id=dispatch.request_id, tenant_id=dispatch.tenant_id,
        occurred_at=T0, producer="w", policy_digest=dispatch.policy_digest, status="answered",
        feature=dispatch.feature, deployment_id=dispatch.deployment_id, model=dispatch.model, model_version="v",
        region=dispatch.region, attempts=1, input_tokens=8, output_tokens=10, cost_micros=7,
        latency_ms=1.0, response="ok", finish_reason="stop", decode_strategy=dispatch.decode_strategy,
    )  # fmt: skip


def _count(kind: type[Event], n: int) -> Callable[[list[Event]], bool]:
    return lambda events: sum(isinstance(e, kind) for e in events) >= n


DECISION = RequestDecided | RequestRejected
Tables = dict[str, dict[bytes, bytes]]


def _decider(kind: type[DeciderLoop], bootstrap: str, topics: Topics, holder: PolicyHolder) -> DeciderLoop:
    return kind(bootstrap, holder, SystemClock(), topics=topics, reviewers=TrustStore(), instance_id="d1")


async def _stopped(loop: DeciderLoop, work: Callable[[], Awaitable[object]]) -> Tables:
    """Run ``loop`` through ``work``, stop it, and return its Tables as it left them."""
    task = asyncio.create_task(loop.run())
    try:
        await work()
    finally:
        loop.stopping.set()
        await task
    return {name: dict(table.rows) for name, table in loop.state.tables.items()}


def _restarted(bootstrap: str, topics: Topics, holder: PolicyHolder) -> Tables:
    """A successor's Tables once it holds its partitions: their state restored and the decisions
    the dead one left without state made again."""
    loop = _decider(DeciderLoop, bootstrap, topics, holder)
    return asyncio.run(
        _stopped(loop, lambda: eventually_async(lambda: loop.held, "partitions assigned and restored"))
    )


def _verdicts_each_published_once(bootstrap: str, topics: Topics, decisions: int) -> list[str]:
    """The verdicts of the first ``decisions`` published, once every decision was published twice
    (by the dead decider and its successor) byte for byte the same."""
    published = asyncio.run(_read_until(bootstrap, topics.decisions, _count(DECISION, 2 * decisions)))
    copies: dict[str, set[bytes]] = {}
    for value, e in published:
        copies.setdefault(e.event_id, set()).add(value)
    assert all(len(values) == 1 for values in copies.values())  # each decision made again identically
    return [e.verdict for _, e in published if isinstance(e, RequestDecided)][:decisions]


def test_decisions_a_crash_left_without_state_are_made_again_in_their_first_order(bootstrap: str) -> None:
    """A tenant's budget holds three reservations of these requests. Four requests come (three
    dispatched, one denied), three outcomes settle them, four more come (three dispatched again).
    The decider dies before any of it is durable. Its successor reads the same requests and
    outcomes again, on two topics, in whatever order a fetch gives: decided requests first, the
    last three would be denied, and the calls already made for them never charged. It decides
    them in the order the published decisions say, and ends with the state the dead one had."""
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    policy = with_budgets(POLICY, "0.0003", "0.0003")  # a request reserves 92 µUSD, costs 7
    holder = PolicyHolder(Registry().apply(SignedPolicy(policy, ()), "active"))

    async def traffic() -> None:
        await _send(bootstrap, topics.requests, [numbered(i) for i in range(4)])
        # all four decided before any outcome exists: the fourth is denied whatever the fetches
        await _read_until(bootstrap, topics.decisions, _count(DECISION, 4))
        dispatched = await _read_until(bootstrap, topics.dispatch, _count(DispatchRequested, 3))
        outcomes = [_answered(d) for _, d in dispatched if isinstance(d, DispatchRequested)]
        await _send(bootstrap, topics.outcomes, outcomes)
        await _read_until(bootstrap, topics.decisions, _count(BudgetSettled, 3))
        await _send(bootstrap, topics.requests, [numbered(i) for i in range(4, 8)])
        await _read_until(bootstrap, topics.decisions, _count(DECISION, 8))

    died_with = asyncio.run(_stopped(_decider(_KilledBeforeItsState, bootstrap, topics, holder), traffic))
    assert _restarted(bootstrap, topics, holder) == died_with
    verdicts = _verdicts_each_published_once(bootstrap, topics, 8)
    assert verdicts == ["dispatch"] * 3 + ["denied"] + ["dispatch"] * 3 + ["denied"]


def test_a_decision_made_again_after_a_crash_is_made_under_the_policy_that_made_it(bootstrap: str) -> None:
    """A budget of three reservations, four requests: three dispatched, one denied. The decider dies
    before any of it is durable, and a policy with a budget of one is promoted before its successor
    starts. The successor decides the four again under the policy that decided them (the published
    decisions name it), not the one serving now: the same decisions, the same state. Under today's
    policy, two calls already made would be denied and never charged."""
    topics = Topics(f"loop-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    first = Registry().apply(SignedPolicy(with_budgets(POLICY, "0.0003", "0.0003"), ()), "active")
    promoted = Registry().apply(SignedPolicy(with_budgets(POLICY, "0.0001", "0.0001"), ()), "active")

    async def traffic() -> None:
        await _send(bootstrap, topics.requests, [numbered(i) for i in range(4)])
        await _read_until(bootstrap, topics.decisions, _count(DECISION, 4))

    died_with = asyncio.run(
        _stopped(_decider(_KilledBeforeItsState, bootstrap, topics, PolicyHolder(first)), traffic)
    )
    holder = PolicyHolder(first)
    holder.registry = promoted  # the governance log's promotion, folded at the successor's start
    assert _restarted(bootstrap, topics, holder) == died_with
    assert _verdicts_each_published_once(bootstrap, topics, 4) == ["dispatch"] * 3 + ["denied"]
