"""How long the live path stood still after each fault, read from the topics themselves.

Work arrives on a tenant partition and is completed on the same partition (every topic here is keyed
by tenant with the same partition count): for the deciders, a request appended to ``nexus.requests``
is work until its first decision on ``nexus.decisions``; for the workers and the provider, a
decision to dispatch is work until its first outcome on ``nexus.outcomes``. A partition *stands
still* while it has work and completes none. For a fault at time T, the stall is the longest such
interval of any partition that overlaps [T, T + WINDOW_S], measured from T to the completion that
ended it. Idle time (no work waiting) is never a stall, so the figure holds for a trickle and for a
backlog alike.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore.schemas import AvroCodec, Event, OutcomeRecorded, RequestDecided
from nexuscore.transport import DEFAULT_PARTITIONS, start_client

WINDOW_S = 20.0
MIN_STALL_S = 0.5
# (seconds since the epoch, request id, the event), by partition, in log order.
Timeline = dict[int, list[tuple[float, str, Event]]]


async def read_topic(bootstrap: str, topic: str) -> Timeline:
    """Every record of ``topic``, decoded, by partition (records that do not decode are skipped)."""
    codec = AvroCodec()
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await start_client(consumer, bootstrap)
    out: Timeline = defaultdict(list)
    try:
        tps = [TopicPartition(topic, p) for p in range(DEFAULT_PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        left = {tp for tp in tps if end[tp] > 0}
        while left:
            for tp, records in (await consumer.getmany(*left, timeout_ms=1000)).items():
                for r in records:
                    try:
                        event = codec.decode(r.value)
                    except Exception:  # noqa: BLE001, S112  # the malformed messages the run sends
                        continue
                    out[tp.partition].append((r.timestamp / 1000, event.request_id, event))
                if records and records[-1].offset + 1 >= end[tp]:
                    left.discard(tp)
    finally:
        await consumer.stop()
    return out


def _firsts(events: Iterable[tuple[float, str, Event]]) -> list[float]:
    """The time of each request's first event among ``events``."""
    first: dict[str, float] = {}
    for at, rid, _ in events:
        first.setdefault(rid, at)
    return sorted(first.values())


def still_intervals(arrivals: list[float], completions: list[float]) -> list[tuple[float, float]]:
    """The intervals in which work was waiting and none was completed: (since, completed at)."""
    marks = sorted([(t, 1) for t in arrivals] + [(t, -1) for t in completions])
    out: list[tuple[float, float]] = []
    pending, since = 0, 0.0
    for at, step in marks:
        if step > 0:
            if pending == 0:
                since = at
            pending += 1
        else:
            if pending > 0:
                out.append((since, at))
            pending = max(pending - 1, 0)
            since = at
    return out


def stall_after(at: float, intervals: Iterable[tuple[float, float]], window_s: float = WINDOW_S) -> float:
    """The longest time work stood still after ``at``, among the still intervals overlapping the
    window: from ``at`` (or from when the work arrived, if later: time with nothing waiting is
    not a stall) to the completion that ended it (0: none)."""
    waited = [
        end - max(start, at)
        for start, end in intervals
        if end - start >= MIN_STALL_S and end >= at and start <= at + window_s
    ]
    return max(waited, default=0.0)


def stalls(
    bootstrap: str, requests: str, decisions: str, outcomes: str, faults: list[tuple[float, str]]
) -> list[float]:
    """For each (epoch seconds, stage kind) fault: how long the stage's work stood still after it."""
    read = {t: asyncio.run(read_topic(bootstrap, t)) for t in (requests, decisions, outcomes)}
    deciding, calling = [], []
    for p in range(DEFAULT_PARTITIONS):
        decided = read[decisions].get(p, [])
        deciding.append(still_intervals(_firsts(read[requests].get(p, [])), _firsts(decided)))
        dispatched = [e for e in decided if isinstance(e[2], RequestDecided) and e[2].verdict == "dispatch"]
        answered = [e for e in read[outcomes].get(p, []) if isinstance(e[2], OutcomeRecorded)]
        calling.append(still_intervals(_firsts(dispatched), _firsts(answered)))
    out = []
    for n, (at, kind) in enumerate(faults):
        stages = {"decider": [deciding], "worker": [calling], "provider": [calling]}.get(
            kind, [deciding, calling]
        )
        # A stall that begins after the next fault is that fault's, not this one's.
        window = min([WINDOW_S, *(later - at for later, _ in faults[n + 1 :] if later > at)])
        out.append(max(stall_after(at, iv, window) for stage in stages for iv in stage))
    return out
