"""After a crash, the lost decisions are made again in the order they were first made.

The loop sends a batch's outputs at once and makes its state and input offsets durable a moment
later (``nexuscore.streams._loop``). A decider killed in between leaves decisions on the topics
whose inputs its successor decides again from the last durable state. The same inputs under the
same state give the same decisions, but only in the same order: a request decided after an outcome
had settled its tenant's budget may not fit when decided before it. A partition's requests,
outcomes and reviews come on three topics, and nothing makes a fetch return them interleaved as
the first time (a fault run found a request dispatched, then denied for budget after the restart,
its call's cost then never charged).

So, before a decider decides anything new on a partition it gained, it reads back what that
partition of the decisions topic received since the state it restored (``lost_outputs``), takes
from it the inputs in the order they were decided (``causes``, less those the state holds), reads
those inputs again, and decides them in that order, each topic's records still in log order
(``replay_order``). What comes after them is new, and is decided as it comes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import NamedTuple, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas import (
    AvroCodec,
    BudgetSettled,
    EscalationResolved,
    Event,
    RequestDecided,
    RequestRejected,
)

# Outputs are appended after their input, but two brokers' clocks may differ: read back from this
# long before the first input not made durable (what is read too much, the state holds already).
CLOCK_SKEW_MS = 5_000
# A partition's decisions read back, and inputs read again, at most (about a second's work is ever
# left to decide again; beyond this, what is not found is decided as new inputs are).
MAX_READ_AGAIN = 200_000
_Record = TypeVar("_Record")
log = logging.getLogger(__name__)


class InputKind(StrEnum):
    """Which input topic an input came from."""

    REQUEST = "request"
    OUTCOME = "outcome"
    REVIEW = "review"


InputKey = tuple[str, str]  # (tenant id, event id) of an input record


class Cause(NamedTuple):
    """The input an output was made from, and the policy that decided it."""

    kind: InputKind
    tenant_id: str
    request_id: str
    event_id: str
    policy_digest: str = ""

    @property
    def input_key(self) -> InputKey:
        """How its input is found among the records read again (event ids are the producers': one
        tenant's may be another's)."""
        return (self.tenant_id, self.event_id)


def cause_of(output: Event) -> Cause | None:
    """The input that made ``output`` (one of the decider's outputs on the decisions topic), or
    None for one that changes no state (a refusal, a shadow decision) or is not the decider's."""
    if isinstance(output, RequestDecided | RequestRejected):
        kind, cause = InputKind.REQUEST, output.causation_id
    elif isinstance(output, BudgetSettled):
        kind, cause = InputKind.OUTCOME, output.causation_id
    elif isinstance(output, EscalationResolved):
        kind, cause = InputKind.REVIEW, output.review_event_id
    else:
        return None
    if not cause:
        return None
    return Cause(kind, output.tenant_id, output.request_id, cause, output.policy_digest or "")


def causes(outputs: Iterable[Event], held: Callable[[Cause], bool]) -> list[Cause]:
    """The inputs that made ``outputs`` (one partition's, in log order), in the order they were
    decided, each once, less those whose effect the state holds already (``held``)."""
    order: list[Cause] = []
    seen: set[tuple[InputKind, InputKey]] = set()
    for output in outputs:
        cause = cause_of(output)
        if cause is not None and (cause.kind, cause.input_key) not in seen:
            seen.add((cause.kind, cause.input_key))
            if not held(cause):
                order.append(cause)
    return order


def replay_order(
    order: Sequence[Cause], records: Mapping[InputKind, Sequence[tuple[InputKey | None, _Record]]]
) -> tuple[list[tuple[_Record, Cause]], int]:
    """The records to decide again, in order, each with the cause it is decided for: for each cause
    of ``order``, its input's topic's records up to it (those before it were decided before it,
    under its policy), then the next cause's. ``records``:
    per topic, in log order, each with its tenant and event id (None: it did not decode). Also how
    many causes were not found (their input was made durable before all its outputs were read
    back, or lies beyond what was read)."""
    first: dict[InputKind, dict[InputKey, int]] = {kind: {} for kind in records}
    for kind, listed in records.items():
        for i, (key, _) in enumerate(listed):
            if key is not None:
                first[kind].setdefault(key, i)
    taken = dict.fromkeys(records, 0)
    replay: list[tuple[_Record, Cause]] = []
    missing = 0
    for cause in order:
        at = first.get(cause.kind, {}).get(cause.input_key)
        if at is None or at < taken[cause.kind]:
            missing += 1
            continue
        replay.extend((record, cause) for _, record in records[cause.kind][taken[cause.kind] : at + 1])
        taken[cause.kind] = at + 1
    return replay, missing


# --- reading back -------------------------------------------------------------------------------


async def first_timestamps(
    consumer: AIOKafkaConsumer, starts: Mapping[TopicPartition, int]
) -> dict[TopicPartition, int]:
    """The broker time of the first record at or after each start (none for a partition read to
    its end)."""
    if not starts:
        return {}
    consumer.assign(list(starts))
    for tp, offset in starts.items():
        consumer.seek(tp, offset)
    ends = await consumer.end_offsets(list(starts))
    pending = {tp for tp, offset in starts.items() if offset < ends[tp]}
    found: dict[TopicPartition, int] = {}
    while pending:
        for tp, got in (await consumer.getmany(*pending, timeout_ms=200, max_records=len(pending))).items():
            if got and tp in pending:
                found[tp] = got[0].timestamp
                pending.discard(tp)
        pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    return found


async def lost_outputs(
    consumer: AIOKafkaConsumer, since: Mapping[TopicPartition, int], codec: AvroCodec
) -> dict[TopicPartition, list[Event]]:
    """What each partition of the decisions topic received from its broker time in ``since`` on,
    decoded (what does not decode is no output of the decider's and is passed over)."""
    events: dict[TopicPartition, list[Event]] = {tp: [] for tp in since}
    if not since:
        return events
    consumer.assign(list(since))
    found = await consumer.offsets_for_times(dict(since))
    ends = await consumer.end_offsets(list(since))
    pending = set()
    for tp, at in found.items():
        if at is not None and ends[tp] - at.offset > MAX_READ_AGAIN:
            # Not a crash's leftovers (about a second's work): the group's offsets were lost, say.
            log.warning(
                "%s: %d decisions since the first input not durable: not read back", tp, ends[tp] - at.offset
            )
        elif at is not None and at.offset < ends[tp]:
            consumer.seek(tp, at.offset)
            pending.add(tp)
    while pending:
        for tp, records in (await consumer.getmany(*pending, timeout_ms=200, max_records=10_000)).items():
            for record in records:
                if record.offset >= ends[tp]:
                    break
                try:
                    events[tp].append(codec.decode(record.value or b""))
                except DecodeError:
                    continue
        pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    return events


async def read_again(
    consumer: AIOKafkaConsumer,
    starts: Mapping[TopicPartition, int],
    wanted: Mapping[TopicPartition, set[InputKey]],
    codec: AvroCodec,
) -> dict[TopicPartition, list[tuple[InputKey | None, ConsumerRecord]]]:
    """Each input partition's records from its start, each with its tenant and event id, until
    every one ``wanted`` of it is read, or its end (at most ``MAX_READ_AGAIN`` records in all)."""
    tps = [tp for tp in starts if wanted.get(tp)]
    read: dict[TopicPartition, list[tuple[InputKey | None, ConsumerRecord]]] = {tp: [] for tp in tps}
    if not tps:
        return read
    consumer.assign(tps)
    for tp in tps:
        consumer.seek(tp, starts[tp])
    ends = await consumer.end_offsets(tps)
    missing = {tp: set(wanted[tp]) for tp in tps}
    pending = {tp for tp in tps if starts[tp] < ends[tp]}
    total = 0
    while pending and total < MAX_READ_AGAIN:
        for tp, records in (await consumer.getmany(*pending, timeout_ms=200, max_records=10_000)).items():
            for record in records:
                if tp not in pending or record.offset >= ends[tp]:
                    break
                key = _input_key(codec, record.value)
                read[tp].append((key, record))
                total += 1
                if key is not None:
                    missing[tp].discard(key)
                if not missing[tp]:
                    pending.discard(tp)
        pending = {tp for tp in pending if await consumer.position(tp) < ends[tp]}
    return read


def _input_key(codec: AvroCodec, value: bytes | None) -> InputKey | None:
    try:
        event = codec.decode(value or b"")
    except DecodeError:
        return None
    return (event.tenant_id, event.event_id)
