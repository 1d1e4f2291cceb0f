"""The pipeline's stages as processes run them: the decider (with its bootstrap policy), the worker,
the projector, the simulated provider and a local broker, each wired from its settings and run in
the foreground until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from faust.worker import Worker as FaustWorker

from nexuscore._broker import LocalKafka, ensure_kafka_jars, wait_for_broker
from nexuscore.core import BreakerConfig
from nexuscore.kernel.clock import SystemClock
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import load_private_key
from nexuscore.policy import (
    GovernanceState,
    Registry,
    SignedPolicy,
    TrustStore,
    judge,
    load_policy,
    load_signed_policy,
    load_trust_store,
    read_signatures,
    signatures_path,
)
from nexuscore.projections import Projector, use_system_allocator
from nexuscore.providers import SimulatedProviderConfig, serve_forever
from nexuscore.schemas import PolicyStageChanged
from nexuscore.services._keys import content_keys
from nexuscore.streams import (
    ANSWER_WINDOW,
    DEDUPE_WINDOW,
    Caller,
    CircuitBoard,
    DeciderLoop,
    GovernanceFollower,
    PolicyHolder,
    RetryPolicy,
    Worker,
    bootstrap_event,
    build_decider,
    default_adapters,
    publish_governance,
    worker_id,
)
from nexuscore.transport import Topics, check_instance_id, ensure_topics, login_options, process_login

# How long a starting decider waits for the broker to answer.
BROKER_WAIT_S = 15


RUNTIMES = ("loop", "faust")


@dataclass(frozen=True)
class Decider:
    """A decider ready to run (on aiokafka's batch API, or on faust), and the policy active when
    it starts."""

    app: Any  # the faust.App (runtime "faust"; faust ships no type information) or a DeciderLoop
    version: str
    digest: str
    from_file: bool  # whether the active policy is the --policy file's (else the log's)


@dataclass(frozen=True)
class WorkerSettings:
    """How a data-plane worker calls the providers (the options of ``nexuscore run worker``)."""

    simulated_url: str | None = None
    routes: dict[str, str] | None = None
    concurrency: int = 256
    tenant_concurrency: int | None = None
    call_timeout_s: float = 30.0
    attempts: int = 3
    breaker_failures: int = 5
    breaker_cool_down_s: float = 10.0
    instance_id: str | None = None  # static group membership (unique per worker)


def bootstrap_policy(
    state: GovernanceState, policy_path: Path, signed: SignedPolicy, trust: TrustStore, now: datetime
) -> tuple[GovernanceState, PolicyStageChanged]:
    """The step that makes a decider's ``--policy`` file active while the governance log holds no
    active policy: a ``bootstrap`` event, judged by the rule every act is judged by (two distinct
    reviewers' signatures), with the state it leads to; refused with its reason."""
    signatures = [msgspec.to_builtins(x) for x in read_signatures(signatures_path(policy_path))]
    document = policy_path.read_bytes()
    event = bootstrap_event(
        signed, document, json.dumps({"signatures": signatures}), "nexuscore.decider", now
    )
    after, refused = judge(state, event, trust, now)
    if refused is not None:
        raise NexusError(f"{policy_path} cannot be the bootstrap policy: {refused}")
    return after, event


def prepare_decider(
    bootstrap: str,
    policy_path: Path,
    trust_store: Path,
    namespace: str = "",
    *,
    runtime: str = "loop",
    transactional: bool = False,
    instance_id: str | None = None,
    dedupe_window: timedelta = DEDUPE_WINDOW,
    answer_window: timedelta = ANSWER_WINDOW,
) -> Decider:
    """A decider caught up with the governance log: the policy the log made active, or the
    ``policy_path`` file (signed by trusted keys) bootstrapped onto the log while it has none.
    ``runtime`` picks the stream runtime (docs/decisions/0001-decider-runtime.md)."""
    if runtime not in RUNTIMES:
        raise NexusError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    check_instance_id(instance_id)
    if runtime == "faust" and process_login().protocol != "PLAINTEXT":
        raise NexusError(
            "the faust runtime cannot log in to the broker: use --runtime loop with a Kafka login"
        )
    clock = SystemClock()
    trust = load_trust_store(trust_store)
    signed = load_signed_policy(policy_path, trust, clock.now())
    topics = Topics(namespace)
    asyncio.run(wait_for_broker(bootstrap, BROKER_WAIT_S, login_options()))
    asyncio.run(ensure_topics(bootstrap, topics))
    holder = PolicyHolder(Registry())
    follower = GovernanceFollower(bootstrap, topics, trust, clock, holder)
    asyncio.run(follower.catch_up())
    if holder.registry.active is None:
        state, event = bootstrap_policy(holder.state, policy_path, signed, trust, clock.now())
        asyncio.run(publish_governance(bootstrap, topics, event))
        holder.state = state
    active = holder.registry.active
    assert active is not None
    if runtime == "loop":
        app: Any = DeciderLoop(
            bootstrap, holder, clock, topics=topics, reviewers=trust, follower=follower,
            instance_id=instance_id, transactional=transactional, dedupe_window=dedupe_window,
            answer_window=answer_window,
        )  # fmt: skip
    else:
        app, _ = build_decider(bootstrap, holder, clock, follower=follower, topics=topics)
    return Decider(app, active.policy.version, active.digest, active.digest == signed.policy.digest)


def run_decider(decider: Decider) -> None:
    """Run the decider in the foreground until SIGTERM or SIGINT (faust: its worker, headless)."""
    if isinstance(decider.app, DeciderLoop):
        loop = decider.app

        async def main() -> None:
            stop_on_signals(loop.stopping)
            await loop.run()

        asyncio.run(main())
        return
    worker = FaustWorker(decider.app, loglevel="WARNING", quiet=True)
    # faust's progress spinner sets the root logger to DEBUG, which makes every library debug call
    # build a log record (about 4% of the decider's time): we run headless, so drop it.
    worker.spinner = None
    worker.execute_from_commandline()


def run_worker(
    bootstrap: str, settings: WorkerSettings, namespace: str = "", ready: Callable[[], None] = lambda: None
) -> None:
    """Run a data-plane worker until SIGTERM or SIGINT (``ready``: called once it is set up)."""
    check_instance_id(settings.instance_id)

    async def main() -> None:
        adapters = default_adapters()
        clock = SystemClock()
        breaker = BreakerConfig(
            failure_threshold=settings.breaker_failures, cool_down_s=settings.breaker_cool_down_s
        )
        caller = Caller(
            adapters,
            clock,
            endpoint_override=settings.simulated_url,
            routes=settings.routes or {},
            retry=RetryPolicy(max_attempts=settings.attempts),
            circuits=CircuitBoard(clock, worker_id(), breaker),
            call_timeout_s=settings.call_timeout_s,
        )
        worker = Worker(
            bootstrap,
            caller,
            clock,
            topics=Topics(namespace),
            concurrency=settings.concurrency,
            tenant_concurrency=settings.tenant_concurrency,
            instance_id=settings.instance_id,
        )
        stop_on_signals(worker.stopping)
        ready()
        try:
            await worker.run()
        finally:
            for a in adapters.values():
                await a.aclose()

    asyncio.run(main())


def run_projector(
    bootstrap: str,
    evidence_dir: Path,
    *,
    signing_key: Path,
    trust_store: Path,
    policy: Path,
    keystore: Path | None = None,
    namespace: str = "",
    flush_interval_s: float = 1.0,
    flush_rows: int = 10_000,
    ready: Callable[[], None] = lambda: None,
) -> None:
    """Run the evidence projector until SIGTERM or SIGINT: rows placed by the home regions of
    ``policy``'s tenants, governance acts and reviews judged against ``trust_store``."""
    key = load_private_key(signing_key)
    trust = load_trust_store(trust_store)
    regions = {t.id: t.home_region for t in load_policy(policy).tenants}
    use_system_allocator()

    async def main() -> None:
        projector = Projector(
            bootstrap,
            evidence_dir,
            key,
            SystemClock(),
            regions=regions,
            keystore=content_keys(evidence_dir, keystore),
            topics=Topics(namespace),
            flush_interval_s=flush_interval_s,
            flush_rows=flush_rows,
            trust=trust,
        )
        stop_on_signals(projector.stopping)
        ready()
        await projector.run()

    asyncio.run(main())


def serve_provider(config: SimulatedProviderConfig, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run the simulated provider until SIGTERM or SIGINT (it announces its URL on stdout)."""
    try:
        serve_forever(config, host, port)
    except OSError as exc:
        raise NexusError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def run_local_broker(
    ready: Callable[[str], None], *, data_dir: Path | None = None, port: int | None = None
) -> None:
    """A local single-node KRaft broker until SIGTERM or Ctrl-C (``ready``: called with its
    bootstrap address); the jars are fetched once by Maven. With ``data_dir`` its log outlives it
    (on ``port``, or the port the folder was made with); without, it goes with it."""
    ensure_kafka_jars()
    # The handler is in place before the broker says it is ready: a SIGTERM right after that line
    # stops it cleanly (exit 0) instead of killing the process with its broker still running.
    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    try:
        with LocalKafka(data_dir=data_dir, port=port) as broker:
            ready(broker.start())
            with contextlib.suppress(KeyboardInterrupt):
                while not stopped.wait(0.5):
                    pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def stop_on_signals(event: asyncio.Event) -> None:
    """Set ``event`` on SIGTERM or SIGINT (the running loop's handlers)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
