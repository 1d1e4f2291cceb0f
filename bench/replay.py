"""The replay benchmark: recorded decisions re-decided per second, per core.

``python -m bench.replay [--requests N]`` records a history of N synthetic requests (the core's own
steps, outcomes out of order, a budget tight enough to deny), projects it into a sealed evidence
store with the projector's code path, then times on one core:

1. **replay, counterfactual** (``replay(store, candidate)``, the candidate a cheaper policy),
2. **replay, verify** (``replay(store, None, recorded_policies=...)``: every decision must match),
3. **baseline**: the simplest correct loop, ``decide(request, policy, state, now)`` over the same
   requests in memory, with no reading, ordering, budget folding or comparison: the core's own cost.

Results: ``bench/results/replay.{json,md}``. Target (issue 4): >= 200,000 decisions/s per core; a
1,000,000-request replay in < 10 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._harness import git_commit, own_cpu_s, run_main, table
from nexuscore.core import EMPTY_STATE, decide
from nexuscore.projections import EvidenceStore
from nexuscore.replay import replay
from nexuscore.schemas import InferenceRequested
from tests.factories import POLICY, project, run_history, with_budgets

TARGET_PER_CORE = 200_000


def _timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), own_cpu_s()
    out = fn()
    return out, time.perf_counter() - wall, own_cpu_s() - cpu


def run(requests: int) -> dict[str, Any]:
    policy = with_budgets(POLICY, "2", "1")
    candidate = type(policy).model_validate({**policy.model_dump(mode="json"), "version": "candidate"})
    t0 = time.perf_counter()
    history = run_history(policy, requests, seed=42)
    generate_s = time.perf_counter() - t0
    root = Path(tempfile.mkdtemp(prefix="nexuscore-bench-replay-")) / "evidence"
    t0 = time.perf_counter()
    project(root, history, flush_every=200_000)
    project_s = time.perf_counter() - t0
    reqs = [e for e in history if isinstance(e, InferenceRequested)]

    figures: dict[str, Any] = {}
    with EvidenceStore(root) as store:
        report, wall, cpu = _timed(lambda: replay(store, candidate))
        figures["counterfactual"] = {"wall_s": wall, "cpu_s": cpu, "changed": report.changed}
        report, wall, cpu = _timed(lambda: replay(store, None, recorded_policies={policy.digest: policy}))
        assert report.changed == report.context_differences == 0, report.changes[:2]
        figures["verify"] = {"wall_s": wall, "cpu_s": cpu, "changed": report.changed}
    now = datetime(2026, 11, 25, tzinfo=UTC)
    _, wall, cpu = _timed(lambda: [decide(r, policy, EMPTY_STATE, now) for r in reqs])
    figures["baseline_decide_loop"] = {"wall_s": wall, "cpu_s": cpu}
    for f in figures.values():
        f["decisions_per_s_per_core"] = round(requests / f["cpu_s"])
        f["extrapolated_1m_s"] = round(1_000_000 / f["decisions_per_s_per_core"], 1)
    return {
        "benchmark": "replay",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version()},
        "requests": requests,
        "events": len(history),
        "generate_s": round(generate_s, 1),
        "project_s": round(project_s, 1),
        "figures": figures,
        "target_decisions_per_s_per_core": TARGET_PER_CORE,
    }


def render(r: dict[str, Any]) -> str:
    rows = [
        (
            name,
            f"{f['decisions_per_s_per_core']:,}",
            f"{f['cpu_s']:.1f}",
            f"{f['wall_s']:.1f}",
            f["extrapolated_1m_s"],
        )
        for name, f in r["figures"].items()
    ]
    base = r["figures"]["baseline_decide_loop"]["decisions_per_s_per_core"]
    verify = r["figures"]["verify"]["decisions_per_s_per_core"]
    return "\n".join(
        [
            "# Replay benchmark",
            "",
            f"`python -m bench.replay --requests {r['requests']}` at {r['date']}, commit `{r['commit']}`, "
            f"{r['machine']['cores']} cores, Python {r['machine']['python']}. History: {r['requests']:,} requests, "
            f"{r['events']:,} events (generated in {r['generate_s']} s, projected in {r['project_s']} s).",
            "",
            *table(
                ("run", "decisions/s per core", "CPU s", "wall s", "1,000,000 requests would take (s)"), rows
            ),
            "",
            f"Target: >= {r['target_decisions_per_s_per_core']:,} decisions/s per core, 1M in < 10 s. "
            f"Verify-mode replay runs at {verify / base:.2f} x the bare decide() loop (the baseline).",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="Recorded requests to replay.")
    args = parser.parse_args(argv)
    return run_main("replay", lambda: run(args.requests), render, lambda r: print(render(r)))


if __name__ == "__main__":
    sys.exit(main())
