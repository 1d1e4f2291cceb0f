"""A review desk that answers every escalation as soon as its decision is on the topic.

The throughput phase measures the pipeline, not how fast a person reads: ``ReviewDesk`` finds
escalations in the evidence, which the run can afford to query only once the rest has drained, so
every escalated request waited for that. This desk follows ``nexus.decisions`` in a thread of its
own and publishes the same signed reviews (``ReviewDesk.review``) the moment an escalation appears:
a reviewer who never keeps the pipeline waiting.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime

from nexuscore._demo import ReviewDesk
from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas import AvroCodec, RequestDecided
from nexuscore.transport import Topics, new_consumer, new_producer, start_client


class LiveDesk:
    """``with LiveDesk(bootstrap, topics, desk):`` reviews escalations until the block ends."""

    def __init__(self, bootstrap: str, topics: Topics, desk: ReviewDesk) -> None:
        self.bootstrap = bootstrap
        self.topics = topics
        self.desk = desk
        self.reviews = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._follow()), daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> LiveDesk:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._error is not None and exc[0] is None:
            raise self._error

    async def _follow(self) -> None:
        try:
            await self._review_all()
        except BaseException as exc:  # reported by __exit__, in the bench's thread
            self._error = exc

    async def _review_all(self) -> None:
        codec = AvroCodec()
        consumer = new_consumer(
            self.bootstrap, (self.topics.decisions,), self.topics.group("bench-live-desk")
        )
        producer = new_producer(self.bootstrap, linger_ms=0)
        await start_client(consumer, self.bootstrap)
        await start_client(producer, self.bootstrap)
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=100)
                now = datetime.now(UTC)
                for records in batches.values():
                    for record in records:
                        escalated = _escalation(codec, record.value)
                        if (
                            escalated is None
                            or (escalated.tenant_id, escalated.request_id) in self.desk.reviewed
                        ):
                            continue
                        review = self.desk.review(
                            escalated.tenant_id, escalated.request_id, escalated.event_id, now
                        )
                        await producer.send(
                            self.topics.reviews, codec.encode(review), key=review.tenant_id.encode()
                        )
                        self.reviews += 1
        finally:
            await producer.stop()
            await consumer.stop()


def _escalation(codec: AvroCodec, value: bytes | None) -> RequestDecided | None:
    """The escalated decision ``value`` holds, else None (other events on the topic, or bytes that
    are not ours: the desk reads what the decider wrote, but skips rather than dies)."""
    try:
        event = codec.decode(value)
    except DecodeError:
        return None
    if isinstance(event, RequestDecided) and event.verdict == "escalated":
        return event
    return None
