"""The decider's Tables without faust: dicts that remember what changed, backed by compacted
changelog topics (the ones ``ensure_topics`` creates for the decider, same names, same layout).

A key's changes go to the changelog partition of the input partition being processed, as faust
does, so restoring an input partition's state means reading the same-numbered partition of each
changelog to its end. Changes are written per batch, after the batch's outputs are acknowledged
and before its input offsets are committed: a crash in between repeats the batch against the
state before it (the outputs it sends again carry the same ids, and every reader drops them).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Mapping, MutableMapping

import msgspec
from aiokafka import AIOKafkaConsumer, TopicPartition

from nexuscore.transport import DeciderTable, Topics

log = logging.getLogger(__name__)
# How a Table's value is read (raises on bytes that are not one): checked as a restore reads it.
RowCheck = Callable[[bytes], object]


class ChangelogTable(MutableMapping[bytes, bytes]):
    """One Table: its rows, and the keys changed (with their partition) since the last flush."""

    def __init__(self, topic: str, *, timed: bool = False) -> None:
        self.topic = topic
        self.rows: dict[bytes, bytes] = {}
        self.owner: dict[bytes, int] = {}  # key -> the input partition whose state it is
        self.dirty: dict[bytes, int] = {}
        # Rows read back by the last restore, with their changelog record's time (microseconds):
        # how old they are, for the decider's retention. None: a Table whose rows never expire.
        self.restored: list[tuple[int, bytes]] | None = [] if timed else None
        self.partition = 0  # the input partition being processed: where changes are logged

    def __getitem__(self, key: bytes) -> bytes:
        return self.rows[key]

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:  # type: ignore[override]
        return self.rows.get(key, default)  # the hot path: no KeyError raised and caught per miss

    def __contains__(self, key: object) -> bool:
        return key in self.rows

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.rows[key] = value
        self.owner[key] = self.dirty[key] = self.partition

    def __delitem__(self, key: bytes) -> None:
        del self.rows[key]
        self.dirty[key] = self.owner.pop(key, self.partition)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)


class ChangelogState:
    """All of the decider's Tables, their restore and their per-batch flush."""

    def __init__(
        self, topics: Topics, *, timed: Collection[str] = (), checks: Mapping[str, RowCheck] | None = None
    ) -> None:
        """``timed``: the Tables whose restored rows keep their time (those that expire).
        ``checks``: per Table, how its values are read: a restored value that does not read (a
        changelog written by someone else, or damaged) is skipped and logged, not kept to stop
        the decider when a handler reads it."""
        app = topics.group("nexuscore-decider")
        self.checks = dict(checks or {})
        self.skipped = 0  # restored values that did not read as their Table's
        self.tables = {
            t: ChangelogTable(f"{app}-{t.value}-changelog", timed=t in timed) for t in DeciderTable
        }

    def at_partition(self, partition: int) -> None:
        for table in self.tables.values():
            table.partition = partition

    def snapshot(self) -> list[tuple[str, bytes, bytes | None, int]]:
        """The changes since the last snapshot, as they are now: (topic, key, value or None for a
        deleted key, partition). Taken when a batch ends, so that writing them later never
        carries a change of the next batch."""
        changes: list[tuple[str, bytes, bytes | None, int]] = []
        for table in self.tables.values():
            changes.extend((table.topic, key, table.rows.get(key), p) for key, p in table.dirty.items())
            table.dirty.clear()
        return changes

    async def restore(self, consumer: AIOKafkaConsumer, partitions: set[int]) -> int:
        """Read the changelog partitions of ``partitions`` to their end; return the rows read."""
        tps = [TopicPartition(t.topic, p) for t in self.tables.values() for p in partitions]
        if not tps:
            return 0
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        by_topic = {t.topic: t for t in self.tables.values()}
        check_of = {t.topic: self.checks.get(name) for name, t in self.tables.items()}
        read = 0
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for tp, records in (await consumer.getmany(*tps, timeout_ms=200, max_records=10_000)).items():
                table, check = by_topic[tp.topic], check_of[tp.topic]
                for r in records:
                    read += 1
                    if (
                        r.value is not None
                        and check is not None
                        and not self._reads(check, tp, r.offset, r.value)
                    ):
                        continue
                    if r.value is None:
                        table.rows.pop(r.key, None)
                        table.owner.pop(r.key, None)
                    else:
                        table.rows[r.key] = r.value
                        table.owner[r.key] = tp.partition
                        if table.restored is not None:
                            table.restored.append((r.timestamp * 1000, r.key))
        return read

    def _reads(self, check: RowCheck, tp: TopicPartition, offset: int, value: bytes) -> bool:
        try:
            check(value)
        except (msgspec.MsgspecError, ValueError, TypeError) as exc:
            self.skipped += 1
            log.warning(
                "%s[%d]@%d is not a row of its Table, skipped: %s", tp.topic, tp.partition, offset, exc
            )
            return False
        return True

    def forget(self, partitions: set[int]) -> None:
        """Drop the rows of partitions this decider no longer holds (another one restores them)."""
        for table in self.tables.values():
            for key in [k for k, p in table.owner.items() if p in partitions]:
                table.rows.pop(key, None)
                table.owner.pop(key, None)
