"""Child processes of the demo and the benchmarks: started with their logs in files, stopped with
SIGTERM and a grace period, then SIGKILL (a faust worker whose agent crashed can hang in shutdown)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from nexuscore.kernel.errors import NexusError


class Service:
    def __init__(
        self, name: str, args: list[str], log_dir: Path, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(  # noqa: S603  # our own interpreter and module
            [sys.executable, "-m", "nexuscore", *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )

    def check(self) -> None:
        """Raise if the process died: a pipeline missing a stage would wait forever."""
        code = self.proc.poll()
        if code is not None:
            tail = self.log_tail()
            raise NexusError(f"the {self.name} process exited with code {code}; last log lines: {tail}")

    def log_tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def wait_for_line(self, prefix: str, timeout_s: float) -> str:
        """Wait until the log has a line starting with ``prefix``; return the rest of that line."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith(prefix):
                    return line[len(prefix) :].strip()
            self.check()
            time.sleep(0.05)
        raise NexusError(f"the {self.name} process did not report '{prefix}' within {timeout_s:.0f} s")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()

    def peak_rss_mb(self) -> float | None:
        """Peak resident memory (VmHWM) while the process lives."""
        return peak_rss_mb(self.proc.pid)


def peak_rss_mb(pid: int) -> float | None:
    """Peak resident memory (VmHWM) of a live process, in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Services:
    """Starts named services and stops them all, in reverse order, on exit."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Service] = []

    def start(self, name: str, *args: str, env: Mapping[str, str] | None = None) -> Service:
        """Start ``python -m nexuscore *args``; ``env``: variables added to this process's."""
        service = Service(name, list(args), self.log_dir, env)
        self.started.append(service)
        return service

    def check(self) -> None:
        for s in self.started:
            s.check()

    def __enter__(self) -> Services:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        for s in reversed(self.started):
            s.stop()
