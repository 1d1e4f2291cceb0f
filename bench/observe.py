"""What metrics and tracing cost the decider, per request: the same burst through
``nexuscore run decider`` with metrics off, with ``--metrics-port`` on, and with OpenTelemetry
spans exported as well (OTEL_TRACES_EXPORTER=console, into the decider's log: an upper bound).

Each candidate runs alone on the same broker (``bench.decider``'s throughput and latency phases);
the figure that matters is the decider's CPU per request (its own /proc counters), reported beside
the ratio to the baseline measured in the same run (the machine is shared: absolute figures move).

``python -m bench.observe [--requests N] [--rounds R]``; results in bench/results/observe.{json,md}.
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import decider as decider_bench
from bench._harness import broker, git_commit, run_main, table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CANDIDATES: dict[str, tuple[list[str], dict[str, str]]] = {
    "off": (["--runtime", "loop"], {}),
    "metrics": (["--runtime", "loop", "--metrics-port", "{port}"], {}),
    "metrics-tracing": (
        ["--runtime", "loop", "--metrics-port", "{port}"],
        {"OTEL_TRACES_EXPORTER": "console"},
    ),
}


def _measure(bootstrap: str, name: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    flags, env = CANDIDATES[name]
    decider_bench.RUNTIMES[name] = [f.format(port=_free_port()) for f in flags]
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return decider_bench._measure(bootstrap, name, args, root)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run(args: argparse.Namespace) -> dict[str, Any]:
    root = Path("/tmp") / f"nexuscore-bench-observe-{uuid.uuid4().hex[:6]}"
    runs: list[dict[str, Any]] = []
    with broker("bench-observe-") as (bootstrap, _):
        for round_ in range(args.rounds):
            for name in CANDIDATES:
                print(f"--- round {round_ + 1}: {name}", flush=True)
                runs.append({**_measure(bootstrap, name, args, root), "round": round_ + 1})
                print(runs[-1], flush=True)
    return {"commit": git_commit(), "date": f"{datetime.now(UTC):%Y-%m-%d}", "args": vars(args), "runs": runs}


def render(results: dict[str, Any]) -> str:
    a, runs = results["args"], results["runs"]
    rows = []
    for r in runs:
        base = next(b for b in runs if b["round"] == r["round"] and b["runtime"] == "off")
        ratio = r["decider_cpu_ms_per_request"] / base["decider_cpu_ms_per_request"]
        rows.append(
            [str(r["round"]), r["runtime"], f"{r['decider_cpu_ms_per_request']:.3f}", f"{ratio:.3f}",
             f"{r['decisions_per_s']:,.0f}", f"{r['added_latency_p50_ms']:.1f}", f"{r['added_latency_p99_ms']:.1f}"]
        )  # fmt: skip
    return "\n".join(
        [
            "# What metrics and tracing cost the decider",
            "",
            f"`python -m bench.observe --requests {a['requests']} --rounds {a['rounds']} --rate {a['rate']:g} "
            f"--duration {a['duration']:g}` (commit `{results['commit']}`, {results['date']}): the decider alone "
            "(loop runtime), no worker, one broker; ratio = CPU per request / the same round's `off`.",
            "",
            *table(
                ["round", "decider", "CPU ms/request", "ratio to off", "decisions/s (burst)",
                 f"added p50 ms @ {a['rate']:g}/s", f"added p99 ms @ {a['rate']:g}/s"],
                rows,
            ),
        ]
    ) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=5_000, help="requests in each burst")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of the three candidates")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s offered in the latency phase")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the latency phase")
    args = parser.parse_args(argv)
    return run_main("observe", lambda: run(args), render, lambda r: print(render(r)))


if __name__ == "__main__":
    raise SystemExit(main())
