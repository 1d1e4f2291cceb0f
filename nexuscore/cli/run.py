"""``nexuscore run``: one stage of the pipeline in the foreground."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated

import typer

from nexuscore.cli._common import (
    DEFAULT_POLICY_FILE,
    Bootstrap,
    EvidenceDir,
    KeystoreDir,
    MetricsPort,
    Namespace,
    PolicyFile,
    SignersTrust,
    SigningKey,
    required_signing_key,
    required_trust,
)
from nexuscore.kernel.errors import NexusError

# Lazy imports: nexuscore.services (and nexuscore.providers) load faust, aiokafka, duckdb and the
# HTTP clients, about a second; each command imports them when it runs, so `--help` stays fast.

app = typer.Typer(
    help="Run one stage of the pipeline in the foreground (stop with Ctrl-C or SIGTERM).",
    no_args_is_help=True,
)


@app.command("provider")
def run_provider(
    port: Annotated[int, typer.Option(help="Port to listen on (0 picks a free one).")] = 0,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 inside a container).")
    ] = "127.0.0.1",
    latency_ms: Annotated[float, typer.Option(min=0.0, help="Mean added latency per call.")] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of calls answered with HTTP 503.")
    ] = 0.0,
    rate_limit_rate: Annotated[
        float,
        typer.Option(
            min=0.0, max=1.0, help="Share of calls answered with HTTP 429 and a 'Retry-After: 0' header."
        ),
    ] = 0.0,
    timeout_rate: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of calls that hang for --hang-s seconds before answering (the client's timeout "
            "should fire first).",
        ),
    ] = 0.0,
    hang_s: Annotated[
        float, typer.Option(min=0.0, help="How long a call picked by --timeout-rate hangs, in seconds.")
    ] = 60.0,
    spike_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of calls given an extra latency spike of --spike-ms."),
    ] = 0.0,
    spike_ms: Annotated[
        float, typer.Option(min=0.0, help="Extra latency of a call picked by --spike-rate, in ms.")
    ] = 0.0,
    seed: Annotated[
        int, typer.Option(help="Seed of the latency and fault draws (each fault has its own sequence).")
    ] = 0,
    metrics_port: MetricsPort = 0,
) -> None:
    """The simulated model provider: an OpenAI-compatible chat-completions server on localhost.

    Faults are drawn per call, each from its own seeded sequence; when several fall on one call a hang
    wins over a 503, and a 503 over a 429. A running provider takes new settings without a restart:
    POST /_faults with a JSON object of the fields to change (error_rate, rate_limit_rate,
    timeout_rate, hang_s, spike_rate, spike_ms, latency_ms, latency_jitter_ms, output_tokens, seed)
    answers the new configuration, or HTTP 400 naming the problem; GET /_faults shows it."""
    observe_stage("provider", metrics_port)
    from nexuscore.providers import SimulatedProviderConfig
    from nexuscore.services import serve_provider

    config = SimulatedProviderConfig(
        latency_ms=latency_ms,
        error_rate=error_rate,
        rate_limit_rate=rate_limit_rate,
        timeout_rate=timeout_rate,
        hang_s=hang_s,
        spike_rate=spike_rate,
        spike_ms=spike_ms,
        seed=seed,
    )
    serve_provider(config, host, port)


@app.command("decider")
def run_decider(
    bootstrap: Bootstrap,
    policy: PolicyFile,
    trust_store: SignersTrust = None,
    namespace: Namespace = "",
    runtime: Annotated[
        str,
        typer.Option(
            help="loop: aiokafka's batch API, outputs then state then offsets (the default); faust: the faust agent."
        ),
    ] = "loop",
    transactional: Annotated[
        bool,
        typer.Option(help="loop only: a Kafka transaction per batch instead of ordered idempotent writes."),
    ] = False,
    instance_id: Annotated[
        str | None,
        typer.Option(
            help="loop only: this decider's static group membership id (a restart takes its partitions back at once); unique per decider.",
            envvar="NEXUSCORE_DECIDER_ID",
        ),
    ] = None,
    dedupe_window_s: Annotated[
        float,
        typer.Option(
            min=1.0,
            max=7 * 86400.0,
            help="loop only: how long after its decision a request id is still recognised (a resubmission within it gets the first decision; later, a second one). Memory grows with it: about 1 KB per request.",
        ),
    ] = 900.0,  # nexuscore.streams.DEDUPE_WINDOW (not imported: the CLI starts without aiokafka)
    answer_window_s: Annotated[
        float,
        typer.Option(
            min=1.0, max=7 * 86400.0, help="loop only: how long the offline mode's cache keeps an answer."
        ),
    ] = 300.0,  # nexuscore.streams.ANSWER_WINDOW
    metrics_port: MetricsPort = 0,
) -> None:
    """The decision agent: residency, routing, budget and decode for every request.

    Policies come from the governance topic (promotions are taken up without a restart); POLICY is
    the bootstrap, made active only while the log has no active policy, and only if two trusted
    reviewers signed it (POLICY.sig.json). An untrusted policy is refused with one reason
    (unsigned, bad_signature, unknown_key, revoked_key, expired, invalid_content)."""
    observe_stage("decider", metrics_port)
    from nexuscore import services

    decider = services.prepare_decider(
        bootstrap, policy, required_trust(trust_store), namespace,
        runtime=runtime, transactional=transactional, instance_id=instance_id,
        dedupe_window=timedelta(seconds=dedupe_window_s), answer_window=timedelta(seconds=answer_window_s),
    )  # fmt: skip
    source = "" if decider.from_file else f" (from the governance log; {policy} not used)"
    print(f"decider ready: policy {decider.version} {decider.digest} active{source}", flush=True)
    services.run_decider(decider)


def observe_stage(stage: str, metrics_port: int) -> None:
    """Prometheus metrics on ``metrics_port`` (0: off); OpenTelemetry spans if the OTEL_* environment
    variables configure an exporter (else none)."""
    from nexuscore.observe import configure_tracing, serve_metrics

    serve_metrics(metrics_port)
    configure_tracing(stage)


def parse_routes(route: list[str]) -> dict[str, str]:
    """--route DEPLOYMENT=URL options as {deployment: url}."""
    routes: dict[str, str] = {}
    for r in route:
        deployment, sep, url = r.partition("=")
        if not sep or not deployment or not url:
            raise NexusError(f"--route takes DEPLOYMENT=URL, not {r!r}")
        routes[deployment] = url
    return routes


@app.command("worker")
def run_worker(
    bootstrap: Bootstrap,
    namespace: Namespace = "",
    simulated_url: Annotated[
        str | None, typer.Option(help="Send every call to this simulated OpenAI-compatible provider.")
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Concurrent model calls.")] = 256,
    tenant_concurrency: Annotated[
        int | None,
        typer.Option(min=1, help="Concurrent calls one tenant may hold (its bulkhead); default a quarter."),
    ] = None,
    call_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds one provider call may take.")] = 30.0,
    attempts: Annotated[
        int, typer.Option(min=1, help="Attempts per deployment (retries on 429, 5xx and timeouts).")
    ] = 3,
    breaker_failures: Annotated[
        int, typer.Option(min=1, help="Consecutive failures that open a deployment's circuit.")
    ] = 5,
    breaker_cool_down: Annotated[
        float, typer.Option(min=0.1, help="Seconds an open circuit waits before one probe call.")
    ] = 10.0,
    route: Annotated[
        list[str] | None,
        typer.Option(
            help="DEPLOYMENT=URL: send this deployment's calls to this simulated provider (repeatable; "
            "overrides --simulated-url for it)."
        ),
    ] = None,
    metrics_port: MetricsPort = 0,
    instance_id: Annotated[
        str | None,
        typer.Option(
            help="This worker's static group membership id (a restart takes its partitions back at once); unique per worker.",
            envvar="NEXUSCORE_WORKER_ID",
        ),
    ] = None,
) -> None:
    """The data-plane worker: calls the chosen deployment for each dispatch, records attempts and outcome.

    Retries 429, 5xx and timeouts with full jitter; fails over along the decision's fallbacks (never
    outside its allowed regions); keeps a circuit breaker per deployment, shared with the other
    workers through the circuits topic; caps each tenant's concurrent calls (bulkhead)."""
    routes = parse_routes(route or [])
    observe_stage("worker", metrics_port)
    from nexuscore import services

    settings = services.WorkerSettings(
        simulated_url=simulated_url,
        routes=routes,
        concurrency=concurrency,
        tenant_concurrency=tenant_concurrency,
        call_timeout_s=call_timeout,
        attempts=attempts,
        breaker_failures=breaker_failures,
        breaker_cool_down_s=breaker_cool_down,
        instance_id=instance_id,
    )
    services.run_worker(bootstrap, settings, namespace, ready=lambda: print("worker ready", flush=True))


@app.command("projector")
def run_projector(
    bootstrap: Bootstrap,
    signing_key: SigningKey = None,
    evidence_dir: EvidenceDir = Path("evidence"),
    policy: Annotated[
        Path, typer.Option("--policy", "-p", help="Policy whose tenants' home regions place the evidence.")
    ] = DEFAULT_POLICY_FILE,
    keystore: KeystoreDir = None,
    trust_store: Annotated[
        Path | None,
        typer.Option(
            "--trust-store",
            "-t",
            help="The deciders' trust store: governance acts and reviews are judged against it; refused ones go to the refusals table.",
            envvar="NEXUSCORE_TRUST_STORE",
        ),
    ] = None,
    namespace: Namespace = "",
    flush_interval: Annotated[float, typer.Option(min=0.01, help="Seconds between flushes.")] = 1.0,
    flush_rows: Annotated[int, typer.Option(min=1, help="Flush early after this many events.")] = 10_000,
    metrics_port: MetricsPort = 0,
) -> None:
    """The evidence projector: every event on every topic into sealed Parquet tables.

    Rows go under region=<tenant's home region>/<table>/; prompts and responses are encrypted with
    the tenant's key; every flush is sealed in the manifest, whose head is signed with --signing-key.
    Resumes from its own manifest after any crash: exactly once, from the log alone. Governance
    acts and reviews are judged with the deciders' own rules against --trust-store (the same file
    the deciders use): accepted ones enter policy_events, kill_switches and reviews, refused ones
    the refusals table, with the reason.
    """
    key, trust = required_signing_key(signing_key), required_trust(trust_store)
    observe_stage("projector", metrics_port)
    from nexuscore import services

    services.run_projector(
        bootstrap,
        evidence_dir,
        signing_key=key,
        trust_store=trust,
        policy=policy,
        keystore=keystore,
        namespace=namespace,
        flush_interval_s=flush_interval,
        flush_rows=flush_rows,
        ready=lambda: print("projector ready", flush=True),
    )


@app.command("init-topics")
def run_init_topics(
    bootstrap: Bootstrap,
    namespace: Namespace = "",
    partitions: Annotated[
        int, typer.Option(min=1, help="Partitions of each topic (governance: always 1).")
    ] = 4,
    wait: Annotated[float, typer.Option(min=0.0, help="Seconds to wait for the broker to answer.")] = 60.0,
) -> None:
    """Create the pipeline's topics (and the decider's changelogs) that do not exist yet, then exit.

    A deployment's one-shot init: the stages also create missing topics when they start, but a
    topic made up front gets the partition count chosen here, before any producer writes to it."""
    from nexuscore import services

    created = services.init_topics(bootstrap, namespace, partitions, wait)
    print(f"topics ready on {bootstrap}: {created} topics", flush=True)


@app.command("broker")
def run_broker(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Keep the broker's log in this folder across restarts (default: a temporary folder, deleted on exit)."
        ),
    ] = None,
    port: Annotated[
        int,
        typer.Option(
            min=0, max=65535, help="Client port (0: a free one; with --data-dir, the one it was made with)."
        ),
    ] = 0,
) -> None:
    """A local single-node KRaft Kafka broker on 127.0.0.1 until Ctrl-C (jars fetched once by Maven)."""
    from nexuscore import services

    def ready(bootstrap: str) -> None:
        print(f"kafka broker listening on {bootstrap} (export NEXUSCORE_BOOTSTRAP={bootstrap})", flush=True)

    services.run_local_broker(ready, data_dir=data_dir, port=port or None)
