"""``nexuscore evidence verify`` end to end, this worktree against a baseline commit, on one store.

``python -m bench.verify_cli --root STORE --public-key PEM [--baseline REV] [--repeat 3] [--deep]
[--name NAME]``: runs the CLI as a child process ``--repeat`` times for each version, alternating
(baseline first), and records each run's wall time, CPU (user + system, DuckDB's threads included),
peak resident memory (the child's own, from ``wait4``), the events/s the command prints, and the
load average. The interpreter's start-up is in the wall and CPU figures, not in events/s (verify's
own clock). The baseline's code is laid out as in ``bench.evidence --projector-baseline``.

Results go to ``bench/results/<NAME>.{json,md}`` (default name ``verify-cli``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench._evidence.projector_offline import baseline_tree
from bench._harness import BenchError, git_commit, loadavg, run_main, table

DESCRIPTION = (__doc__ or "").split("\n\n")[0]
_RATE = re.compile(r"\(([\d,]+) events/s\)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.verify_cli", description=DESCRIPTION)
    parser.add_argument("--root", type=Path, required=True, help="The evidence store (only read).")
    parser.add_argument("--public-key", type=Path, required=True, help="Its signer's public key (PEM).")
    parser.add_argument("--baseline", metavar="REV", help="Also run the verify of commit REV.")
    parser.add_argument("--repeat", type=int, default=3, help="Runs per version (default 3).")
    parser.add_argument("--deep", action="store_true", help="Run verify --deep.")
    parser.add_argument("--name", default="verify-cli", help="Results file name (default verify-cli).")
    ns = parser.parse_args(argv)
    if ns.repeat < 1:
        parser.error("--repeat >= 1")
    return ns


def run_once(tree: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """One ``evidence verify`` in a child process importing ``tree``'s code (None: this worktree)."""
    path = [str(tree)] if tree else []
    argv = ["nexuscore", "evidence", "verify", "--evidence-dir", str(args.root)]
    argv += ["--public-key", str(args.public_key), *(["--deep"] if args.deep else [])]
    code = (
        f"import sys; sys.path[:0] = {path!r}; sys.argv = {argv!r}; "
        "from nexuscore.cli import main; sys.exit(main())"
    )
    load = os.getloadavg()[0]
    started = time.perf_counter()
    child = subprocess.Popen(  # noqa: S603
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert child.stdout is not None
    with child.stdout:
        out = child.stdout.read()
    # wait4, not wait: it reaps the child with its own resource usage (CPU, peak RSS).
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    rate = _RATE.search(out)
    if child.returncode != 0 or rate is None:
        raise BenchError(f"verify failed ({'baseline' if tree else 'this tree'}):\n{out[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "user_s": round(usage.ru_utime, 2),
        "system_s": round(usage.ru_stime, 2),
        "peak_rss_mb": round(usage.ru_maxrss / 1024),
        "events_per_s": int(rate.group(1).replace(",", "")),
        "ok": "OK: complete and unaltered" in out,
        "load_1min_before": round(load, 2),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "runs": runs,
        "median": {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0] if k != "ok"},
        "all_ok": all(r["ok"] for r in runs),
    }


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="nexuscore-bench-verify-"))
    try:
        tree = baseline_tree(args.baseline, work) if args.baseline else None
        versions: dict[str, list[dict[str, Any]]] = {"baseline": [], "this": []} if tree else {"this": []}
        for i in range(args.repeat):
            for version in versions:
                r = run_once(tree if version == "baseline" else None, args)
                versions[version].append(r)
                print(f"    run {i + 1} {version}: {r}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "benchmark": args.name,
        "timestamp_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join([".venv/bin/python -m bench.verify_cli", *argv]),
        "git_commit": git_commit(),
        "baseline_commit": args.baseline,
        "store": str(args.root),
        "files": sum(1 for _ in args.root.glob("region=*/*/*.parquet")),
        "mode": "deep" if args.deep else "default",
        "cpus": os.cpu_count(),
        "loadavg_end": loadavg(),
        **{version: _summary(runs) for version, runs in versions.items()},
    }


def render(results: dict[str, Any]) -> str:
    rows = []
    for version in ("baseline", "this"):
        if version not in results:
            continue
        for i, r in enumerate([*results[version]["runs"], results[version]["median"]]):
            label = "median" if i == len(results[version]["runs"]) else f"run {i + 1}"
            name = (
                f"{results['baseline_commit']} (baseline)" if version == "baseline" else results["git_commit"]
            )
            rows.append(
                (
                    name,
                    label,
                    f"{r['events_per_s']:,.0f}",
                    r["wall_s"],
                    r["cpu_s"],
                    r["system_s"],
                    f"{r['peak_rss_mb']:,.0f}",
                    r["load_1min_before"],
                )  # fmt: skip
            )
    header = ("code", "run", "events/s", "wall s", "CPU s", "of which system", "peak RSS MB", "load")
    return "\n".join(
        [
            f"# `evidence verify` ({results['mode']}) end to end",
            "",
            f"`{results['command']}` ({results['timestamp_utc']}; store {results['store']}, "
            f"{results['files']} Parquet files; {results['cpus']} cores shared with other work, load "
            f"at the end {results['loadavg_end']}). Wall and CPU include the interpreter's start-up; "
            "events/s is verify's own figure.",
            "",
            *table(header, rows),
            "",
        ]
    )


def summary(results: dict[str, Any]) -> None:
    for version in ("baseline", "this"):
        if version in results:
            print(f"{version}: median {results[version]['median']}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    return run_main(args.name, lambda: run(args, argv), render, summary)


if __name__ == "__main__":
    sys.exit(main())
