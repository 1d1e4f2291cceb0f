"""What every benchmark shares: the broker, child processes, CPU and memory, results, tables, the CLI.

Sections, in order:

* **results**: ``RESULTS_DIR``, ``write_results``, the commit and Kafka version they quote;
* **the command line**: ``run_main`` (SIGTERM and Ctrl-C stop everything, ``NexusError`` -> exit 2);
* **tables**: markdown tables and the ``n/a`` / ``**no**`` cells the reports use;
* **CPU and memory**: ``/proc`` and ``getrusage`` readings, ``CpuMeter`` over named processes;
* **timing production code**: ``CallTimer`` wraps chosen functions in place for a while;
* **child processes**: ``Child`` / ``run_child`` run a function in a spawned process (so its peak
  RSS and CPU are its own) and get its answer back over a pipe;
* **the broker**: ``broker()`` starts one (or finds ``$NEXUSCORE_BOOTSTRAP``), finds its JVM's pid and
  removes the run's topics from a shared broker afterwards; admin helpers.

The py-spy profiler is in ``bench._profile``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from nexuscore._broker import REPO_ROOT, kafka_broker, kafka_libs_dir
from nexuscore.kernel.errors import NexusError

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# How long an admin client may take to connect.
ADMIN_TIMEOUT_S = 60.0

_CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(NexusError):
    """A benchmark step failed or timed out; the message says which and where the logs are."""


# --- results -----------------------------------------------------------------------------------------


def write_results(name: str, results: dict[str, Any], markdown: str) -> None:
    """``bench/results/<name>.json`` and ``bench/results/<name>.md`` (overwritten)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{name}.json").write_text(
        json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8"
    )
    (RESULTS_DIR / f"{name}.md").write_text(markdown, encoding="utf-8")


def previous_results(name: str) -> dict[str, Any]:
    """The last ``bench/results/<name>.json``, or {} if there is none (or it is unreadable)."""
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((RESULTS_DIR / f"{name}.json").read_text()))
    return {}


def git_commit() -> str:
    """The short commit of the checkout, ``-dirty`` if tracked files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # Others edit the tree while benchmarks run: say when the figures are not of HEAD exactly.
    return f"{head}-dirty" if dirty else head


def kafka_version() -> str:
    """The version of the local Kafka jars (what a local broker runs)."""
    jars = sorted(kafka_libs_dir().glob("kafka_2.13-*.jar"))
    return jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


# --- the command line --------------------------------------------------------------------------------


def _sigterm(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so every `with` block stops what it started.
    raise KeyboardInterrupt


def run_main(
    name: str,
    run: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    summary: Callable[[dict[str, Any]], None],
) -> int:
    """Run a benchmark, write ``bench/results/<name>.{json,md}``, print its summary; the exit code."""
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        results = run()
    except KeyboardInterrupt:
        print("interrupted; everything the benchmark started has been stopped", file=sys.stderr)
        return 130
    except NexusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(name, results, render(results))
    summary(results)
    print(f"\nwrote {RESULTS_DIR / f'{name}.json'} and {RESULTS_DIR / f'{name}.md'}")
    return 0


# --- tables ------------------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A markdown table, one line per element."""
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
    ]


def fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


# --- CPU and memory ----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a live process (all its threads); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def runqueue_wait_s(pid: int) -> float | None:
    """Seconds the threads of a live process spent runnable but waiting for a CPU (Linux schedstat:
    the second field of each thread's ``/proc/<pid>/task/<tid>/schedstat``); None if unreadable.

    The figure that says whether a slow stage is busy or starved: CPU time counts only the first.
    Threads that ended before the read are not counted.
    """
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    waited = 0
    for task in tasks:
        try:
            waited += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the thread ended (or the kernel keeps no schedstat)
    return waited / 1e9


def own_cpu_s() -> float:
    """CPU seconds of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def children_cpu_s() -> float:
    """CPU of reaped child processes (a process pool's workers, once it has shut down)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def own_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across exec, so a spawned
    child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CpuMeter:
    """CPU seconds used by a set of named processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self.before: dict[str, float | None] = {}
        self.after: dict[str, float | None] = {}
        self.waited_before: dict[str, float | None] = {}
        self.waited_after: dict[str, float | None] = {}
        self.t0 = self.t1 = 0.0

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.waited_before = {name: runqueue_wait_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> None:
        self.t1 = time.monotonic()
        self.after = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.waited_after = {name: runqueue_wait_s(pid) for name, pid in self.pids.items()}

    def result(self) -> dict[str, Any]:
        wall = self.t1 - self.t0
        per: dict[str, Any] = {}
        for name in self.pids:
            b, a = self.before.get(name), self.after.get(name)
            if b is None or a is None:
                per[name] = None
            else:
                wb, wa = self.waited_before.get(name), self.waited_after.get(name)
                per[name] = {
                    "cpu_s": round(a - b, 2),
                    "cpu_pct": round(100 * (a - b) / wall, 1) if wall else None,
                    # Runnable but not running (all threads): CPU starvation, in % of the wall time.
                    "waited_for_cpu_pct": round(100 * (wa - wb) / wall, 1)
                    if wall and wa is not None and wb is not None
                    else None,
                }
        total = sum(v["cpu_s"] for v in per.values() if v is not None)
        return {"wall_s": round(wall, 2), "processes": per, "total_cpu_s": round(total, 2)}


# --- timing production code ----------------------------------------------------------------------------


class CallTimer:
    """Wall time and call count of chosen module-level functions, patched in place for a while.

    Instruments the production code without editing it: each (module, name) is replaced by a wrapper
    and restored on exit. Calls from worker processes are not seen.
    """

    def __init__(self, targets: dict[str, tuple[Any, str]]) -> None:
        self.targets = targets
        self.seconds: dict[str, float] = dict.fromkeys(targets, 0.0)
        self.calls: dict[str, int] = dict.fromkeys(targets, 0)
        self._saved: list[tuple[Any, str, Any]] = []

    def _wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        return timed

    def __enter__(self) -> CallTimer:
        for label, (owner, name) in self.targets.items():
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._wrap(label, fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved = []

    def result(self) -> dict[str, dict[str, float]]:
        return {k: {"s": round(self.seconds[k], 3), "calls": self.calls[k]} for k in self.targets}


# --- child processes -----------------------------------------------------------------------------------

_PARENT: Connection | None = None  # in a child started by ``Child``: the pipe to its parent


def tell_parent(kind: str, payload: Any = None) -> None:
    """From inside a ``Child``: send an intermediate message (``Child.receive`` returns its payload)."""
    assert _PARENT is not None, "tell_parent() is for functions run by Child"
    _PARENT.send((kind, payload))


def _child_main(conn: Connection, fn: Callable[..., Any], *args: Any) -> None:
    global _PARENT
    _PARENT = conn
    try:
        conn.send(("done", fn(*args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


class Child:
    """``fn(*args)`` in a spawned process (a module-level function; its arguments are pickled).

    Its return value comes back as the last ``receive()``; ``tell_parent`` sends earlier ones (a
    "ready" signal, say). Not a daemon, so it may start processes of its own. On exit the child is
    given 30 s to end once it has answered, and is terminated otherwise.
    """

    def __init__(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        self.what = what
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_child_main, args=(child_end, fn, *args), name=f"bench-{what}")
        self.proc.start()
        child_end.close()
        self._answered = False

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def receive(self, timeout_s: float, step: str | None = None) -> Any:
        """The payload of the child's next message; raises BenchError on a failure, exit or timeout."""
        what = self.what if step is None else f"{self.what} ({step})"
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.5):
            if not self.proc.is_alive() and not self._conn.poll():
                raise BenchError(f"{what}: the child process exited with code {self.proc.exitcode}")
            if time.monotonic() > deadline:
                raise BenchError(f"{what}: no answer from the child process within {timeout_s:.0f} s")
        try:
            kind, payload = self._conn.recv()
        except EOFError:  # it closed the pipe without a word: it died
            self.proc.join(5)
            raise BenchError(f"{what}: the child process exited with code {self.proc.exitcode}") from None
        if kind == "error":
            raise BenchError(f"{what} failed in the child process:\n{payload}")
        self._answered = kind == "done"
        return payload

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.join(30 if self._answered else 0.1)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(10)
        self._conn.close()


def run_child(what: str, timeout_s: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a spawned child process; its return value."""
    with Child(what, fn, *args) as child:
        return child.receive(timeout_s)


# --- the broker ----------------------------------------------------------------------------------------


def external_broker() -> bool:
    """Whether the broker is given by ``$NEXUSCORE_BOOTSTRAP`` (shared: never started nor stopped)."""
    return bool(os.environ.get("NEXUSCORE_BOOTSTRAP", "").strip())


@contextlib.contextmanager
def broker(topic_prefix: str) -> Iterator[tuple[str, int | None]]:
    """(bootstrap, pid of the broker's JVM or None) of a broker for one run.

    ``nexuscore._broker.kafka_broker()`` starts one (Docker or local jars) and stops it afterwards; a
    shared broker (``$NEXUSCORE_BOOTSTRAP``) keeps what it is given, so the run's topics, those
    starting with ``topic_prefix``, are deleted from it on the way out.
    """
    with kafka_broker() as bootstrap:
        broker_pid = find_broker_pid(bootstrap)
        try:
            yield bootstrap, broker_pid
        finally:
            if external_broker():
                with contextlib.suppress(Exception):
                    asyncio.run(delete_topics_with_prefix(bootstrap, topic_prefix))


def kafka_properties(pid: int) -> dict[str, str] | None:
    """The server.properties of a ``kafka.Kafka`` JVM, or None if ``pid`` is not one."""
    proc = Path(f"/proc/{pid}")
    try:
        args = [a.decode("utf-8", "replace") for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
        if "kafka.Kafka" not in args:
            return None
        props = Path(args[-1])
        if not props.is_absolute():
            props = Path(os.readlink(proc / "cwd")) / props
        text = props.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    pairs = (line.partition("=") for line in text.splitlines() if not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, sep, v in pairs if sep}


def find_broker_pid(bootstrap: str) -> int | None:
    """The pid of a Kafka JVM on this machine whose PLAINTEXT listener has ``bootstrap``'s port.

    ``kafka_broker()`` yields only an address, so the JVM is found by its command line (``kafka.Kafka
    <server.properties>``) and the listener port in that properties file. None for a broker in Docker
    or on another machine.
    """
    port = bootstrap.split(",")[0].rsplit(":", 1)[-1]
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        props = kafka_properties(int(proc.name))
        if props is not None and any(
            item.strip().startswith("PLAINTEXT://") and item.strip().endswith(f":{port}")
            for item in props.get("listeners", "").split(",")
        ):
            return int(proc.name)
    return None


async def admin_client(bootstrap: str) -> AIOKafkaAdminClient:
    """A started admin client (the caller closes it)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30_000)
    try:
        await asyncio.wait_for(admin.start(), ADMIN_TIMEOUT_S)
    except BaseException:
        await admin.close()
        raise
    return admin


async def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = await admin_client(bootstrap)
    try:
        await admin.create_topics([NewTopic(name=name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def await_topics(bootstrap: str, names: Sequence[str], timeout_s: float) -> None:
    """Wait until every topic exists and all its partitions have a leader.

    Topic creation is asynchronous: a consumer that subscribes before the metadata has propagated can
    sit without partitions until its next metadata refresh, which would be timed as pipeline time.
    (Not every topic has ``DEFAULT_PARTITIONS``: governance has one.)
    """
    admin = await admin_client(bootstrap)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            described = await admin.describe_topics(list(names))
            ready = {
                t["topic"]
                for t in described
                if t.get("error_code", 0) == 0
                and t.get("partitions")
                and all(p.get("leader", -1) >= 0 for p in t["partitions"])
            }
            if ready >= set(names):
                return
            if time.monotonic() > deadline:
                raise BenchError(
                    f"topics {sorted(set(names) - ready)} had no leaders within {timeout_s:.0f} s"
                )
            await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def topic_partitions(bootstrap: str, names: Sequence[str]) -> list[TopicPartition]:
    """Every partition of the named topics, as the broker describes them."""
    admin = await admin_client(bootstrap)
    try:
        described = await admin.describe_topics(list(names))
    finally:
        await admin.close()
    return [TopicPartition(t["topic"], p["partition"]) for t in described for p in t.get("partitions", [])]


async def delete_topics_with_prefix(bootstrap: str, prefix: str) -> int:
    """Remove what the benchmark created on a shared (external) broker."""
    admin = await admin_client(bootstrap)
    try:
        names = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if names:
            await admin.delete_topics(names)
        return len(names)
    finally:
        await admin.close()
