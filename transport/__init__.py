"""The wire between the stages: topic names and their creation, Kafka clients configured the one way
NexusCore uses them (and logged in as the process says, ``_login``), the one check every reader of a tenant-keyed topic applies, dead letters, and
broker time. Below the stages (streams, projections, replay), above the core; no stream runtime."""

from nexuscore.transport._deadletter import MAX_RAW_KEY, MAX_RAW_VALUE, dead_letter
from nexuscore.transport._inputs import appended_at, decode_tenant_event, decode_tenant_record
from nexuscore.transport._kafka import login_options, new_consumer, new_producer, start_client
from nexuscore.transport._login import KafkaLogin, login_from_env, process_login
from nexuscore.transport._topics import (
    DECIDER_TABLES,
    DEFAULT_PARTITIONS,
    DeciderTable,
    Topics,
    check_instance_id,
    check_namespace,
    ensure_topics,
    partition_counts,
    wanted_configs,
)

__all__ = [
    "DECIDER_TABLES",
    "DEFAULT_PARTITIONS",
    "MAX_RAW_KEY",
    "MAX_RAW_VALUE",
    "DeciderTable",
    "KafkaLogin",
    "Topics",
    "appended_at",
    "check_instance_id",
    "check_namespace",
    "dead_letter",
    "decode_tenant_event",
    "decode_tenant_record",
    "ensure_topics",
    "login_from_env",
    "login_options",
    "new_consumer",
    "new_producer",
    "partition_counts",
    "process_login",
    "wanted_configs",
    "start_client",
]
