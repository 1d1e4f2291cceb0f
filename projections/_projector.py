"""The evidence projector: every event on every topic becomes rows of Parquet tables.

A stateless stage whose cost is per event, so it reads with aiokafka's batch API (``getmany``) and
writes Parquet in batches. Files are named by (table, topic, partition, first offset, last offset)
and offsets are committed only once the files are on disk: a crash re-creates files, never loses
events, and the views drop any duplicate by event id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from nexuscore.errors import DecodeError, EvidenceError
from nexuscore.projections._tables import ROW_BUILDERS, SCHEMAS, TABLES, Row
from nexuscore.schemas import AvroCodec, InferenceRequested
from nexuscore.streams import Topics, decode_tenant_event, new_consumer, start_client

log = logging.getLogger(__name__)


class _Batch:
    """Rows gathered from one topic-partition since the last flush."""

    def __init__(self) -> None:
        self.first = -1
        self.last = -1
        self.rows: dict[str, list[Row]] = defaultdict(list)
        self.count = 0


class Projector:
    """Projects every NexusCore topic into Parquet tables under ``evidence_dir``."""

    def __init__(
        self,
        bootstrap: str,
        evidence_dir: Path,
        *,
        topics: Topics = Topics(),
        flush_interval_s: float = 1.0,
        flush_rows: int = 10_000,
    ) -> None:
        self.bootstrap = bootstrap
        self.evidence_dir = evidence_dir
        self.topics = topics
        self.flush_interval_s = flush_interval_s
        self.flush_rows = flush_rows
        self.codec = AvroCodec()
        self.stopping = asyncio.Event()
        self.events = 0
        self.undecodable = 0
        self.files = 0

    def add(self, batches: dict[TopicPartition, _Batch], record: ConsumerRecord) -> None:
        tp = TopicPartition(record.topic, record.partition)
        batch = batches.get(tp)
        if batch is None:
            batch = batches[tp] = _Batch()
            batch.first = record.offset
        batch.last = record.offset
        batch.count += 1
        try:
            if record.topic == self.topics.requests:
                # External input: checked exactly as the decider checks it, so that what it
                # dead-letters never enters the requests table.
                event = decode_tenant_event(self.codec, record.key, record.value, (InferenceRequested,))
                cls, data = type(event), msgspec.to_builtins(event, builtin_types=(datetime, bytes))
            else:
                # Our own stages wrote these with the same codec: the Avro schema is check enough.
                cls, data = self.codec.decode_record(record.value)
        except DecodeError:
            # Bad input on an input topic is dead-lettered by the stage that owns it; the dead
            # letter, not the raw message, is what enters the evidence.
            self.undecodable += 1
            return
        source = {"src_topic": record.topic, "src_partition": record.partition, "src_offset": record.offset}
        for table, row in ROW_BUILDERS[cls](data):
            row.update(source)
            batch.rows[table].append(row)
        self.events += 1

    def flush(self, batches: dict[TopicPartition, _Batch]) -> None:
        directories = set()
        for tp, batch in batches.items():
            for table, rows in batch.rows.items():
                name = f"{tp.topic}-p{tp.partition}-{batch.first:012d}-{batch.last:012d}.parquet"
                directory = self.evidence_dir / table
                data = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
                write_table(directory, name, data, sync_dir=False)
                directories.add(directory)
                self.files += 1
        for directory in directories:  # once per flush, not once per file
            sync_directory(directory)

    async def run(self) -> None:
        try:
            for table in TABLES:
                (self.evidence_dir / table).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvidenceError(f"cannot write evidence under {self.evidence_dir}: {exc.strerror}") from exc
        consumer = new_consumer(
            self.bootstrap,
            self.topics.all,
            self.topics.group("nexuscore-projector"),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await start_client(consumer, self.bootstrap)
        batches: dict[TopicPartition, _Batch] = {}
        pending = 0
        last_flush = time.monotonic()
        try:
            while not self.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=100, max_records=2_000)
                for records in fetched.values():
                    for record in records:
                        self.add(batches, record)
                        pending += 1
                due = time.monotonic() - last_flush >= self.flush_interval_s
                if batches and (due or pending >= self.flush_rows):
                    # Parquet encoding is CPU work: keep the event loop (and the consumer's
                    # heartbeats) responsive while it runs.
                    await asyncio.to_thread(self.flush, batches)
                    await _commit(consumer, batches)
                    batches, pending, last_flush = {}, 0, time.monotonic()
                elif not batches:
                    last_flush = time.monotonic()
        finally:
            if batches:
                await asyncio.to_thread(self.flush, batches)
                await _commit(consumer, batches)
            await consumer.stop()


async def _commit(consumer: AIOKafkaConsumer, batches: dict[TopicPartition, _Batch]) -> None:
    """Commit what was flushed, for the partitions this projector still owns."""
    assigned = consumer.assignment()
    offsets = {tp: b.last + 1 for tp, b in batches.items() if tp in assigned}
    try:
        await consumer.commit(offsets)
    except KafkaError as exc:
        # The partitions' new owner re-projects from the last commit: the same files again, and
        # any duplicate row is dropped by the views.
        log.warning("offset commit failed (%s); these events will be projected again", exc)


def write_table(directory: Path, name: str, table: pa.Table, *, sync_dir: bool = True) -> None:
    """Write a Parquet file atomically and durably: readers never see half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{name}.tmp"
    pq.write_table(table, tmp, compression="zstd")
    # Durable before the offsets that cover it are committed: the file, then its name.
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, directory / name)
    if sync_dir:
        sync_directory(directory)


def sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
