"""The evidence projector: every event on every topic becomes one sealed row of a Parquet table.

Exactly once, from the log alone:

- its position lives with the data: each flush ends with a manifest checkpoint naming the offsets
  it consumed, and a restart resumes from the last checkpoint (Kafka's committed offsets are
  written too, for lag monitoring only);
- a flush writes one file per table and region (the rows of every partition it read), named by
  the ledger's size when it began, atomically; files of a flush cut short are unlisted, so a
  restart deletes them and writes them again;
- an event whose id was already projected within the last ``dedup_window`` offsets of its partition
  (a stage re-emitting after a crash) is dropped; ``verify`` checks the rest of the store.

Rows are filed under their tenant's home region (``region=<r>/<table>/``), and content is encrypted
with the tenant's (or data subject's) key before it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import logging
import os
import time
from collections import defaultdict, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pyarrow.parquet as pq
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexuscore.core import judge_timeout, refusal_event
from nexuscore.kernel.clock import Clock
from nexuscore.kernel.errors import DecodeError, EvidenceError
from nexuscore.observe import record_lag, record_sealed, record_spans, with_trace
from nexuscore.policy import GovernanceState, Refusal, TrustStore, check_review, judge
from nexuscore.projections._keys import FieldCipher, LocalKeyStore
from nexuscore.projections._leaves import column_leaves
from nexuscore.projections._manifest import ERASURES, Manifest, file_sources, require_regular
from nexuscore.projections._tables import (
    POSITIONS,
    ROW_BUILDERS,
    SCHEMAS,
    Row,
    Rows,
    sourced_values,
    to_columns,
    to_table,
)
from nexuscore.projections._writer import SealedWriter
from nexuscore.schemas import (
    ActRefused,
    AvroCodec,
    BudgetSettled,
    CircuitStateChanged,
    DeadLettered,
    DispatchRequested,
    EscalationResolved,
    Event,
    InferenceRequested,
    KillSwitchChanged,
    ModelCallAttempted,
    OutcomeRecorded,
    PolicyStageChanged,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
    ShadowDecisionRecorded,
)
from nexuscore.transport import (
    Topics,
    appended_at,
    dead_letter,
    decode_tenant_record,
    new_consumer,
    partition_counts,
    start_client,
)

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"  # rows whose tenant has no home region (unknown tenants, dead letters)
# The content columns, encrypted under the row's tenant (and data subject) key.
_CONTENT = {"requests": "prompt", "outcomes": "response", "deadletters": "raw_value"}


# A client may retry a request under a new event id: requests are deduplicated by request id,
# which is unique per tenant only. ``_dedup_keys`` gives the same key from a sealed file.
def _dedup_key(table: str, row: Row) -> str:
    if table == "requests":
        return f"{row['tenant_id']}\x1f{row['request_id']}"
    return str(row["event_id"])


def _dedup_keys(path: Path, table: str, since: int) -> list[tuple[str, int, int, str]]:
    """(topic, partition, offset, dedup key) of a sealed file's rows from offset ``since`` on (on
    recovery; a file holds the rows of several partitions)."""
    source = ["src_topic", "src_partition", "src_offset"]
    columns = [*source, "tenant_id", "request_id"] if table == "requests" else [*source, "event_id"]
    try:
        data = pq.read_table(require_regular(path), columns=columns, filters=[("src_offset", ">=", since)])
    except (OSError, pa.ArrowException) as exc:
        # A sealed file that cannot be read (a pipe in its place would block here for ever): no
        # dedup window can be rebuilt, and more evidence on top of it is not written blind.
        raise EvidenceError(f"cannot read {path} to resume: {exc} (run `nexuscore evidence verify`)") from exc
    topics, partitions, offsets = (data.column(c).to_pylist() for c in source)
    if table == "requests":
        keys = [
            f"{t}\x1f{r}" for t, r in zip(data.column(3).to_pylist(), data.column(4).to_pylist(), strict=True)
        ]
    else:
        keys = [str(k) for k in data.column(3).to_pylist()]
    return list(zip(topics, partitions, offsets, keys, strict=True))


# Topics whose undecodable messages no stage dead-letters (the decider takes requests, outcomes
# and reviews; the workers dispatch): the projector records a dead letter for them itself.
def _own_dead_letters(topics: Topics) -> frozenset[str]:
    return frozenset(
        {topics.decisions, topics.attempts, topics.deadletter, topics.governance, topics.circuits}
    )


PRODUCER = "nexuscore.projector"


def _topic_contract(topics: Topics) -> dict[str, tuple[tuple[type[Event], ...], str]]:
    """Per topic: the event types that belong on it, and the field its messages are keyed by."""
    return {
        topics.decisions: (
            (
                RequestDecided,
                RequestRejected,
                BudgetSettled,
                EscalationResolved,
                ShadowDecisionRecorded,
                ActRefused,
            ),
            "tenant_id",
        ),
        topics.dispatch: ((DispatchRequested,), "request_id"),
        topics.attempts: ((ModelCallAttempted,), "tenant_id"),
        topics.outcomes: ((OutcomeRecorded,), "tenant_id"),
        topics.deadletter: ((DeadLettered,), "source_topic"),
        topics.circuits: ((CircuitStateChanged,), "deployment_id"),
    }


class _Recent:
    """The keys of the events kept from (at least) the last ``window`` offsets of one partition.

    Held as 16-byte digests in one set, and in blocks of ``window // 8`` offsets that leave the
    set together once every offset of the block is more than ``window`` behind: a key stays for
    ``window`` to ``window * 9 / 8`` offsets. No offset is kept per key: about 116 bytes a key,
    against about 211 with an (offset, digest) deque and a set; a long-lived projector holds up to
    ``window`` keys for every partition of the namespace (360,000 at the defaults), and one that
    catches up on a burst, every key of it.
    """

    def __init__(self, window: int) -> None:
        self.window = window
        self.block = max(1, window // 8)
        self.keys: set[bytes] = set()
        # (the block's first offset, its keys), oldest first.
        self.blocks: deque[tuple[int, list[bytes]]] = deque()

    def seen(self, offset: int, key: str) -> bool:
        blocks = self.blocks
        while blocks and blocks[0][0] + self.block - 1 < offset - self.window:
            self.keys.difference_update(blocks.popleft()[1])
        digest = _digest(key)
        if digest in self.keys:
            return True
        if not blocks or offset >= blocks[-1][0] + self.block:
            blocks.append((offset, []))
        blocks[-1][1].append(digest)
        self.keys.add(digest)
        return False


def _digest(key: str) -> bytes:
    """``key`` hashed to 128 bits: a collision, which would drop an event as a repeat, is as likely
    as guessing a random 128-bit id. (Every key is hashed, event ids too: reading a hex id as its
    bytes would make ids that differ in case or spacing one.)"""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Batch:
    """Rows gathered from one topic-partition since the last flush."""

    def __init__(self, start: int) -> None:
        self.start = start  # the first offset this flush accounts for
        self.first = -1
        self.last = -1
        self.end = start  # one past the last offset consumed
        # Per (table, region): each row's column values in schema order (``row_values``).
        self.rows: dict[tuple[str, str], list[tuple[Any, ...]]] = defaultdict(list)
        self.events = 0
        self.duplicates = 0
        self.undecodable = 0


class Projector:
    """Projects every NexusCore topic into sealed Parquet tables under ``evidence_dir``."""

    def __init__(
        self,
        bootstrap: str,
        evidence_dir: Path,
        signing_key: Ed25519PrivateKey,
        clock: Clock,
        *,
        regions: Mapping[str, str],
        keystore: LocalKeyStore | None = None,
        topics: Topics = Topics(),
        flush_interval_s: float = 1.0,
        flush_rows: int = 10_000,
        flush_bytes: int = 4 * 1024 * 1024,
        dedup_window: int = 10_000,
        trust: TrustStore | None = None,
        group: str | None = "nexuscore-projector",
    ) -> None:
        self.bootstrap = bootstrap
        # The consumer group whose offsets show the projector's lag (its position lives in the
        # manifest); None for a scratch projection, which must not move the live one's figures.
        self.group = topics.group(group) if group is not None else None
        # Governance acts and reviews are judged with the deciders' rules against this trust store:
        # accepted ones go to their tables, refused ones to ``refusals`` (none trusted: all refused).
        self.trust = trust or TrustStore()
        self.governance = GovernanceState()
        # Governance offsets below these were projected before a restart: folded, not projected.
        self._governance_until: dict[TopicPartition, int] = {}
        self._erasures_seen: tuple[int, int, int] | None = None  # the erasure ledger's, last looked
        self._own_dead_letters = _own_dead_letters(topics)
        self._contract = _topic_contract(topics)
        # Topic names are properties computed on each read: resolved once for the per-event path.
        self._requests, self._governance, self._reviews = topics.requests, topics.governance, topics.reviews
        self._validated = frozenset({topics.outcomes, topics.dispatch, topics.circuits})
        self.evidence_dir = evidence_dir
        self.signing_key = signing_key
        self.clock = clock
        self.regions = regions
        self.keystore = keystore or LocalKeyStore(evidence_dir / "_keys")
        self.cipher = FieldCipher(self.keystore)
        self.topics = topics
        self.flush_interval_s = flush_interval_s
        self.flush_rows = flush_rows
        # Of consumed messages (keys and values) per flush. 4 MiB, not 8 or 16: the projector's
        # peak RSS in bench.pipeline's throughput run (20,000 requests at once) was 220-228 MB
        # against 239 at 8 MiB (with the blocked dedup window; 243-251 before it) and 270-284 at
        # 16, at the same CPU per request; at 500 requests/s a one-second flush holds about 7 MB.
        self.flush_bytes = flush_bytes
        self.dedup_window = dedup_window
        self.codec = AvroCodec()
        self.stopping = asyncio.Event()
        self.events = 0
        self.undecodable = 0
        self.duplicates = 0
        self.files = 0
        self.writer: SealedWriter | None = None
        # Where the next flush of each partition starts: the previous one's end, so that offsets
        # the consumer never returns (transaction markers) are accounted for, not gaps.
        self._position: dict[TopicPartition, int] = {}
        self._recent: dict[TopicPartition, _Recent] = {}
        self._flusher: ThreadPoolExecutor | None = None  # the one thread flushes run on (run())

    # --- per event -------------------------------------------------------------------------------

    def add(self, batches: dict[TopicPartition, _Batch], record: ConsumerRecord) -> None:
        self.add_many(batches, TopicPartition(record.topic, record.partition), (record,))

    def add_many(
        self, batches: dict[TopicPartition, _Batch], tp: TopicPartition, records: Sequence[ConsumerRecord]
    ) -> None:
        """Add the records of one partition, in offset order (what one poll returned for it)."""
        until = self._governance_until.get(tp, 0)
        if until:
            refolded = [r for r in records if r.offset < until]
            for record in refolded:
                with contextlib.suppress(DecodeError):
                    self._rows(record)  # projected before a restart: only its effect on the state
            records = records[len(refolded) :]
        if not records:
            return
        batch = batches.get(tp)
        if batch is None:
            batch = batches[tp] = _Batch(self._position.get(tp, records[0].offset))
        if batch.first < 0:
            batch.first = records[0].offset
        batch.last = records[-1].offset
        batch.end = records[-1].offset + 1
        recent = self._recent.get(tp)
        if recent is None:
            recent = self._recent[tp] = _Recent(self.dedup_window)
        counted = 0
        for record in records:
            counted += self._add(batch, recent, record)
        batch.events += counted
        self.events += counted

    def _add(self, batch: _Batch, recent: _Recent, record: ConsumerRecord) -> bool:
        """Project one record; False when it is not counted as an event (bad input of a topic
        whose owner dead-letters it)."""
        try:
            rows = self._rows(record)
        except DecodeError as exc:
            batch.undecodable += 1
            self.undecodable += 1
            if record.topic not in self._own_dead_letters:
                # Bad input on an input topic is dead-lettered by the stage that owns it; the dead
                # letter, not the raw message, is what enters the evidence.
                return False
            rows = self._dead_letter(record, str(exc))
        except Exception as exc:  # noqa: BLE001  # no input may stop the projector
            log.exception("%s[%d]@%d could not be projected", record.topic, record.partition, record.offset)
            rows = self._dead_letter(record, f"internal error: {type(exc).__name__}: {exc}")
        for table, row in rows:
            if recent.seen(record.offset, _dedup_key(table, row)):
                if not (table == "reviews" and row.get("key_id")):
                    batch.duplicates += 1
                    self.duplicates += 1
                    continue
                # A signed review seen again is a replay, not a stage re-emitting: evidence.
                table, row = self._refused(
                    record, ReviewRecorded, row, Refusal("replayed", "this review was received already")
                )
            self._place(batch, record, table, row)
        return True

    def _place(self, batch: _Batch, record: ConsumerRecord, table: str, row: Row) -> None:
        region = self.regions.get(row["tenant_id"], UNASSIGNED)
        source = (region, record.topic, record.partition, record.offset)
        batch.rows[(table, region)].append(sourced_values(table, row, source))

    def _rows(self, record: ConsumerRecord) -> Rows:
        """The rows one message becomes (DecodeError: none, it is bad input)."""
        topic = record.topic
        if topic == self._requests:
            # External input: checked exactly as the decider checks it, so that what it
            # dead-letters never enters the requests table. The row is built from the record the
            # event was validated from (its fields as builtins: no conversion back).
            event, data = decode_tenant_record(self.codec, record.key, record.value, (InferenceRequested,))
            traced = with_trace(event)
            if traced is not event:
                data["trace_id"] = traced.trace_id
            return ROW_BUILDERS[InferenceRequested](data)
        if topic == self._governance:
            return self._governance_rows(record)
        if topic == self._reviews:
            return self._review_rows(record)
        expected, key_field = self._contract[topic]
        if topic in self._validated:
            # Input of another stage (the circuits: of every worker): checked as fully as that
            # stage checks it, so what it refuses never enters a table.
            event, data = self.codec.decode_validated(record.value, expected)
            cls = type(event)
        else:
            # Our own stages wrote these with the same codec: the schema and the topic's event
            # types and key are check enough.
            cls, data = self.codec.decode_record(record.value)
            if cls not in expected:
                raise DecodeError(f"event {cls.__name__} does not belong on {record.topic}")
        if record.key != str(data[key_field]).encode():
            raise DecodeError(
                f"message key {record.key!r:.80} is not the {key_field} {data[key_field]!r:.80}"
            )
        return ROW_BUILDERS[cls](data)

    def _governance_rows(self, record: ConsumerRecord) -> Rows:
        """Judged with the deciders' own rule, in log order, at the broker's append time."""
        event = self.codec.decode(record.value, (PolicyStageChanged, KillSwitchChanged))
        assert isinstance(event, PolicyStageChanged | KillSwitchChanged)
        appended = appended_at(record.timestamp, self.clock.now())
        if record.partition != 0:
            refusal: Refusal | None = Refusal(
                "invalid", "governance acts are read from partition 0 only, in order"
            )
        else:
            self.governance, refusal = judge(self.governance, event, self.trust, appended)
        if refusal is not None:
            return [
                self._refused(
                    record,
                    type(event),
                    msgspec.to_builtins(event, builtin_types=(datetime, bytes)),
                    refusal,
                    appended,
                )
            ]
        return ROW_BUILDERS[type(event)](msgspec.to_builtins(event, builtin_types=(datetime, bytes)))

    def _review_rows(self, record: ConsumerRecord) -> Rows:
        """A person's review enters ``reviews`` only with a valid reviewer signature, a timeout only
        as the deciders write it, after its deadline (the decider judges the rest: what it answers);
        a forgery enters ``refusals``."""
        event, data = decode_tenant_record(self.codec, record.key, record.value, (ReviewRecorded,))
        assert isinstance(event, ReviewRecorded)
        appended = appended_at(record.timestamp, self.clock.now())
        if event.action == "timed_out":  # unsigned: only one shaped as the deciders write it
            refused = judge_timeout(event, appended)
        else:
            signer = check_review(event, self.trust, appended)
            refused = signer if isinstance(signer, Refusal) else None
        if refused is not None:
            return [self._refused(record, ReviewRecorded, data, refused, appended)]
        return ROW_BUILDERS[ReviewRecorded](data)

    def _refused(
        self,
        record: ConsumerRecord,
        cls: type[ReviewRecorded] | type[PolicyStageChanged] | type[KillSwitchChanged],
        data: Row,
        refusal: Refusal,
        at: datetime | None = None,
    ) -> tuple[str, Row]:
        act = msgspec.convert(
            {k: v for k, v in data.items() if k in cls.__struct_fields__}, cls, from_attributes=False
        )
        when = at or appended_at(record.timestamp, self.clock.now())
        refused = refusal_event(act, refusal, (record.topic, record.partition, record.offset), PRODUCER, when)
        return ROW_BUILDERS[ActRefused](msgspec.to_builtins(refused, builtin_types=(datetime, bytes)))[0]

    def _dead_letter(self, record: ConsumerRecord, reason: str) -> Rows:
        dl = dead_letter(
            record.topic,
            record.partition,
            record.offset,
            record.key,
            record.value,
            reason,
            PRODUCER,
            appended_at(record.timestamp, self.clock.now()),
        )
        return ROW_BUILDERS[DeadLettered](msgspec.to_builtins(dl, builtin_types=(datetime, bytes)))

    def _protect(self, table: str, columns: list[list[Any]], now: datetime) -> None:
        """Encrypt the content column of one file's columns in place, in one bulk call."""
        column = _CONTENT.get(table)
        if column is None or not columns[0]:
            return
        at = POSITIONS[table]
        content = columns[at[column]]
        subjects = (
            [s or None for s in columns[at["data_subject"]]]
            if "data_subject" in at
            else [None] * len(content)
        )
        if table == "deadletters":
            tenants = [(k or b"").decode("utf-8", "replace") or UNASSIGNED for k in columns[at["raw_key"]]]
            texts = [v.hex() for v in content]
        else:
            tenants, texts = columns[at["tenant_id"]], content
            if table == "requests":
                columns[at["prompt_chars"]] = [len(t) for t in texts]
        sealed = self.cipher.encrypt_many(
            column, list(zip(tenants, subjects, columns[at["event_id"]], texts, strict=True)), now
        )
        columns[at[f"{column}_key"]] = [key_id for key_id, _ in sealed]
        columns[at[column]] = [blob for _, blob in sealed]

    # --- per flush -------------------------------------------------------------------------------

    def flush(self, batches: dict[TopicPartition, _Batch]) -> None:
        """Write and seal every file of this flush, then commit them with one checkpoint.

        One file per table and region: the rows of every partition of the flush, partition after
        partition (its entry's ``sources`` say which rows came from which offsets)."""
        writer = self.writer
        assert writer is not None, "recover() first"
        self.keystore.refresh()
        now = self.clock.now()
        sealed = _sealed_rows(batches), len({key for b in batches.values() for key in b.rows})  # rows, files
        files: dict[tuple[str, str], list[tuple[TopicPartition, _Batch]]] = defaultdict(list)
        for tp, batch in sorted(batches.items()):
            for key in batch.rows:
                files[key].append((tp, batch))
        for (table, region), parts in sorted(files.items()):
            sources = [
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "first_offset": b.start,
                    "last_offset": b.end - 1,
                    "rows": len(b.rows[(table, region)]),
                }
                for tp, b in parts
            ]
            # Memory: each file's rows are let go as soon as they are columns (the plaintext with
            # them once encrypted), and its columns once they are Arrow: a flush holds its rows
            # plus one file in the making, not every file's columns, ciphertext and Arrow at once.
            columns = to_columns(table, [row for _, b in parts for row in b.rows.pop((table, region))])
            self._protect(table, columns, now)
            leaves = column_leaves(SCHEMAS[table], columns)
            data = to_table(table, columns)
            del columns
            writer.write_flush(data, table=table, region=region, sources=sources, leaves=leaves)
            del data
        writer.commit(
            [
                {
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "start": b.start,
                    "end": b.end,
                    "events": b.events,
                    "duplicates": b.duplicates,
                    "undecodable": b.undecodable,
                }
                for tp, b in sorted(batches.items())
            ],
            self.clock.now(),
        )
        for tp, b in batches.items():
            self._position[tp] = b.end
        record_sealed(*sealed)

    # --- start-up --------------------------------------------------------------------------------

    def recover(self) -> Manifest:
        """Load the ledger, delete files no checkpoint covers, and rebuild the dedup windows."""
        try:
            self.evidence_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvidenceError(f"cannot write evidence under {self.evidence_dir}: {exc.strerror}") from exc
        self.writer = SealedWriter(self.evidence_dir, self.signing_key)
        manifest = self.writer.manifest
        listed = {e["path"] for e in manifest.files()}
        for path in self.evidence_dir.glob("region=*/*/*.parquet"):
            relative = path.relative_to(self.evidence_dir).as_posix()
            if relative not in listed:
                log.info("removing %s: written by a flush that never reached its checkpoint", relative)
                path.unlink()
        for tmp in self.evidence_dir.glob("region=*/*/.*.tmp"):
            tmp.unlink()
        self._rebuild_windows(manifest)
        self._position = {TopicPartition(t, p): end for (t, p), end in manifest.positions.items()}
        self._erasures_changed()  # what it is now: sealed by the next commit
        return manifest

    def _erasures_changed(self) -> bool:
        """Whether the erasure ledger changed (size, time, inode) since the last look: an
        ``evidence erase`` cannot seal it while this projector holds the ledger's lock."""
        try:
            info = os.stat(self.evidence_dir / ERASURES)
            seen: tuple[int, int, int] | None = (info.st_size, info.st_mtime_ns, info.st_ino)
        except OSError:
            seen = None
        changed, self._erasures_seen = seen != self._erasures_seen, seen
        return changed

    def _rebuild_windows(self, manifest: Manifest) -> None:
        """The dedup window of each partition, from the files of its last ``dedup_window`` offsets.

        Read with pyarrow (loaded anyway), not DuckDB: a DuckDB connection keeps tens of MB
        resident for the life of the process.
        """
        since = {tp: end - self.dedup_window - 1 for tp, end in manifest.positions.items()}
        rows: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
        for e in manifest.files():
            recent = {
                tp: since[tp]
                for s in file_sources(e)
                if (tp := (s["topic"], s["partition"])) in since and s["last_offset"] >= since[tp]
            }
            if recent:
                for topic, partition, offset, key in _dedup_keys(
                    self.evidence_dir / e["path"], e["table"], min(recent.values())
                ):
                    if offset >= recent.get((topic, partition), offset + 1):
                        rows[(topic, partition)].append((offset, key))
        for topic, partition in manifest.positions:
            window = self._recent[TopicPartition(topic, partition)] = _Recent(self.dedup_window)
            for offset, key in sorted(rows[(topic, partition)]):
                window.seen(offset, key)

    async def run(self) -> None:
        try:
            self.evidence_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvidenceError(f"cannot write evidence under {self.evidence_dir}: {exc.strerror}") from exc
        # Before recovery, which deletes the files of unfinished flushes: another live projector's.
        lock = _lock(self.evidence_dir)
        try:
            manifest = await asyncio.to_thread(self.recover)
        except BaseException:
            os.close(lock)
            raise
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="projector-flush")
        # A flush's rows are tens of thousands of small containers that live until it is written:
        # at the default threshold (700) the cyclic collector walked them all again and again
        # (about 6% of the projector's CPU, bench/_evidence/projector_offline.py). Rows hold no cycles.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        consumer = new_consumer(
            self.bootstrap,
            (),
            self.group,  # None: a consumer without a group
            # Bounded memory: aiokafka prefetches per partition; at about 60 partitions, 4 MiB each
            # held hundreds of MB before a record was processed. A fetch answers with at most
            # 16 MiB (a flush's worth), 512 KiB a partition. (256 KiB and 4 MiB measured slower:
            # aiokafka keeps one fetch in flight per broker, and small fetches left it waiting.)
            max_partition_fetch_bytes=512 * 1024,
            fetch_max_bytes=16 * 1024 * 1024,
            # Evidence is not latency-critical: the broker answers a fetch once 1 MiB is ready
            # or 100 ms passed, not with whatever trickled in. A caught-up projector then costs the
            # broker about ten fetches a second instead of one per poll, and wakes that often: at
            # 500 requests/s it took 20 % of a core against 27-29 % with 64 KiB (three interleaved
            # bench.pipeline latency runs each). The wait not longer: the one fetch in flight may
            # name only partitions with little left, and others wait behind it.
            fetch_min_bytes=1024 * 1024,
            fetch_max_wait_ms=100,
        )
        await start_client(consumer, self.bootstrap)
        try:
            counts = await partition_counts(self.bootstrap, self.topics.all)
            partitions = [TopicPartition(t, p) for t in self.topics.all for p in range(counts[t])]
            consumer.assign(partitions)
            for tp in partitions:
                position = manifest.positions.get((tp.topic, tp.partition))
                if position is None:
                    await consumer.seek_to_beginning(tp)
                    self._position[tp] = await consumer.position(tp)
                elif tp.topic == self.topics.governance:
                    # The governance state is a fold of the whole log: read it again from the
                    # start, projecting only what follows the position.
                    self._governance_until[tp] = position
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, position)
            await self._loop(consumer)
        finally:
            await consumer.stop()
            self._flusher.shutdown(wait=True)
            self._flusher = None
            os.close(lock)

    async def _loop(self, consumer: AIOKafkaConsumer) -> None:
        """Poll, add, and hand each full batch to a flush that runs while the next one is read.

        One flush at a time, in order, so checkpoints stay sequential; at most two batches are
        held (the one being written and the one being read), each bounded by ``flush_rows`` and
        ``flush_bytes``.
        """
        batches: dict[TopicPartition, _Batch] = {}
        pending = size = 0
        last_flush = time.monotonic()
        flushing: asyncio.Task[None] | None = None
        try:
            while not self.stopping.is_set():
                fetched = await consumer.getmany(timeout_ms=100, max_records=2_000)
                record_lag("projector", consumer, fetched)
                record_spans("projector", "nexuscore.project", (r for rs in fetched.values() for r in rs))
                for tp, records in fetched.items():
                    self.add_many(batches, tp, records)
                    size += sum(r.serialized_value_size + r.serialized_key_size for r in records)
                    pending += len(records)
                del fetched  # the raw records go as soon as they are rows
                due = time.monotonic() - last_flush >= self.flush_interval_s
                if batches and (due or pending >= self.flush_rows or size >= self.flush_bytes):
                    if flushing is not None:
                        await flushing
                    flushing = asyncio.create_task(self._flush_and_commit(consumer, self._hand_over(batches)))
                    batches, pending, size, last_flush = {}, 0, 0, time.monotonic()
                elif not batches:
                    last_flush = time.monotonic()
                    if self._erasures_changed():  # an erasure while idle: seal it now, not at the next flush
                        if flushing is not None:
                            await flushing
                            flushing = None
                        self.writer.commit([], self.clock.now())  # type: ignore[union-attr]  # recovered
        finally:
            if flushing is not None:
                await flushing
            if batches:
                await self._flush_and_commit(consumer, self._hand_over(batches))

    def _hand_over(self, batches: dict[TopicPartition, _Batch]) -> dict[TopicPartition, _Batch]:
        """The next batch of each partition starts where this one ends, written yet or not."""
        for tp, b in batches.items():
            self._position[tp] = b.end
        return batches

    async def _flush_and_commit(
        self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, _Batch]
    ) -> None:
        # Parquet encoding is CPU work: keep the event loop (and the consumer's heartbeats)
        # responsive while it runs; its native parts (Arrow, zstd, sha256, fsync) run beside it.
        # Always the same thread: each thread that allocates gets its own malloc arena, and every
        # arena keeps its high-water mark resident (to_thread rotated over six of them).
        await asyncio.get_running_loop().run_in_executor(self._flusher, self._flush_and_trim, batches)
        await self._commit(consumer, batches)
        # Per batch: the flush is durable, signed and committed here (the place for metrics).

    def _flush_and_trim(self, batches: dict[TopicPartition, _Batch]) -> None:
        self.flush(batches)
        _give_back_free_heap()

    async def _commit(self, consumer: AIOKafkaConsumer, batches: dict[TopicPartition, _Batch]) -> None:
        if self.group is not None:
            await _commit(consumer, batches)


def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _malloc_trim()


def _give_back_free_heap() -> bool:
    """Return the C heap's free pages to the system (glibc's ``malloc_trim``; elsewhere nothing):
    a flush frees tens of megabytes of rows and columns, and the next batch's peak would grow on
    top of what malloc keeps. After every flush, in ``bench.evidence``'s projector (200,000 events
    from offset 0, two runs each, interleaved): peak RSS 227-228 MB against 239-240 MB, CPU per
    event within the runs' spread. It locks each arena in turn: the loop thread's allocations wait
    a few milliseconds at most. True if it released any."""
    return _MALLOC_TRIM is not None and bool(_MALLOC_TRIM(0))


def use_system_allocator() -> None:
    """Give Arrow's buffers to the system allocator, for the whole process: Arrow's default
    (mimalloc) keeps what a flush freed for the next one, the system allocator gives it back. Peak
    RSS in bench.pipeline's throughput run, 3 runs each: 232-256 MB against 260-281 MB, at the same
    CPU per event within the runs' spread. The projector's process calls it before it starts (the
    stage, and the benchmark's projector, so that it measures the stage's memory)."""
    pa.set_memory_pool(pa.system_memory_pool())


def _sealed_rows(batches: dict[TopicPartition, _Batch]) -> dict[str, int]:
    rows: dict[str, int] = defaultdict(int)
    for b in batches.values():
        for (table, _region), table_rows in b.rows.items():
            rows[table] += len(table_rows)
    return rows


def _lock(evidence_dir: Path) -> int:
    """One projector per evidence folder: two would interleave one ledger."""
    fd = os.open(evidence_dir / ".projector.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EvidenceError(f"another projector is writing {evidence_dir}") from None
    return fd


async def _commit(consumer: AIOKafkaConsumer, batches: dict[TopicPartition, _Batch]) -> None:
    """Record the position in Kafka too, so lag shows in the usual tools (the manifest rules)."""
    try:
        await consumer.commit({tp: b.end for tp, b in batches.items()})
    except KafkaError as exc:
        log.warning("offset commit failed (%s); lag figures may be stale", exc)
