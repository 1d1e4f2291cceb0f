"""A real Apache Kafka broker for development, tests and CI, with or without Docker.

``kafka_broker()`` is the one entry point most code needs. It yields a bootstrap string from, in
order of preference:

1. ``$NEXUSCORE_BOOTSTRAP``: an already running broker (CI service, a shared dev broker); it is only
   checked for reachability, never started or stopped;
2. a Docker engine, through testcontainers' ``KafkaContainer`` in KRaft mode;
3. ``LocalKafka``: a single-node KRaft broker run straight from the Kafka jars with the local
   ``java``; the jars are fetched once by Maven (``ensure_kafka_jars``) from ``kafka/pom.xml``.

Everything that goes wrong is raised as ``nexuscore.kernel.errors.BrokerError`` with a one-line message
meant for a person (it quotes the last lines of the broker or Maven output where that explains it).

The module is POSIX-only (process groups, ``fcntl``), like the rest of the development tooling.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import concurrent.futures
import contextlib
import fcntl
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Final, NoReturn, Self, TypeVar

from aiokafka.admin import AIOKafkaAdminClient

from nexuscore.kernel.errors import BrokerError

__all__ = [
    "KAFKA_IMAGE",
    "REPO_ROOT",
    "SASL_ADMIN",
    "LocalKafka",
    "docker_available",
    "ensure_kafka_jars",
    "kafka_broker",
    "kafka_libs_dir",
    "wait_for_broker",
]

_T = TypeVar("_T")

# The package is installed editable (``pip install -e .``), so the source checkout, with kafka/pom.xml
# and kafka/log4j2.properties, is the parent of this package's folder.
REPO_ROOT: Final = Path(__file__).resolve().parent.parent
_POM: Final = REPO_ROOT / "kafka" / "pom.xml"
_LOG4J_CONFIG: Final = REPO_ROOT / "kafka" / "log4j2.properties"

# Written last into a fetched libs folder: its content is the sha256 of the pom.xml it was fetched
# with, so editing the pom (a Kafka upgrade) triggers exactly one new fetch.
_MARKER: Final = ".complete"
# A cold Maven cache downloads ~100 MB; generous, but a hung Maven must not hang CI forever.
_MAVEN_TIMEOUT_S: Final = 900.0

# Image used when a Docker engine is available. cp-kafka 7.x is what testcontainers' KRaft support
# (``with_kraft``) is written for.
KAFKA_IMAGE: Final = "confluentinc/cp-kafka:7.6.0"

# How long an externally provided broker ($NEXUSCORE_BOOTSTRAP) gets to answer: it should already be
# running, so a short wait turns a typo or a stopped service into a quick, clear error.
_EXTERNAL_TIMEOUT_S: Final = 10.0
# How long `docker info` may take before we decide there is no usable engine.
_DOCKER_PROBE_TIMEOUT_S: Final = 5.0
# Grace period for a clean broker shutdown before SIGKILL (clean shutdown avoids log recovery on
# restart()).
_STOP_GRACE_S: Final = 15.0

# JVM flags for a small machine (2 cores): the serial collector starts fastest and has the smallest
# footprint (no concurrent GC threads competing with the broker for 2 cores); with this heap an idle
# test broker sits near 200 MB RSS (G1 measured no faster to start). Only the C1 compiler: a broker
# started for a test or a benchmark never runs long enough for C2 to settle, and C2 kept compiling
# (and deoptimising) for minutes, a quarter of a core taken from the pipeline beside it. Measured in
# bench.pipeline (four interleaved latency runs each): broker CPU per request at 500 requests/s 0.90-0.96
# ms against 1.29-1.31, gateway-added p50 13-32 ms against 34-49 and p99 45-165 against 158-227,
# 0.12 ms per request in the throughput run against 0.22, peak RSS 216 MB against 302. OOM must kill
# the broker rather than leave a JVM that accepts connections but never answers.
_JVM_OPTS: Final = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
# The formatter runs for a second and exits: the C1-only JIT makes that noticeably faster.
_TOOL_JVM_OPTS: Final = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")

# Broker settings besides listeners and paths. Tuned for a 2-core development machine and tests.
_BROKER_SETTINGS: Final[Mapping[str, str]] = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "inter.broker.listener.name": "PLAINTEXT",
    # The project creates every topic explicitly with its partition count; auto-creation would hide a
    # missing create (and make a typo'd topic name "work"). Internal topics (__consumer_offsets,
    # __transaction_state) are created by their coordinators regardless of this flag.
    "auto.create.topics.enable": "false",
    "num.partitions": "4",
    # One node: every replicated internal topic must accept a single replica.
    "offsets.topic.replication.factor": "1",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    # The default 50 partitions each make the first consumer group / transaction on a fresh broker
    # noticeably slower; 8 is plenty for one machine.
    "offsets.topic.num.partitions": "8",
    "transaction.state.log.num.partitions": "8",
    # Tests start and stop consumer groups constantly; waiting 3 s for more members is pure delay.
    "group.initial.rebalance.delay.ms": "0",
    # Threads sized for 2 cores (defaults assume a server: 3 network, 8 I/O, 10 background). One
    # network thread and two I/O threads: at 500 requests/s in bench.pipeline the broker took 46-47 %
    # of a core against 50-51 % with 2 and 4 (three interleaved runs each), fewer threads contending.
    "num.network.threads": "1",
    "num.io.threads": "2",
    "background.threads": "4",
    "num.recovery.threads.per.data.dir": "1",
    "log.cleaner.threads": "1",
    # The cleaner's dedupe buffer is allocated up front (128 MB by default) out of a 512 MB heap.
    "log.cleaner.dedupe.buffer.size": "16777216",
    # log.flush.*: keep Kafka's defaults (no forced fsync, rely on the page cache): durability across
    # machine crashes is irrelevant for a throw-away broker, and fsyncs would only slow tests down.
}

# SASL (``LocalKafka(sasl_users=...)``): the broker's own principal, a super user that the broker and
# controller authenticate as on both listeners; clients log in with SASL/PLAIN over plain TCP.
SASL_ADMIN: Final = "admin"
_SASL_LISTENER: Final = "SASL_PLAINTEXT"
# User names and passwords go into a JAAS line inside server.properties: quotes, semicolons,
# backslashes or whitespace would end it early, so they are refused rather than escaped.
_SASL_TOKEN: Final = re.compile(r"[A-Za-z0-9._@+-]{1,128}")

# A running LocalKafka registers here so the atexit hook can kill brokers whose owner never called
# stop() (a crashed test session, a forgotten object).
_LIVE: set[LocalKafka] = set()


def kafka_libs_dir() -> Path:
    """Return the folder holding the Kafka broker jars.

    ``$NEXUSCORE_KAFKA_LIBS`` wins (CI caches it, or it points at a shared copy); otherwise
    ``<repo>/.kafka/libs``, which is git-ignored.
    """
    override = os.environ.get("NEXUSCORE_KAFKA_LIBS", "").strip()
    if override:
        return Path(override).expanduser()
    return REPO_ROOT / ".kafka" / "libs"


def ensure_kafka_jars(libs: Path | None = None) -> Path:
    """Make sure ``libs`` (default: ``kafka_libs_dir()``) holds the Kafka broker jars; return it.

    Returns at once when the folder's ``.complete`` marker matches the current ``kafka/pom.xml``.
    Otherwise Maven copies the runtime dependencies of that pom into a staging folder next to
    ``libs``, the marker is written into it, and the staging folder is renamed into place, so
    ``libs`` is never seen half-filled and an interrupted fetch leaves nothing behind that looks
    complete. A file lock serialises concurrent callers (parallel test workers).

    Raises:
        BrokerError: ``mvn``/``java`` is not installed, the pom is missing, Maven fails, or ``libs``
            exists but was not created by this function (it is never deleted then).
    """
    libs = Path(libs if libs is not None else kafka_libs_dir()).absolute()
    if not _POM.is_file():
        raise BrokerError(
            f"{_POM} is missing: the Kafka broker jars are defined there (needs a source checkout)"
        )
    digest = hashlib.sha256(_POM.read_bytes()).hexdigest()
    if _marker_matches(libs, digest):
        return libs

    libs.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(libs.parent / f".{libs.name}.lock"):
        # Another process may have finished the fetch while we waited for the lock.
        if _marker_matches(libs, digest):
            return libs
        if libs.exists() and not _replaceable(libs):
            raise BrokerError(
                f"{libs} exists but was not filled by ensure_kafka_jars (no {_MARKER} marker); "
                "remove it or set NEXUSCORE_KAFKA_LIBS to another folder"
            )
        mvn = _require_tool("mvn", "Maven is needed once to fetch the Kafka broker jars")
        _require_tool("java", "a Java 17+ runtime is needed to run the local Kafka broker")

        staging_prefix = f".{libs.name}-staging-"
        # Leftovers of fetches that were killed half-way; safe to delete because we hold the lock.
        for stale in libs.parent.glob(f"{staging_prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix, dir=libs.parent))
        trash: Path | None = None
        try:
            _run_maven(mvn, staging)
            if not any(staging.glob("kafka_2.13-*.jar")):
                raise BrokerError(f"maven finished but copied no kafka_2.13 jar into {staging}; check {_POM}")
            (staging / _MARKER).write_text(digest, encoding="ascii")
            staging.chmod(0o755)  # mkdtemp makes it owner-only; the jars are meant to be shared/cached
            if libs.exists():
                # A stale fetch (older pom): move it aside first, since rename() cannot replace a
                # non-empty folder; both renames are atomic.
                trash = Path(tempfile.mkdtemp(prefix=f".{libs.name}-old-", dir=libs.parent))
                os.replace(libs, trash / "libs")
            os.replace(staging, libs)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
    return libs


def _marker_matches(libs: Path, digest: str) -> bool:
    """True if ``libs`` holds a complete fetch made from the pom with this sha256."""
    try:
        return (libs / _MARKER).read_text(encoding="ascii").strip() == digest
    except (OSError, UnicodeDecodeError):
        return False


def _replaceable(libs: Path) -> bool:
    """True if ``libs`` may be replaced: an empty folder or an earlier (stale) fetch of ours."""
    return libs.is_dir() and ((libs / _MARKER).is_file() or not any(libs.iterdir()))


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (released by the kernel even if we are killed)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _require_tool(name: str, why: str) -> str:
    """Return the full path of executable ``name``, or raise a BrokerError saying why it is needed."""
    found = shutil.which(name)
    if found is None:
        raise BrokerError(f"'{name}' was not found on PATH: {why}")
    return found


def _run_maven(mvn: str, output_dir: Path) -> None:
    """Copy the runtime dependencies of kafka/pom.xml into ``output_dir``."""
    cmd = [
        mvn,
        "-q",
        "-B",
        "-f",
        str(_POM),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={output_dir}",
        "-DincludeScope=runtime",
    ]
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            timeout=_MAVEN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BrokerError(
            f"maven did not finish fetching the Kafka jars within {_MAVEN_TIMEOUT_S:g} s"
        ) from exc
    if done.returncode != 0:
        raise BrokerError(
            f"maven failed to fetch the Kafka jars (exit {done.returncode}): {_tail(done.stdout)}"
        )


def _tail(text: str, lines: int = 6) -> str:
    """The last meaningful lines of a tool's output, joined into one line for an error message.

    Java stack frames and Maven's help boilerplate are dropped: the line that explains a failure is
    the exception message or the ``[ERROR]`` line above them.
    """
    kept: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if (
            not line
            or line.startswith(("at ", "... ", "[ERROR] -> [Help", "[Help "))
            or line in ("[ERROR]", "[ERROR] ")
            or "SLF4J" in line  # slf4j's start-up notes about its binding, never the failure itself
            or "http://cwiki.apache.org" in line
            or "Re-run Maven" in line
            or "For more information about the errors" in line
        ):
            continue
        kept.append(line if len(line) <= 300 else line[:297] + "...")
    return " | ".join(kept[-lines:]) if kept else "(no output)"


def _new_cluster_id() -> str:
    """A random KRaft cluster id: 16 bytes, URL-safe base64 without padding (22 characters).

    Like Kafka's own ``Uuid.randomUuid()``, avoid ids starting with '-', which a command line would
    read as an option.
    """
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):
            return cluster_id


def _listener_ports(properties: Path) -> tuple[int, int]:
    """The client and controller ports a persistent broker's ``server.properties`` was made with."""
    text = properties.read_text(encoding="utf-8")
    found = re.search(r"^listeners=[A-Z_]+://[^:,]*:(\d+),[A-Z_]+://[^:,]*:(\d+)$", text, re.MULTILINE)
    if found is None:
        raise BrokerError(f"{properties} names no client and controller listeners")
    return int(found[1]), int(found[2])


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on 127.0.0.1 a moment ago.

    All sockets stay bound until every port is chosen so the kernel cannot hand out one twice. A
    port can still be taken before the broker binds it; LocalKafka.start() retries that case.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def _port_in_use(port: int | None) -> bool:
    """True if something on this machine is listening on 127.0.0.1:``port``."""
    if port is None:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR: connections of a dead broker lingering in TIME_WAIT do not count as "in use";
        # on Linux a listening socket still makes the bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _read_tail(path: Path, max_bytes: int = 64_000) -> str:
    """The end of a (possibly large) log file as text; empty if it cannot be read."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - max_bytes))
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run ``coro`` to completion from synchronous code.

    ``asyncio.run`` refuses to run inside a running event loop (an async test or app calling the
    synchronous broker API); then the coroutine runs on a fresh loop in a worker thread instead.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexuscore-broker") as pool:
        return pool.submit(asyncio.run, coro).result()


class LocalKafka:
    """A single-node KRaft Kafka broker run from the local jars with ``java``; no Docker needed.

    Each ``start()`` picks free 127.0.0.1 ports and a fresh data folder
    (``tempfile.mkdtemp(prefix="nexuscore-kafka-")``) holding ``server.properties``, the log
    segments under ``data/`` and the broker's console output in ``broker.log``. ``stop()`` shuts the
    broker down and deletes that folder. ``restart()`` keeps ports and data (broker-restart tests).
    Given ``data_dir`` (and optionally ``port``), the broker is persistent instead: the folder is
    formatted on the first start only, every later start (in this process or another) runs the
    same log on the same ports, and ``stop()`` keeps it.

    Use as a context manager::

        with LocalKafka() as kafka:
            produce_to(kafka.bootstrap)

    The JVM runs in its own session (process group) so a Ctrl-C aimed at the Python process does not
    kill the broker half-way through a test's cleanup; an ``atexit`` hook kills any broker whose
    owner never called ``stop()``.
    """

    def __init__(
        self,
        libs: Path | None = None,
        *,
        overrides: Mapping[str, str | int] | None = None,
        sasl_users: Mapping[str, str] | None = None,
        data_dir: Path | None = None,
        port: int | None = None,
    ) -> None:
        """Prepare (but do not start) a broker.

        Args:
            libs: folder with the Kafka jars; default ``kafka_libs_dir()`` (see ``ensure_kafka_jars``).
            overrides: extra or replacement ``server.properties`` entries, e.g. for a test that needs
                ``log.retention.ms``. Listener, node and path settings are managed here.
            sasl_users: user name -> password. When given, both listeners speak SASL_PLAINTEXT with
                mechanism PLAIN and Kafka's StandardAuthorizer is on: ``admin`` (added with a random
                password if missing) is the only super user, and every other user may do only what
                an ACL allows (``allow.everyone.if.no.acl.found=false``). Clients need
                ``client_config(user)``. None (the default): PLAINTEXT, no authorization.
            data_dir: a folder that keeps the broker's log across stops and restarts (empty or
                missing the first time); None (the default): a temporary folder, deleted by ``stop()``.
            port: the client port of a persistent broker's first start (None: a free one); later
                starts must ask for the same port, or none.
        """
        self._libs = Path(libs) if libs is not None else kafka_libs_dir()
        self._overrides = {key: str(value) for key, value in (overrides or {}).items()}
        self._sasl_users = _checked_sasl_users(sasl_users) if sasl_users is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._kept = Path(data_dir).resolve() if data_dir is not None else None
        self._wanted_port = port
        self.data_dir: Path | None = None
        self.port: int | None = None
        self.controller_port: int | None = None

    # -- public API -------------------------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """``"127.0.0.1:PORT"`` of the client listener (PLAINTEXT, or SASL_PLAINTEXT with ``sasl_users``);
        only valid after ``start()``."""
        if self.port is None:
            raise BrokerError("the local Kafka broker has not been started")
        return f"127.0.0.1:{self.port}"

    @property
    def sasl(self) -> bool:
        """True if clients must log in (``sasl_users`` was given)."""
        return self._sasl_users is not None

    def client_config(self, user: str = SASL_ADMIN) -> dict[str, str]:
        """aiokafka client keyword arguments for logging in as ``user``; ``{}`` for a PLAINTEXT broker.

        Use as ``AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, **kafka.client_config("producer"))``.
        """
        if self._sasl_users is None:
            return {}
        if user not in self._sasl_users:
            raise BrokerError(f"the local Kafka broker has no SASL user {user!r}")
        return {
            "security_protocol": "SASL_PLAINTEXT",
            "sasl_mechanism": "PLAIN",
            "sasl_plain_username": user,
            "sasl_plain_password": self._sasl_users[user],
        }

    @property
    def log_path(self) -> Path | None:
        """The broker's console output (WARN and above), or None before ``start()``."""
        return self.data_dir / "broker.log" if self.data_dir is not None else None

    @property
    def running(self) -> bool:
        """True while the broker process is alive (not necessarily ready)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 60) -> str:
        """Start the broker and return its bootstrap address once it answers Kafka requests.

        Idempotent while the broker runs. If the process exits or does not answer within
        ``timeout_s`` (formatting included), raise BrokerError quoting the end of ``broker.log``; the
        process is killed and the folder keeps only ``broker.log`` and ``server.properties``.
        """
        if self.running:
            return self.bootstrap
        if self.data_dir is not None:
            # Set up before, but the process has died: bring it back on the same ports and data.
            return self.restart(timeout_s)

        java = _require_tool("java", "a Java 17+ runtime is needed to run the local Kafka broker")
        if not any(self._libs.glob("kafka_2.13-*.jar")):
            raise BrokerError(
                f"no Kafka broker jars in {self._libs}; run nexuscore._broker.ensure_kafka_jars() first"
            )
        deadline = time.monotonic() + timeout_s
        if self._kept is not None:
            return self._start_kept(java, deadline, timeout_s)
        self.data_dir = Path(tempfile.mkdtemp(prefix="nexuscore-kafka-"))
        try:
            # Another process may grab a chosen port before the broker binds it; then the whole setup
            # is redone on new ports (the formatted storage records the controller's address).
            for _attempt in range(3):
                self._setup_storage(java, deadline)
                self._launch(java)
                try:
                    self._await_ready(deadline, timeout_s)
                except _PortTaken:
                    self._kill()
                    continue
                return self.bootstrap
            self._fail("kept losing its ports to other processes")
        except BaseException as exc:
            # Leave no half-started broker behind. For a BrokerError keep broker.log and
            # server.properties (a few KB, named in the message) for a post-mortem; the log segments
            # can be large. An interrupt (Ctrl-C) explains itself: remove everything.
            self._kill()
            keep_logs = isinstance(exc, BrokerError)
            shutil.rmtree(self.data_dir / "data" if keep_logs else self.data_dir, ignore_errors=True)
            self.data_dir = None
            self.port = self.controller_port = None
            _LIVE.discard(self)
            raise

    def restart(self, timeout_s: float = 60) -> str:
        """Stop the broker cleanly and start it again on the same ports with the same data."""
        if self.data_dir is None:
            raise BrokerError("the local Kafka broker has not been started, so it cannot be restarted")
        java = _require_tool("java", "a Java 17+ runtime is needed to run the local Kafka broker")
        self._terminate()
        deadline = time.monotonic() + timeout_s
        self._launch(java)
        try:
            self._await_ready(deadline, timeout_s)
        except _PortTaken:
            self._fail(f"could not get its port {self.port} back: another process took it")
        return self.bootstrap

    def stop(self, grace_s: float = _STOP_GRACE_S) -> None:
        """Stop the broker (SIGTERM, up to ``grace_s`` for a clean shutdown, then SIGKILL); delete its data.

        ``grace_s=0`` kills at once. Safe to call more than once, and on a broker that never started.
        """
        self._terminate(grace_s)
        if self.data_dir is not None and self._kept is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
        self.port = self.controller_port = None
        _LIVE.discard(self)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalKafka {state} port={self.port} data_dir={self.data_dir}>"

    # -- internals --------------------------------------------------------------------------------

    def _start_kept(self, java: str, deadline: float, timeout_s: float) -> str:
        """Start the persistent broker of ``data_dir``: format it the first time, else run its log
        again on the ports it was made with. Its folder is never deleted, whatever happens."""
        root = self._kept
        assert root is not None
        try:
            root.mkdir(parents=True, exist_ok=True)
            formatted = (root / "data" / "meta.properties").is_file() and (
                root / "server.properties"
            ).is_file()
            if not formatted and any(root.iterdir()):
                raise BrokerError(
                    f"{root} is neither empty nor a broker's data folder: give an empty or new one"
                )
        except OSError as exc:
            raise BrokerError(f"cannot use {root} as the broker's data folder: {exc.strerror}") from exc
        self.data_dir = root
        try:
            if formatted:
                self.port, self.controller_port = _listener_ports(self._properties_path)
                if self._wanted_port not in (None, self.port):
                    raise BrokerError(
                        f"{root} holds a broker made for port {self.port}, not {self._wanted_port}"
                    )
            else:
                self._setup_storage(java, deadline, self._wanted_port)
            self._launch(java)
            try:
                self._await_ready(deadline, timeout_s)
            except _PortTaken:
                self._fail(f"could not get its port {self.port} (another process holds it)")
        except BaseException:
            self._kill()
            self.data_dir = None
            self.port = self.controller_port = None
            _LIVE.discard(self)
            raise
        return self.bootstrap

    def _setup_storage(self, java: str, deadline: float, port: int | None = None) -> None:
        """Pick ports, write server.properties and format a fresh KRaft storage folder."""
        assert self.data_dir is not None
        for child in self.data_dir.iterdir():  # an earlier attempt's leftovers
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
        self.port, self.controller_port = _free_ports(2)
        if port is not None:
            self.port, self.controller_port = port, next(p for p in _free_ports(2) if p != port)
        settings = dict(_BROKER_SETTINGS)
        settings.update(
            {
                "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
                "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
                # Dynamic quorum (KIP-853) bootstrapped by `format --standalone`; a static
                # controller.quorum.voters would make the formatter refuse --standalone.
                "controller.quorum.bootstrap.servers": f"127.0.0.1:{self.controller_port}",
                "log.dirs": str(self.data_dir / "data"),
            }
        )
        if self._sasl_users is not None:
            settings.update(_sasl_settings(self.port, self.controller_port, self._sasl_users))
        settings.update(self._overrides)
        self._properties_path.write_text(
            "".join(f"{key}={value}\n" for key, value in settings.items()), encoding="utf-8"
        )

        cmd = [
            java,
            *_TOOL_JVM_OPTS,
            *self._log4j_opts(),
            "-cp",
            str(self._libs / "*"),  # java expands the wildcard itself; no shell involved
            "kafka.tools.StorageTool",
            "format",
            "--standalone",
            "-t",
            _new_cluster_id(),
            "-c",
            str(self._properties_path),
        ]
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=max(1.0, deadline - time.monotonic()),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(f"formatting the local Kafka storage in {self.data_dir} timed out") from exc
        output = done.stdout.decode("utf-8", errors="replace")
        # Kept in broker.log as well, so a later failure has the whole story in one file.
        with self._log_file_path.open("a", encoding="utf-8") as log:
            log.write(output)
        if done.returncode != 0:
            raise BrokerError(
                f"formatting the local Kafka storage failed with exit code {done.returncode} "
                f"(log: {self._log_file_path}): {_tail(output)}"
            )

    def _launch(self, java: str) -> None:
        """Start the broker JVM in its own session, console output appended to broker.log."""
        assert self.data_dir is not None
        cmd = [
            java,
            *_JVM_OPTS,
            *self._log4j_opts(),
            "-cp",
            str(self._libs / "*"),
            "kafka.Kafka",
            str(self._properties_path),
        ]
        with self._log_file_path.open("ab") as log:
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own process group: Ctrl-C in the terminal signals the foreground group only, so the
                # broker is not killed under a test that is still cleaning up; stop() ends it.
                start_new_session=True,
            )
        _LIVE.add(self)

    def _await_ready(self, deadline: float, timeout_s: float) -> None:
        """Block until the broker answers a metadata request; raise BrokerError if it cannot."""
        try:
            remaining = max(0.0, deadline - time.monotonic())
            _run_sync(_wait(self.bootstrap, remaining, self._exit_reason, self.client_config()))
        except _BrokerExited:
            # Checked on the ports themselves too: broker.log only says it when the slf4j binding works
            # (see kafka/log4j2.properties).
            ports = (self.port, self.controller_port)
            if "Address already in use" in self._log_text() or any(map(_port_in_use, ports)):
                raise _PortTaken from None
            self._fail(f"exited with code {self._proc.returncode if self._proc else '?'} during start-up")
        except BrokerError:
            self._fail(f"did not answer on {self.bootstrap} within {timeout_s:g} s")

    def _exit_reason(self) -> str | None:
        """Polled while waiting: a message once the broker process has exited, else None."""
        if self._proc is not None and self._proc.poll() is not None:
            return f"the local Kafka broker exited with code {self._proc.returncode}"
        return None

    def _fail(self, what: str) -> NoReturn:
        """Kill the broker and raise a BrokerError that quotes the end of broker.log."""
        self._kill()
        raise BrokerError(f"the local Kafka broker {what} (log: {self.log_path}): {_tail(self._log_text())}")

    def _terminate(self, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM the broker's process group, wait up to ``grace_s``, then SIGKILL it."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
        self._proc = None

    def _kill(self) -> None:
        """SIGKILL the broker at once (failed start, interpreter exit)."""
        self._terminate(grace_s=0)

    def _log4j_opts(self) -> list[str]:
        # Without our config log4j2 falls back to ERROR-only output, which is still acceptable (a
        # non-editable install has no kafka/ folder).
        return [f"-Dlog4j2.configurationFile={_LOG4J_CONFIG}"] if _LOG4J_CONFIG.is_file() else []

    def _log_text(self) -> str:
        return _read_tail(self._log_file_path)

    @property
    def _properties_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "server.properties"

    @property
    def _log_file_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "broker.log"


def _checked_sasl_users(users: Mapping[str, str]) -> dict[str, str]:
    """``users`` with ``admin`` added (random password) if missing; BrokerError for unusable names."""
    checked = dict(users)
    checked.setdefault(SASL_ADMIN, secrets.token_urlsafe(18))
    for name, password in checked.items():
        if not (_SASL_TOKEN.fullmatch(name) and _SASL_TOKEN.fullmatch(password)):
            raise BrokerError(
                f"SASL user {name!r}: names and passwords must be 1-128 characters of "
                "letters, digits and . _ @ + -"
            )
    return checked


def _sasl_settings(port: int, controller_port: int, users: Mapping[str, str]) -> dict[str, str]:
    """server.properties entries for SASL/PLAIN on both listeners and the StandardAuthorizer.

    The controller listener speaks SASL too: the broker half of this combined node logs in to the
    controller half as ``admin``, a super user, so broker registration and heartbeats are
    authorized without opening the controller port to anonymous clients.
    """
    jaas = " ".join(
        [
            "org.apache.kafka.common.security.plain.PlainLoginModule required",
            f'username="{SASL_ADMIN}" password="{users[SASL_ADMIN]}"',
            *(f'user_{name}="{password}"' for name, password in users.items()),
        ]
    )
    return {
        "listeners": f"{_SASL_LISTENER}://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"{_SASL_LISTENER}://127.0.0.1:{port}",
        "listener.security.protocol.map": f"{_SASL_LISTENER}:SASL_PLAINTEXT,CONTROLLER:SASL_PLAINTEXT",
        "inter.broker.listener.name": _SASL_LISTENER,
        "sasl.enabled.mechanisms": "PLAIN",
        "sasl.mechanism.inter.broker.protocol": "PLAIN",
        "sasl.mechanism.controller.protocol": "PLAIN",
        f"listener.name.{_SASL_LISTENER.lower()}.plain.sasl.jaas.config": f"{jaas};",
        "listener.name.controller.plain.sasl.jaas.config": f"{jaas};",
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": f"User:{SASL_ADMIN}",
        "allow.everyone.if.no.acl.found": "false",
    }


class _BrokerExited(BrokerError):
    """Internal: the broker process died while we waited for it."""


class _PortTaken(Exception):
    """Internal: the broker died because another process bound one of its ports first."""


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """Signal the broker's whole process group (its pid, thanks to ``start_new_session``)."""
    # Only called while proc.poll() is None, i.e. not yet reaped, so the pid cannot have been reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


@atexit.register
def _kill_forgotten_brokers() -> None:
    """Safety net at interpreter exit: kill brokers nobody stopped and delete their data folders."""
    for broker in list(_LIVE):
        broker.stop(grace_s=0)  # the data is deleted anyway, so a clean shutdown buys nothing


def docker_available() -> bool:
    """True only if a Docker engine answers (not merely a ``docker`` client being installed)."""
    docker = shutil.which("docker")
    if docker is not None:
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                [docker, "info", "--format", "{{.ServerVersion}}"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_DOCKER_PROBE_TIMEOUT_S,
                check=False,
            )
        except (subprocess.TimeoutExpired, OSError):
            return False
        return done.returncode == 0 and bool(done.stdout.strip())
    # No CLI: testcontainers talks to the engine's socket directly, so ask the socket.
    return _docker_socket_answers()


def _docker_socket_answers() -> bool:
    """Ping the Docker engine's unix socket (``$DOCKER_HOST`` if it is a unix:// address)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return False  # a tcp:// engine without the CLI: not worth a hand-written HTTP client
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_DOCKER_PROBE_TIMEOUT_S)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            status_line = sock.recv(64).split(b"\r\n", 1)[0]
            return status_line.startswith(b"HTTP/1.") and b" 200" in status_line
    except OSError:
        return False


async def wait_for_broker(
    bootstrap: str, timeout_s: float, client_config: Mapping[str, Any] | None = None
) -> None:
    """Wait until the Kafka broker(s) at ``bootstrap`` answer a metadata request (``client_config``:
    extra aiokafka arguments, a login).

    Raises:
        BrokerError: naming ``bootstrap`` and the last error, if no answer came within ``timeout_s``.
    """
    await _wait(bootstrap, timeout_s, None, client_config)


async def _wait(
    bootstrap: str,
    timeout_s: float,
    give_up: Callable[[], str | None] | None,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """``wait_for_broker`` with an extra check, polled between attempts, that can abort the wait.

    ``client_config``: extra aiokafka arguments for the probe (a SASL login).
    """
    hosts = _parse_bootstrap(bootstrap)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_error = "no attempt was made"
    while True:
        if give_up is not None and (reason := give_up()) is not None:
            raise _BrokerExited(reason)
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise BrokerError(
                f"no Kafka broker answered at {bootstrap} within {timeout_s:g} s ({last_error})"
            )
        attempt_s = min(remaining, 5.0)
        try:
            await asyncio.wait_for(_probe(bootstrap, hosts, attempt_s, client_config), timeout=attempt_s)
        except Exception as exc:  # any failure just means "not ready yet"; the last one is reported
            last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        else:
            return
        await asyncio.sleep(min(0.25, max(0.0, deadline - loop.time())))


async def _probe(
    bootstrap: str,
    hosts: list[tuple[str, int]],
    timeout_s: float,
    client_config: Mapping[str, Any] | None = None,
) -> None:
    """One readiness check: a TCP connect, then a real metadata request through aiokafka."""
    # aiokafka logs an ERROR for every refused bootstrap connection; a plain TCP connect first keeps
    # the many attempts while a broker boots silent.
    for host, port in hosts:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        break
    else:
        raise ConnectionRefusedError(f"nothing accepts connections at {bootstrap}")

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        client_id="nexuscore-broker-probe",
        request_timeout_ms=max(1000, int(timeout_s * 1000)),
        **(client_config or {}),
    )
    try:
        await admin.start()
        await admin.list_topics()
    finally:
        await admin.close()


def _parse_bootstrap(bootstrap: str) -> list[tuple[str, int]]:
    """Split ``"host:port[,host:port...]"`` (IPv6 hosts in brackets) or raise a clear BrokerError."""
    hosts: list[tuple[str, int]] = []
    for item in bootstrap.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise BrokerError(f"bootstrap address {bootstrap!r} is not of the form host:port[,host:port]")
        hosts.append((host.strip("[]"), int(port)))
    return hosts


@contextlib.contextmanager
def kafka_broker() -> Iterator[str]:
    """Yield the bootstrap address of a working Kafka broker; clean up whatever was started.

    1. ``$NEXUSCORE_BOOTSTRAP`` set: checked for reachability (BrokerError naming it if it does not
       answer within ~10 s) and yielded; nothing is started or stopped.
    2. A Docker engine answers: a testcontainers ``KafkaContainer`` in KRaft mode.
    3. Otherwise: ``ensure_kafka_jars()`` and a ``LocalKafka`` broker, stopped afterwards.
    """
    external = os.environ.get("NEXUSCORE_BOOTSTRAP", "").strip()
    if external:
        try:
            _run_sync(wait_for_broker(external, _EXTERNAL_TIMEOUT_S))
        except BrokerError as exc:
            raise BrokerError(f"NEXUSCORE_BOOTSTRAP={external} is not reachable: {exc}") from None
        yield external
    elif docker_available():
        with _docker_kafka() as bootstrap:
            yield bootstrap
    else:
        with LocalKafka(ensure_kafka_jars()) as local:
            yield local.bootstrap


@contextlib.contextmanager
def _docker_kafka() -> Iterator[str]:
    """A KRaft Kafka container through testcontainers (imported lazily: a dev-only dependency)."""
    # testcontainers.kafka is a deprecated alias (it warns on import, an error under pytest's
    # filterwarnings=error); the implementation lives in testcontainers.community.kafka.
    from testcontainers.community.kafka import KafkaContainer

    container = KafkaContainer(KAFKA_IMAGE).with_kraft().with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
    try:
        container.start()
    except Exception as exc:
        raise BrokerError(f"could not start a Kafka container ({KAFKA_IMAGE}) in Docker: {exc}") from exc
    try:
        bootstrap = str(container.get_bootstrap_server())
        _run_sync(wait_for_broker(bootstrap, 60))
        yield bootstrap
    finally:
        container.stop()
