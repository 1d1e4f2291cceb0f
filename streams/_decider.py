"""The decision agent on faust: the runtime adapter around ``nexuscore.streams._handlers.Decider``.

One agent consumes ``nexus.requests``, ``nexus.outcomes`` and ``nexus.reviews``. All three are keyed
by tenant with the same partition count, so a tenant's events reach the same agent instance in log
order and its budget Table entry is never raced. This module only wires the runtime: the app, its
Tables, the agent that hands each message to the handlers, the deadline timer, and the governance
follower task.
"""

from __future__ import annotations

import socket
import tempfile
from pathlib import Path
from typing import Any

import faust

from nexuscore.kernel.clock import Clock
from nexuscore.observe import Headers
from nexuscore.policy import TrustStore
from nexuscore.streams._faust import IdempotentApp
from nexuscore.streams._governance import GovernanceFollower, PolicyHolder
from nexuscore.streams._handlers import Decider, DeciderTables, Sink
from nexuscore.transport import DEFAULT_PARTITIONS, DeciderTable, Topics

# How often each decider looks for escalations whose review deadline has passed.
DEADLINE_SCAN_S = 1.0
# Bytes in, bytes out: decoding is ours (Avro), and faust's model layer would only add cost.
_RAW: dict[str, Any] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _app(bootstrap: str, topics: Topics, partitions: int, web_port: int, store: str) -> faust.App:
    return IdempotentApp(
        topics.group("nexuscore-decider"),
        broker=f"kafka://{bootstrap}",
        store=store,
        topic_partitions=partitions,
        web_enabled=False,
        # faust listens on its web port even with the web server disabled: never share 6066.
        web_port=web_port or _free_port(),
        producer_acks=-1,
        # Decisions are small and latency matters: send at once rather than wait to fill a batch.
        producer_linger=0.0,
        broker_commit_every=1000,
        # A decider that died without leaving its group holds its partitions until the session
        # times out: keep that short so a replacement takes over in seconds, not a minute.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=2.0,
        broker_commit_interval=0.25,
        # Outputs wait for their input's commit (which first puts the Table changes on the broker):
        # nothing goes out that a restart would decide differently.
        stream_publish_on_commit=True,
        stream_wait_empty=False,
        key_serializer="raw",
        value_serializer="raw",
        # faust keeps a data folder even with the memory store; keep it out of the working directory.
        datadir=str(Path(tempfile.gettempdir()) / "nexuscore-faust"),
    )


class _TopicSink:
    """The agent's outputs onto the Kafka topics, through faust (published on commit)."""

    def __init__(self, app: faust.App, topics: Topics) -> None:
        names = (topics.decisions, topics.dispatch, topics.deadletter, topics.outcomes, topics.reviews)
        self.topics = {name: app.topic(name, **_RAW) for name in names}

    async def send(self, topic: str, key: bytes, value: bytes, headers: Headers | None = None) -> None:
        await self.topics[topic].send(key=key, value=value, headers=headers)


def build_decider(
    bootstrap: str,
    holder: PolicyHolder,
    clock: Clock,
    *,
    follower: GovernanceFollower | None = None,
    topics: Topics = Topics(),
    partitions: int = DEFAULT_PARTITIONS,
    web_port: int = 0,
    store: str = "memory://",
    sink: Sink | None = None,
    trust: TrustStore | None = None,
) -> tuple[faust.App, Any]:
    """Build the faust app and its decision agent (returned for ``agent.test_context()``).

    ``holder`` says which policy decides each tenant (active, or a canary) and which is in shadow;
    ``follower`` keeps it current from the governance topic. ``sink`` replaces the topics the agent
    writes to; component tests pass a recording fake. ``trust`` holds the reviewers' keys (by
    default the follower's trust store): a review is applied only if ``judge_review`` accepts it.
    """
    reviewers = trust if trust is not None else (follower.trust if follower is not None else TrustStore())
    app = _app(bootstrap, topics, partitions, web_port, store)

    def table(name: DeciderTable) -> Any:
        return app.Table(name.value, partitions=partitions, key_type=bytes, value_type=bytes)

    tables = DeciderTables(**{t.value: table(t) for t in DeciderTable})
    decider = Decider(
        tables, holder, clock, sink or _TopicSink(app, topics), topics=topics, reviewers=reviewers
    )

    @app.timer(interval=DEADLINE_SCAN_S)  # type: ignore[untyped-decorator]  # faust ships no type information
    async def end_overdue_reviews() -> None:
        await decider.overdue_reviews()

    if follower is not None:

        @app.task  # type: ignore[untyped-decorator]  # faust ships no type information
        async def follow_governance() -> None:
            await follower.follow()

    @app.agent(app.topic(topics.requests, topics.outcomes, topics.reviews, **_RAW))
    async def decide(stream: Any) -> None:
        async for event in stream.events():
            m = event.message
            stamp = int(m.timestamp * 1000) if m.timestamp is not None else None
            await decider.process(m.topic, m.partition, m.offset, m.key, m.value, stamp)

    return app, decide
