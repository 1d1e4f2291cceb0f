"""What a pipeline run is asked for, the targets it is compared with, and how long it waits."""

from __future__ import annotations

from dataclasses import dataclass

# The targets the headline figures are compared with (issue "The live path at the speed of the
# machine"); the product's goals beyond them: 2,500 requests/s, p50 3 ms, p99 15 ms.
TARGET_RPS = 1000.0
TARGET_P50_MS = 10.0
TARGET_P99_MS = 50.0
TARGET_RSS_MB = 250.0
GOAL_RPS = 2500.0
GOAL_P50_MS = 3.0
GOAL_P99_MS = 15.0
PHASES = ("baseline", "throughput", "latency", "observed", "sustained", "gateway")

PIPELINE_STAGES = ("provider", "decider", "worker", "projector")
# Evidence is polled this often while a run drains; each poll reads only the footers of new files,
# so it costs little CPU, and the completion time itself comes from file mtimes, not the poll.
POLL_S = 0.25
# After a full DuckDB check that came up short, wait this long before the next one (it reads every
# file, which is the expensive part on a 2-core machine that also runs the pipeline).
FULL_CHECK_EVERY_S = 1.0
PROGRESS_EVERY_S = 5.0
# Waits. The pipeline's own rate is unknown (that is what is measured), so drain timeouts assume a
# pessimistic floor of 25 requests/s on a loaded machine.
JOIN_TIMEOUT_S = 60.0
WARMUP_TIMEOUT_S = 180.0
FLOOR_RPS = 25.0
# Latency requests late by more than this against their schedule are counted as pacing misses.
LATE_MS = 5.0


@dataclass(frozen=True)
class Params:
    requests: int
    rate: float
    duration: float
    warmup: int
    quick: bool
    profile: str  # the stage py-spy samples; empty: none
    keep_work: bool
    observed_rate: float = 200.0
    observed_s: float = 20.0
    sustained_rate: float = 800.0
    sustained_s: float = 60.0
    phases: tuple[str, ...] = PHASES
    workers: int = 1
