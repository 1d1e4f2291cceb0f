"""What checking the sealed sha256 of the files a request's rows may be in costs ``prove`` (it
hashes each as it copies it into a private folder, and builds the proof from the copies).

``python -m bench._evidence.prove_check [--requests N]``: a recorded history projected into a
store (flush files), then compacted (with its request index). For each, the median of five
``prove`` calls of one rejected request, and the check alone: how many files and bytes it hashed.
No broker. Figures printed and written to ``bench/results/prove_check.md``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from nexuscore.projections import _prove, committed_files, compact, prove
from nexuscore.projections._manifest import sealed_copies
from tests.factories import POLICY, T0, project, run_history, signing_key

RESULTS = Path(__file__).resolve().parents[1] / "results" / "prove_check.md"


def measure(root: Path, request_id: str) -> str:
    """One line: prove's median time, and the check's time, files and bytes."""
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        prove(root, request_id)
        times.append(time.perf_counter() - t0)
    files = committed_files(root)
    with tempfile.TemporaryDirectory() as private:
        t0 = time.perf_counter()
        hashed = _prove._may_hold(root, files, request_id, None, Path(private))
        sealed_copies(root, hashed, Path(private), purpose="prove from it", refusal=str)
        check = time.perf_counter() - t0
    mb = sum((root / e["path"]).stat().st_size for e in hashed) / 1e6
    total = sum((root / e["path"]).stat().st_size for e in files) / 1e6
    return (
        f"prove median {statistics.median(times) * 1000:.0f} ms; the check {check * 1000:.0f} ms, "
        f"{len(hashed)} of {len(files)} files hashed and copied ({mb:.1f} of {total:.1f} MB)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=30_000, help="requests of the history (default 30000)")
    n = ap.parse_args().requests
    events = run_history(POLICY, n, seed=3)
    rejected = next(e.request_id for e in events if type(e).__name__ == "RequestRejected")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "evidence"
        project(root, events, flush_every=2000)
        flushed = measure(root, rejected)
        compact(root, signing_key(), T0)
        compacted = measure(root, rejected)
    lines = [
        f"# prove's seal check ({n:,} requests, {len(events):,} events)",
        "",
        f"- flush files: {flushed}",
        f"- compacted: {compacted}",
        "",
        "Command: `python -m bench._evidence.prove_check`",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
