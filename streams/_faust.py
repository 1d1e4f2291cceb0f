"""A faust App with an idempotent producer and a consumer that never skips an offset.

faust-streaming only turns idempotence on inside transactions; an at-least-once pipeline whose
outputs carry deterministic ids still wants the broker to drop a retried batch rather than write it
twice, so the producer settings are extended here rather than patched in the library.

The consumer: after a rebalance, faust resumes fetching before it seeks each partition back to its
committed offset, so records fetched from the old position can be delivered after the seek. faust
takes the jump for a gap (as if the offsets in between did not exist), marks it acknowledged,
drops the re-fetched records below it as already read, and commits past them: requests lost
(faust-streaming#606, #216). Our input topics have no gaps (no compaction, no transactions), so a
jump can only be such a stale record: this consumer drops it and fetches again from the offset it
expects. A gap that is really there shows up again at the same offset after that fetch, and is
accepted then.

And Table changes: faust sends them to the changelog with ``send_soon`` (buffered) and commits
the input offsets without waiting for them, so a process killed just after a commit can lose the
state changes of events it will never see again (an escalation awaiting review, a reservation).
This consumer drains the producer before every commit, and before publishing the outputs attached
to the offsets committed (the decider publishes on commit): a committed offset, or an output seen
by anyone, means the Table changes behind it are on the broker.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message

log = logging.getLogger(__name__)


class _IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class InOrderConsumer(faust_aiokafka.Consumer):
    """Delivers each acknowledged topic's records strictly in offset order from the committed one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The next offset each partition must deliver (None: whatever comes first; absent: the
        # partition has not been sought since it was assigned, so anything fetched is stale).
        self._next_offset: dict[TP, int | None] = {}
        # Where a jump was seen and the partition sought back: a real gap comes back to it.
        self._refetching: dict[TP, int] = {}
        self.stale_dropped = 0

    async def _handle_attached(self, commit_offsets: Mapping[TP, int]) -> None:
        # Before the outputs attached to these offsets go out, and before the offsets are
        # committed, the Table changes made so far must be on the broker.
        producer = self.app.producer
        while producer.buffer.size:  # its flush gives up after 0.1 s without progress: insist
            await producer.buffer.flush()
        await producer.flush()
        await super()._handle_attached(commit_offsets)

    async def perform_seek(self) -> None:
        await super().perform_seek()
        assigned = self.assignment()
        acked_topic = self.app.topics.acks_enabled_for
        # No committed offset: aiokafka leaves the position where fetching got to, past records
        # dropped here as fetched before this seek. Start those partitions from their beginning
        # (the auto_offset_reset=earliest the decider relies on), explicitly.
        fresh = [tp for tp in assigned if self._read_offset.get(tp) is None and acked_topic(tp.topic)]
        starts = await self.earliest_offsets(*fresh) if fresh else {}
        for tp in assigned:
            self._refetching.pop(tp, None)
            if tp in starts:
                await self.seek(tp, starts[tp])
            else:
                self._next_offset[tp] = self._read_offset.get(tp)

    async def seek(self, partition: TP, offset: int) -> None:
        await super().seek(partition, offset)
        self._next_offset[partition] = offset

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        self._forget(revoked)
        await super().on_partitions_revoked(revoked)

    def _forget(self, tps: Iterable[TP]) -> None:
        for tp in tps:
            self._next_offset.pop(tp, None)
            self._refetching.pop(tp, None)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        acked_topic = self.app.topics.acks_enabled_for
        async for tp, message in super().getmany(timeout):
            if acked_topic(message.topic) and not await self._in_sequence(tp, message.offset):
                self.stale_dropped += 1
                continue
            yield tp, message

    async def _in_sequence(self, tp: TP, offset: int) -> bool:
        if tp not in self._next_offset:
            return False  # fetched before the partition was sought to its committed offset
        expected = self._next_offset[tp]
        came_back = self._refetching.get(tp) == offset
        if expected is None or offset == expected or came_back:
            if came_back and expected is not None and offset != expected:
                log.warning("%s has no offsets %d..%d: a real gap, accepted", tp, expected, offset - 1)
            self._refetching.pop(tp, None)
            self._next_offset[tp] = offset + 1
            return True
        if offset < expected:
            return False  # delivered already
        if tp not in self._refetching:
            self._refetching[tp] = offset
            log.warning(
                "%s delivered offset %d where %d was due: stale, fetching again", tp, offset, expected
            )
            await self.seek(tp, expected)
        return False


class _Transport(faust_aiokafka.Transport):
    Producer = _IdempotentProducer
    Consumer = InOrderConsumer


class IdempotentApp(faust.App):
    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return _Transport(self.conf.broker_producer, self)
