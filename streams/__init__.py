"""The stream-processing shell: the decision agent, the governance follower, the data-plane worker.

Topics, Kafka clients and dead letters are ``nexuscore.transport``'s, one layer down.
"""

from nexuscore.streams._circuits import CircuitBoard
from nexuscore.streams._decider import build_decider
from nexuscore.streams._governance import (
    POLICY_KEY,
    GovernanceFollower,
    PolicyHolder,
    bootstrap_event,
    publish_governance,
)
from nexuscore.streams._handlers import Decider, DeciderTables, Sink
from nexuscore.streams._loop import DeciderLoop
from nexuscore.streams._retention import ANSWER_WINDOW, DEDUPE_WINDOW, Retention
from nexuscore.streams._worker import Caller, RetryPolicy, Worker, default_adapters, targets_of, worker_id

__all__ = [
    "ANSWER_WINDOW",
    "DEDUPE_WINDOW",
    "POLICY_KEY",
    "Caller",
    "CircuitBoard",
    "Decider",
    "DeciderLoop",
    "DeciderTables",
    "GovernanceFollower",
    "PolicyHolder",
    "Retention",
    "RetryPolicy",
    "Sink",
    "Worker",
    "bootstrap_event",
    "build_decider",
    "default_adapters",
    "publish_governance",
    "targets_of",
    "worker_id",
]
