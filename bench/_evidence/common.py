"""What the phases of the evidence benchmark share: its parameters, targets, key and timed functions."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

DEFAULT_ROOT = Path("/tmp/nexus-bench-evidence")


def meta_path(root: Path) -> Path:
    """The benchmark's notes on a store, beside it and never inside: a file in the evidence folder
    that no manifest entry names is a ``verify`` finding (``foreign_file``)."""
    return root.parent / f"{root.name}.bench-meta.json"


# The targets of the issue.
TARGET_PROJECTOR_EPS = 50_000.0
TARGET_WHO_S = 1.0
TARGET_LINEAGE_S = 0.1
TARGET_VERIFY_EPS = 1_000_000.0
TARGET_DEEP_EPS = 300_000.0  # verify --deep
TARGET_RESIDENCY_S = 5.0  # evidence residency on the big store
TARGET_RESIDENCY_SMALL_S = 1.0  # evidence residency on a 46,000-event store
TARGET_RSS_MB = 250.0  # the pipeline's per-process target (README), for the projector


@dataclass(frozen=True)
class Params:
    decisions: int
    chunk: int
    root: Path
    reuse: bool
    kafka_events: int
    flush_rows: int
    flush_interval_s: float
    skip_kafka: bool
    skip_store: bool
    repeat: int
    seed: int
    days: int
    profile: bool
    small_requests: int = 10_500
    projector_baseline: str | None = None  # a commit whose projector runs on the same log first


def signing_key() -> Ed25519PrivateKey:
    """A fixed key: ``--reuse`` must verify a store written by an earlier run."""
    return Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"nexuscore bench evidence").digest())


def partition_of(key: str) -> tuple[str, int]:
    """(topic, partition) of a ``"topic|partition"`` key: end offsets travel to child processes so."""
    topic, _, partition = key.partition("|")
    return topic, int(partition)


def sealing_targets() -> dict[str, tuple[Any, str]]:
    """The production sealing steps, for ``bench._harness.CallTimer``."""
    from nexuscore import ledger
    from nexuscore.projections import _manifest, _seal, _writer

    return {
        "leaf_hashes (DuckDB json_array + sha256, to Python)": (_seal, "leaf_hashes"),
        "merkle root (Python)": (ledger, "root"),
        "write_table (Parquet zstd + bloom + fsync)": (_writer, "write_table"),
        "manifest commit + sign": (_manifest.Manifest, "commit"),
    }
