"""py-spy on one process while it is measured, and what its samples say.

``Profiler(pid, out)`` records until ``stop()``; ``Profiler.summary(keep_as)`` turns the raw stacks
into the top functions by own time and own time per package, and keeps the raw file as
``bench/results/<keep_as>``; ``profile_lines`` renders that summary for a report.

Needs ``py-spy`` in the virtualenv (the ``bench`` extra); without it ``error`` says so and the
benchmark carries on without a profile.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from bench._harness import RESULTS_DIR, table
from nexuscore._broker import REPO_ROOT

PROFILE_RATE_HZ = 100
PROFILER_STOP_TIMEOUT_S = 30.0
TOP_FUNCTIONS = 15


class Profiler:
    """py-spy recording one process until ``stop()``; ``error`` says why there is no profile."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.error: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = out.with_suffix(".log")
        out.parent.mkdir(parents=True, exist_ok=True)
        venv_spy = Path(sys.executable).parent / "py-spy"
        exe = str(venv_spy) if venv_spy.exists() else shutil.which("py-spy")
        if exe is None:
            self.error = "py-spy is not installed (pip install py-spy into the virtualenv)"
            return
        command = [exe, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE_HZ)]
        # Sampling without pausing the process: the profile must not slow what is timed.
        command.append("--nonblocking")
        # One entry per function (its first line), so own time is summed per function.
        command += ["--function", "--full-filenames", "--format", "raw", "--output", str(out)]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Own session: a Ctrl-C in the terminal must not end it before stop() asks it to write.
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        if proc.poll() is None:
            # py-spy writes its output when interrupted.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(PROFILER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                self.error = f"py-spy did not stop within {PROFILER_STOP_TIMEOUT_S:.0f} s"
                return
        if not self.out.is_file():
            tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])
            self.error = f"py-spy wrote no profile (exit {proc.returncode}): {tail}"

    def summary(self, keep_as: str) -> dict[str, Any]:
        """After ``stop()``: ``summarise_profile`` of the recording, the raw stacks kept as
        ``bench/results/<keep_as>``; or ``{"skipped": why}``."""
        if self.error is not None:
            return {"skipped": self.error}
        profile = summarise_profile(self.out)
        kept = RESULTS_DIR / keep_as
        if self.out.resolve() != kept.resolve():
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.out, kept)
        profile["raw"] = f"bench/results/{keep_as}"
        return profile


def _classify(path: str) -> tuple[str, str]:
    """(package, short path) of a source file in a py-spy frame."""
    if path.startswith("<"):
        return "builtin", path
    p = Path(path)
    for key in ("purelib", "platlib"):
        base = Path(sysconfig.get_paths()[key])
        if p.is_relative_to(base):
            rel = p.relative_to(base)
            return rel.parts[0].removesuffix(".py"), str(rel)
    if p.is_relative_to(REPO_ROOT):
        rel = p.relative_to(REPO_ROOT)
        return f"nexuscore.{rel.parts[0]}" if rel.parts[0] != "nexuscore" else "nexuscore", str(rel)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if p.is_relative_to(stdlib):
        rel = p.relative_to(stdlib)
        return f"stdlib {rel.parts[0].removesuffix('.py')}", str(rel)
    return "other", path


def _frame(raw: str) -> tuple[str, str, str]:
    """'func (/path/file.py:12)' -> (display name, package, short location)."""
    name, _, rest = raw.partition(" (")
    location = rest.removesuffix(")")
    path, _, line = location.rpartition(":")
    package, short = _classify(path or location)
    where = f"{short}:{line}" if line else short
    return name, package, where


def _count_samples(raw: Path) -> tuple[Counter[str], Counter[str], int]:
    """(own samples per frame, inclusive samples per frame, all samples) of py-spy's raw output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    return own, inclusive, total


def summarise_profile(raw: Path, top: int = TOP_FUNCTIONS) -> dict[str, Any]:
    """Top functions by own (self) samples, with their inclusive share, and own time per package."""
    own, inclusive, total = _count_samples(raw)
    by_package: Counter[str] = Counter()
    for f, n in own.items():
        by_package[_frame(f)[1]] += n
    functions = []
    for f, n in own.most_common(top):
        name, package, where = _frame(f)
        functions.append(
            {
                "function": name,
                "where": where,
                "package": package,
                "own_samples": n,
                "own_pct": round(100 * n / total, 1),
                "inclusive_pct": round(100 * inclusive[f] / total, 1),
            }
        )
    return {
        "samples": total,
        "rate_hz": PROFILE_RATE_HZ,
        # Samples of a thread py-spy saw running or runnable: on an oversubscribed machine this
        # includes time spent waiting for a core, so it can exceed the process's CPU seconds.
        "active_s": round(total / PROFILE_RATE_HZ, 1),
        "top_own": functions,
        "own_by_package": [
            {"package": p, "own_pct": round(100 * n / total, 1)} for p, n in by_package.most_common(12)
        ],
    }


def profile_lines(profile: dict[str, Any], title: str) -> list[str]:
    """Markdown: ``title``, the top functions by own time, own time by package."""
    return [
        title,
        "",
        *table(
            ("#", "Function", "Where", "Own %", "Incl. %"),
            (
                (i, f"`{f['function']}`", f["where"], f["own_pct"], f["inclusive_pct"])
                for i, f in enumerate(profile["top_own"], 1)
            ),
        ),
        "",
        "Own time by package: "
        + ", ".join(f"{x['package']} {x['own_pct']}%" for x in profile["own_by_package"]),
        "",
    ]
