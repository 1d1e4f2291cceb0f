"""The stream-processing shell: topics, the decision agent, the data-plane worker."""

from nexuscore.streams._circuits import CircuitBoard
from nexuscore.streams._deadletter import dead_letter
from nexuscore.streams._decider import Sink, build_decider
from nexuscore.streams._governance import (
    POLICY_KEY,
    GovernanceFollower,
    PolicyHolder,
    appended_at,
    bootstrap_event,
    publish_governance,
)
from nexuscore.streams._inputs import decode_tenant_event
from nexuscore.streams._kafka import new_consumer, new_producer, start_client
from nexuscore.streams._topics import DEFAULT_PARTITIONS, Topics, ensure_topics, partition_counts
from nexuscore.streams._worker import Caller, RetryPolicy, Worker, default_adapters

__all__ = [
    "DEFAULT_PARTITIONS",
    "POLICY_KEY",
    "Caller",
    "CircuitBoard",
    "GovernanceFollower",
    "PolicyHolder",
    "RetryPolicy",
    "Sink",
    "Topics",
    "Worker",
    "appended_at",
    "bootstrap_event",
    "build_decider",
    "dead_letter",
    "decode_tenant_event",
    "default_adapters",
    "ensure_topics",
    "new_consumer",
    "new_producer",
    "partition_counts",
    "publish_governance",
    "start_client",
]
