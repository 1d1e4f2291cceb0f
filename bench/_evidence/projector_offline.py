"""Where the projector's time goes, without the broker in the loop (a child process of phase 1).

Every record is read into memory first (plain consumer); then ``Projector.add`` and
``Projector.flush`` run on them exactly as ``Projector._loop`` calls them (a flush every
``flush_rows`` events), with the main steps timed by wrappers (about 0.3 µs per wrapped call).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from bench._evidence.common import partition_of, sealing_targets, signing_key
from bench._harness import CallTimer, own_cpu_s
from nexuscore.kernel.clock import SystemClock
from nexuscore.projections import Projector, SealedWriter
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics, new_consumer, start_client


async def read_all(bootstrap: str, topics: Topics, ends: dict[str, int]) -> list[Any]:
    """Every record of the namespace, from offset 0 to the end offsets."""
    want = {TopicPartition(*partition_of(k)): end for k, end in ends.items()}
    consumer = new_consumer(
        bootstrap, (), topics.group("bench-offline"), max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await start_client(consumer, bootstrap)
    try:
        consumer.assign(list(want))
        await consumer.seek_to_beginning(*want)
        remaining = {tp for tp, end in want.items() if end > 0}
        records: list[Any] = []
        while remaining:
            fetched = await consumer.getmany(timeout_ms=100, max_records=10_000)
            for tp, batch in fetched.items():
                records.extend(batch)
                if batch and batch[-1].offset + 1 >= want[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


def _targets() -> dict[str, tuple[Any, str]]:
    from nexuscore.projections import _projector

    return {
        "add: AvroCodec.decode_record (fastavro; all topics)": (AvroCodec, "decode_record"),
        "add: decode_tenant_event (requests: decode + msgspec validation)": (
            _projector,
            "decode_tenant_event",
        ),
        "add: msgspec.to_builtins (requests)": (_projector.msgspec, "to_builtins"),  # type: ignore[attr-defined]
        "add: _Recent.seen (dedup window)": (_projector._Recent, "seen"),
        "add: _protect (FieldCipher.encrypt)": (_projector.Projector, "_protect"),
        "flush": (_projector.Projector, "flush"),
        "flush: SealedWriter.write": (SealedWriter, "write"),
        **{f"flush: {k}": v for k, v in sealing_targets().items()},
    }


@contextlib.contextmanager
def timed_row_builders() -> Iterator[list[float]]:
    """Time spent in ``_tables.ROW_BUILDERS`` (Avro record -> row dict) while inside: [seconds]."""
    from nexuscore.projections import _tables

    builders = dict(_tables.ROW_BUILDERS)
    built = [0.0]

    def timed_builder(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def call(r: dict[str, Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(r)
            finally:
                built[0] += time.perf_counter() - t0

        return call

    for cls, fn in builders.items():
        _tables.ROW_BUILDERS[cls] = timed_builder(fn)
    try:
        yield built
    finally:
        _tables.ROW_BUILDERS.update(builders)


def add_and_flush(projector: Projector, records: list[Any], flush_rows: int) -> tuple[float, float]:
    """``add`` every record, ``flush`` every ``flush_rows`` and at the end; (seconds, CPU seconds)."""
    add, flush = projector.add, projector.flush
    c0, t0 = own_cpu_s(), time.perf_counter()
    batches: dict[Any, Any] = {}
    pending = 0
    for record in records:
        add(batches, record)
        pending += 1
        if pending >= flush_rows:
            flush(batches)
            batches, pending = {}, 0
    if batches:
        flush(batches)
    return time.perf_counter() - t0, own_cpu_s() - c0


def _derived_calls(timer: CallTimer, built_s: float, seconds: float, events: int) -> dict[str, Any]:
    """The timed calls, plus the steps worked out by difference, sorted by phase then time."""
    calls = timer.result()
    calls["add: ROW_BUILDERS (Avro record -> row dict)"] = {"s": round(built_s, 3), "calls": events}
    flush_s = timer.seconds["flush"]
    write_s = timer.seconds["flush: SealedWriter.write"]
    commit_s = timer.seconds["flush: manifest commit + sign"]
    calls["flush: Table.from_pylist (= flush - write - commit)"] = {
        "s": round(flush_s - write_s - commit_s, 3),
        "calls": timer.calls["flush: SealedWriter.write"],
    }
    calls["add: everything (= total - flush)"] = {"s": round(seconds - flush_s, 3), "calls": events}
    return {k: calls[k] for k in sorted(calls, key=lambda k: (k.split(":")[0], -calls[k]["s"]))}


def projector_offline(
    bootstrap: str,
    namespace: str,
    ends: dict[str, int],
    evidence_dir: str,
    regions: dict[str, str],
    flush_rows: int,
) -> dict[str, Any]:
    """Child: where the projector's time goes, without the broker in the loop (see the module)."""
    topics = Topics(namespace=namespace)
    records = asyncio.run(read_all(bootstrap, topics, ends))
    projector = Projector(
        bootstrap,
        Path(evidence_dir),
        signing_key(),
        SystemClock(),
        regions=regions,
        topics=topics,
        flush_rows=flush_rows,
    )
    projector.recover()
    with timed_row_builders() as built, CallTimer(_targets()) as timer:
        seconds, cpu = add_and_flush(projector, records, flush_rows)
    return {
        "events": len(records),
        "flush_rows": flush_rows,
        "seconds": round(seconds, 2),
        "events_per_s": round(len(records) / seconds),
        "cpu_s": round(cpu, 2),
        "us_per_event": round(seconds / len(records) * 1e6, 1),
        "timed_calls": _derived_calls(timer, built[0], seconds, len(records)),
        "files": projector.writer.files if projector.writer else None,
    }


# --- without any broker: the log made in memory ----------------------------------------------------


def memory_records(events_wanted: int, seed: int, partitions: int = 4) -> tuple[list[Any], dict[str, str]]:
    """A recorded history encoded and keyed as the stages publish it, as ConsumerRecords in memory
    (the records a projector would fetch, without a broker): (records, regions)."""
    import zlib
    from collections import defaultdict

    from aiokafka import ConsumerRecord

    from bench._evidence.projector import history
    from tests.factories import _TOPIC_OF, POLICY

    topics, codec = Topics(), AvroCodec()
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    records: list[Any] = []
    for e in history(events_wanted, seed):
        kind = _TOPIC_OF[type(e).__name__]
        topic = getattr(topics, kind)
        key = (e.request_id if kind == "dispatch" else e.tenant_id).encode()
        partition = 0 if topic == topics.governance else zlib.crc32(key) % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        records.append(
            ConsumerRecord(
                topic=topic, partition=partition, offset=offset,
                timestamp=int(e.occurred_at.timestamp() * 1000), timestamp_type=1, key=key,
                value=codec.encode(e), checksum=None, serialized_key_size=len(key),
                serialized_value_size=0, headers=(),
            )  # fmt: skip
        )
    return records, {t.id: t.home_region for t in POLICY.tenants}


def decode_only(records: list[Any]) -> float:
    """The baseline of the same run: CPU seconds to Avro-decode every record once, nothing else."""
    codec = AvroCodec()
    c0 = own_cpu_s()
    for r in records:
        codec.decode_record(r.value)
    return own_cpu_s() - c0


def main() -> None:
    """``python -m bench._evidence.projector_offline [EVENTS] [FLUSH_ROWS]``: the projector's CPU per
    event on an in-memory log, beside the decode-only baseline of the same run (no broker)."""
    import json
    import shutil
    import sys
    import tempfile

    events = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    flush_rows = int(sys.argv[2]) if len(sys.argv) > 2 else 10_000
    records, regions = memory_records(events, seed=7)
    root = Path(tempfile.mkdtemp(prefix="nexus-offline-"))
    try:
        projector = Projector(
            "unused:9092", root, signing_key(), SystemClock(), regions=regions, flush_rows=flush_rows
        )
        projector.recover()
        baseline = decode_only(records)
        seconds, cpu = add_and_flush(projector, records, flush_rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(records)
    print(
        json.dumps(
            {
                "events": n,
                "flush_rows": flush_rows,
                "events_per_s": round(n / seconds),
                "cpu_us_per_event": round(cpu / n * 1e6, 1),
                "baseline_decode_only_cpu_us_per_event": round(baseline / n * 1e6, 1),
                "ratio_to_decode_only": round(cpu / baseline, 2),
                "files": projector.writer.files if projector.writer else None,
            }
        )
    )


if __name__ == "__main__":
    main()
