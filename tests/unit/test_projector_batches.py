"""The projector's batched paths give what the one-at-a-time paths gave: a poll's records added per
partition (``add_many``) write the very same ledger as records added one by one, bulk encryption
the same bytes as ``FieldCipher.encrypt``, and the column builder the same Arrow table as
``Table.from_pylist``."""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiokafka import ConsumerRecord, TopicPartition

from nexuscore.projections import SCHEMAS, FieldCipher, LocalKeyStore, Projector, committed_files, verify
from nexuscore.projections._projector import _Recent
from nexuscore.projections._tables import columnar
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics
from tests.factories import (
    _TOPIC_OF,
    POLICY,
    T0,
    _key_of,
    offline_projector,
    project,
    run_history,
    signing_key,
)

TOPICS = Topics()


def records(partitions: int = 3) -> list[ConsumerRecord[bytes, bytes]]:
    """A history as a log, with bad bytes on an input topic (dead-lettered by its owner, so not
    projected) and on a topic whose bad input the projector dead-letters itself."""
    codec = AvroCodec()
    messages = [
        (getattr(TOPICS, _TOPIC_OF[type(e).__name__]), _key_of(e), codec.encode(e))
        for e in run_history(POLICY, 60, seed=3)
    ]
    messages[10:10] = [(TOPICS.requests, b"acme-bank", b"\xc3\x01 not avro at all")]
    messages[40:40] = [(TOPICS.decisions, b"acme-bank", b"garbage")]
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    out = []
    for topic, key, value in messages:
        partition = zlib.crc32(key) % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        out.append(
            ConsumerRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=int(T0.timestamp() * 1000),
                timestamp_type=1,
                key=key,
                value=value,
                checksum=None,
                serialized_key_size=len(key),
                serialized_value_size=len(value),
                headers=(),
            )  # fmt: skip
        )
    return out


def projected(root: Path, keys: Path, feed: Callable[[Projector, dict[Any, Any]], None]) -> Projector:
    projector = offline_projector(root, LocalKeyStore(keys))  # shared keys: the same ciphertext
    projector.recover()
    batches: dict[Any, Any] = {}
    feed(projector, batches)
    projector.flush(batches)
    return projector


def test_a_poll_added_per_partition_writes_the_same_ledger_as_records_one_by_one(tmp_path: Path) -> None:
    log = records()

    def one_by_one(p: Projector, batches: dict[Any, Any]) -> None:
        for r in log:
            p.add(batches, r)

    def polls(p: Projector, batches: dict[Any, Any]) -> None:
        for start in range(0, len(log), 25):  # what a getmany returns: per partition, in order
            by_tp: dict[TopicPartition, list[Any]] = defaultdict(list)
            for r in log[start : start + 25]:
                by_tp[TopicPartition(r.topic, r.partition)].append(r)
            for tp, rs in by_tp.items():
                p.add_many(batches, tp, rs)

    a = projected(tmp_path / "a", tmp_path / "keys", one_by_one)
    b = projected(tmp_path / "b", tmp_path / "keys", polls)
    assert (a.events, a.undecodable, a.duplicates) == (b.events, b.undecodable, b.duplicates)
    assert a.undecodable == 2 and a.events == len(log) - 1  # the bad request is its owner's to record
    assert (tmp_path / "a" / "manifest.jsonl").read_bytes() == (
        tmp_path / "b" / "manifest.jsonl"
    ).read_bytes()
    report = verify(
        tmp_path / "b", signing_key().public_key(), {POLICY.digest}, keystore=LocalKeyStore(tmp_path / "keys")
    )
    assert report.ok, report.findings


def test_bulk_encryption_gives_the_bytes_of_one_field_at_a_time(tmp_path: Path) -> None:
    keys = LocalKeyStore(tmp_path / "keys")
    cipher = FieldCipher(keys)
    now = datetime(2026, 11, 30, tzinfo=UTC)
    items = [
        ("acme-bank", None, "e1", "a prompt"),
        ("acme-bank", "subject-1", "e2", "another, for one data subject"),
        ("globex-insurance", None, "e3", ""),
        ("acme-bank", None, "e4", "é😀\x00"),
    ]
    bulk = cipher.encrypt_many("prompt", items, now)
    assert bulk == [cipher.encrypt(t, s, e, "prompt", text, now) for t, s, e, text in items]
    assert [
        cipher.decrypt(k, e, "prompt", blob) for (k, blob), (_, _, e, _) in zip(bulk, items, strict=True)
    ] == [text for *_, text in items]


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("columns") / "evidence"
    project(root, run_history(POLICY, 60, seed=9))
    return root


def test_columns_build_the_table_from_pylist_builds(stored: Path) -> None:
    for entry in committed_files(stored):
        schema = SCHEMAS[entry["table"]]
        table = pq.read_table(stored / entry["path"], schema=schema)
        rows = table.to_pylist()
        built, columns = columnar(entry["table"], rows)
        assert built.equals(pa.Table.from_pylist(rows, schema=schema)), entry["path"]
        assert [list(c) for c in columns] == [table.column(n).to_pylist() for n in schema.names]
        # A row lacking columns (none of the builders makes one) gets nulls there, as before.
        partial = [{k: v for k, v in row.items() if k != "src_topic"} for row in rows]
        assert columnar(entry["table"], partial)[0].equals(pa.Table.from_pylist(partial, schema=schema))


def test_a_restarted_projector_still_drops_what_it_projected_before_the_restart(tmp_path: Path) -> None:
    """The dedup windows are rebuilt from the sealed files (requests by tenant and request id)."""
    history = run_history(POLICY, 30, seed=4)
    root = tmp_path / "evidence"
    project(root, history)
    again = history[-12:]  # a stage re-emitting after its own crash: same ids, new offsets
    assert any(type(e).__name__ == "InferenceRequested" for e in again)
    restarted = project(root, history + again)
    assert (restarted.events, restarted.duplicates) == (len(again), len(again))
    report = verify(root, signing_key().public_key(), {POLICY.digest})
    assert report.ok and report.rows == len(history), report.findings


def test_the_dedup_window_knows_the_keys_of_its_last_offsets_and_keeps_lookalikes_apart() -> None:
    recent = _Recent(window=10)
    assert not recent.seen(0, "ab" * 16)
    assert recent.seen(5, "ab" * 16)  # within 10 offsets: a repeat
    # Ids that read as the same bytes in hex (case, spacing) are different events.
    assert not recent.seen(6, "AB" * 16)
    assert not recent.seen(7, "ab " * 10 + "ab")
    assert not recent.seen(8, "acme-bank\x1fr-1")
    assert recent.seen(9, "acme-bank\x1fr-1")
    # Blocks of 10 // 8 = 1 offset: offset 0 leaves once it is more than 10 offsets behind.
    assert not recent.seen(11, "ab" * 16)  # offset 0 left the window: not known any more
    assert len(recent.keys) == sum(len(keys) for _, keys in recent.blocks) == 4


def test_the_dedup_window_keeps_a_key_for_at_least_its_window_and_lets_whole_blocks_go() -> None:
    recent = _Recent(window=80)  # blocks of 10 offsets
    assert not recent.seen(100, "first")
    assert not recent.seen(109, "end of the first block")
    assert recent.seen(189, "first")  # 89 offsets on: its block (100-109) is still held
    assert recent.seen(189, "end of the first block")
    assert not recent.seen(190, "next")  # 100-109 are all more than 80 behind 190: the block goes
    assert not recent.seen(191, "first")  # so both are new again
    assert not recent.seen(192, "end of the first block")
    assert len(recent.keys) == 3 and [first for first, _ in recent.blocks] == [190]
