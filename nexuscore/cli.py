"""The ``nexuscore`` command line: a thin shell over the library. Every error is one line."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import enum
import json
import logging
import signal
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import msgspec
import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from nexuscore._text import safe_rich_text, safe_text
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH, load_policy

if TYPE_CHECKING:
    from nexuscore.policy import RoutingPolicy, TrustStore
    from nexuscore.projections import EvidenceStore, VerifyReport

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="NexusCore: a governed LLM gateway. Decides which model may answer, where, under which budget "
    "and decode strategy, and records every decision as queryable evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
run_app = typer.Typer(
    help="Run one stage of the pipeline in the foreground (stop with Ctrl-C or SIGTERM).",
    no_args_is_help=True,
)
evidence_app = typer.Typer(
    help="The evidence store: query it, report on it, verify it, prove what it holds, erase content.",
    no_args_is_help=True,
)
policy_app = typer.Typer(
    help="Routing policies: show, diff, sign and verify them; manage the keys trusted to sign.",
    no_args_is_help=True,
)
review_app = typer.Typer(
    help="The escalation boundary: requests waiting for a person. List them, look at one, approve "
    "(the request resumes) or deny it (it ends); either way your identity and reason are evidence.",
    no_args_is_help=True,
)
control_app = typer.Typer(
    help="Kill switches: turn inference off, or offline (cached answers only, tools disabled), "
    "globally or for one tenant or feature, in seconds and without a restart; then on again.",
    no_args_is_help=True,
)
app.add_typer(run_app, name="run")
app.add_typer(evidence_app, name="evidence")
app.add_typer(policy_app, name="policy")
app.add_typer(review_app, name="review")
app.add_typer(control_app, name="control")

EvidenceDir = Annotated[
    Path,
    typer.Option(
        "--evidence-dir", "-e", help="Folder of the evidence tables.", envvar="NEXUSCORE_EVIDENCE_DIR"
    ),
]
Bootstrap = Annotated[
    str,
    typer.Option(
        "--bootstrap", "-b", help="Kafka bootstrap servers, host:port.", envvar="NEXUSCORE_BOOTSTRAP"
    ),
]
Namespace = Annotated[
    str,
    typer.Option("--namespace", help="Prefix of topic and group names (isolates pipelines on one broker)."),
]
PolicyFile = Annotated[Path, typer.Option("--policy", "-p", help="RoutingPolicy YAML file.")]
KeystoreDir = Annotated[
    Path | None,
    typer.Option(
        "--keystore",
        help="Folder of the tenants' content keys (default: _keys inside the evidence folder).",
        envvar="NEXUSCORE_KEYSTORE",
    ),
]
SigningKey = Annotated[
    Path | None,
    typer.Option(
        "--signing-key",
        help="Ed25519 private key (PEM) that signs the evidence manifest (`nexuscore evidence keygen`).",
        envvar="NEXUSCORE_EVIDENCE_SIGNING_KEY",
    ),
]
PublicKey = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        help="The trusted Ed25519 public key (PEM) of the evidence signer; defaults to the one of "
        "NEXUSCORE_EVIDENCE_SIGNING_KEY.",
        envvar="NEXUSCORE_EVIDENCE_PUBLIC_KEY",
    ),
]


class OutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


Format = Annotated[
    OutputFormat, typer.Option("--format", "-f", help="How to write the rows (parquet needs --output).")
]
Output = Annotated[
    Path | None, typer.Option("--output", "-o", help="Write to this file instead of the terminal.")
]
Since = Annotated[
    str | None, typer.Option(help="From this date or time on (ISO 8601; UTC unless it names a zone).")
]
Until = Annotated[
    str | None, typer.Option(help="Before this date or time (ISO 8601; UTC unless it names a zone).")
]
Tenant = Annotated[str | None, typer.Option(help="Only this tenant.")]
# Request ids are unique per tenant only: commands about one request take its tenant when the id is
# ambiguous.
RequestTenant = Annotated[
    str | None,
    typer.Option("--tenant", help="The request's tenant (needed when several tenants used the id)."),
]


@app.command()
def demo(
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=1, help="How many synthetic requests to send.")
    ] = 1000,
    evidence_dir: EvidenceDir = Path("evidence"),
    policy: PolicyFile = DEFAULT_POLICY_PATH,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for every request to reach a terminal state.")
    ] = 600.0,
    keys_dir: Annotated[
        Path | None,
        typer.Option(
            "--keys-dir",
            help="Folder of the demo's signing keys, outside the evidence folder (default: "
            "EVIDENCE_DIR.keys beside it).",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline on a local Kafka broker with synthetic traffic, then summarise.

    Starts (or reuses, with NEXUSCORE_BOOTSTRAP) a broker, the simulated provider, the decision agent,
    a worker and the projector; publishes N requests from several tenants plus a few malformed
    messages; exits 0 only once every request has exactly one terminal state in the evidence.
    """
    from nexuscore._demo import run_demo
    from nexuscore.projections import EvidenceStore

    run_demo(requests, evidence_dir, policy, timeout, console, keys_dir=keys_dir)
    with EvidenceStore(evidence_dir.resolve()) as store:
        _print(
            store.query(
                "SELECT tenant_id, coalesce(tier, '-') AS tier, state, count(*) AS requests, "
                "round(sum(coalesce(o.cost_micros, 0)) / 1e6, 4) AS cost_usd "
                "FROM terminal_states t LEFT JOIN decisions d USING (request_id, tenant_id) "
                "LEFT JOIN outcomes o USING (request_id, tenant_id) GROUP BY ALL ORDER BY ALL"
            ),
            "table",
            "Who routed what (by tenant, tier and terminal state)",
        )
    console.print(
        f"evidence: {evidence_dir.resolve()}  (try: nexuscore evidence who-routed-what -e {evidence_dir})"
    )


# --- run -----------------------------------------------------------------------------------------


@run_app.command("provider")
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
) -> None:
    """The simulated model provider: an OpenAI-compatible chat-completions server on localhost.

    Faults are drawn per call, each from its own seeded sequence; when several fall on one call a hang
    wins over a 503, and a 503 over a 429. A running provider takes new settings without a restart:
    POST /_faults with a JSON object of the fields to change (error_rate, rate_limit_rate,
    timeout_rate, hang_s, spike_rate, spike_ms, latency_ms, latency_jitter_ms, output_tokens, seed)
    answers the new configuration, or HTTP 400 naming the problem; GET /_faults shows it."""
    from nexuscore.providers import SimulatedProviderConfig, serve_forever

    try:
        serve_forever(
            SimulatedProviderConfig(
                latency_ms=latency_ms,
                error_rate=error_rate,
                rate_limit_rate=rate_limit_rate,
                timeout_rate=timeout_rate,
                hang_s=hang_s,
                spike_rate=spike_rate,
                spike_ms=spike_ms,
                seed=seed,
            ),
            host,
            port,
        )
    except OSError as exc:
        raise NexusError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


@run_app.command("decider")
def run_decider(
    bootstrap: Bootstrap,
    policy: PolicyFile,
    trust_store: Annotated[
        Path | None,
        typer.Option(
            "--trust-store", "-t", help="Trusted policy signers (YAML).", envvar="NEXUSCORE_TRUST_STORE"
        ),
    ] = None,
    namespace: Namespace = "",
) -> None:
    """The decision agent (faust): residency, routing, budget and decode for every request.

    Policies come from the governance topic (promotions are taken up without a restart); POLICY is
    the bootstrap, made active only while the log has no active policy, and only if two trusted
    reviewers signed it (POLICY.sig.json). An untrusted policy is refused with one reason
    (unsigned, bad_signature, unknown_key, revoked_key, expired, invalid_content)."""
    from faust.worker import Worker as FaustWorker

    from nexuscore._broker import wait_for_broker
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.policy import (
        Registry,
        judge,
        load_signed_policy,
        load_trust_store,
        read_signatures,
        signatures_path,
    )
    from nexuscore.streams import (
        GovernanceFollower,
        PolicyHolder,
        bootstrap_event,
        build_decider,
        publish_governance,
    )
    from nexuscore.transport import Topics, ensure_topics

    clock = SystemClock()
    trust = load_trust_store(_required_trust(trust_store))
    signed = load_signed_policy(policy, trust, clock.now())
    topics = Topics(namespace)
    asyncio.run(wait_for_broker(bootstrap, 15))
    asyncio.run(ensure_topics(bootstrap, topics))
    holder = PolicyHolder(Registry())
    follower = GovernanceFollower(bootstrap, topics, trust, clock, holder)
    asyncio.run(follower.catch_up())
    if holder.registry.active is None:
        signatures = json.dumps(
            {"signatures": [msgspec.to_builtins(x) for x in read_signatures(signatures_path(policy))]}
        )
        event = bootstrap_event(signed, policy.read_bytes(), signatures, "nexuscore.decider", clock.now())
        state, refused = judge(holder.state, event, trust, clock.now())
        if refused is not None:
            raise NexusError(f"{policy} cannot be the bootstrap policy: {refused}")
        asyncio.run(publish_governance(bootstrap, topics, event))
        holder.state = state
    active = holder.registry.active
    assert active is not None
    faust_app, _ = build_decider(bootstrap, holder, clock, follower=follower, topics=topics)
    print(
        f"decider ready: policy {active.policy.version} {active.digest} active"
        f"{'' if active.digest == signed.policy.digest else f' (from the governance log; {policy} not used)'}",
        flush=True,
    )
    worker = FaustWorker(faust_app, loglevel="WARNING", quiet=True)
    # faust's progress spinner sets the root logger to DEBUG, which makes every library debug call
    # build a log record (about 4% of the decider's time): we run headless, so drop it.
    worker.spinner = None
    worker.execute_from_commandline()


@run_app.command("worker")
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
) -> None:
    """The data-plane worker: calls the chosen deployment for each dispatch, records attempts and outcome.

    Retries 429, 5xx and timeouts with full jitter; fails over along the decision's fallbacks (never
    outside its allowed regions); keeps a circuit breaker per deployment, shared with the other
    workers through the circuits topic; caps each tenant's concurrent calls (bulkhead)."""
    from nexuscore.core import BreakerConfig
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.streams import Caller, CircuitBoard, RetryPolicy, Worker, default_adapters, worker_id
    from nexuscore.transport import Topics

    routes: dict[str, str] = {}
    for r in route or []:
        deployment, sep, url = r.partition("=")
        if not sep or not deployment or not url:
            raise NexusError(f"--route takes DEPLOYMENT=URL, not {r!r}")
        routes[deployment] = url

    async def main() -> None:
        adapters = default_adapters()
        clock = SystemClock()
        board = CircuitBoard(
            clock,
            worker_id(),
            BreakerConfig(failure_threshold=breaker_failures, cool_down_s=breaker_cool_down),
        )
        caller = Caller(
            adapters,
            clock,
            endpoint_override=simulated_url,
            routes=routes,
            retry=RetryPolicy(max_attempts=attempts),
            circuits=board,
            call_timeout_s=call_timeout,
        )
        worker = Worker(
            bootstrap,
            caller,
            clock,
            topics=Topics(namespace),
            concurrency=concurrency,
            tenant_concurrency=tenant_concurrency,
        )
        _stop_on_signals(worker.stopping)
        print("worker ready", flush=True)
        try:
            await worker.run()
        finally:
            for a in adapters.values():
                await a.aclose()

    asyncio.run(main())


@run_app.command("projector")
def run_projector(
    bootstrap: Bootstrap,
    signing_key: SigningKey = None,
    evidence_dir: EvidenceDir = Path("evidence"),
    policy: Annotated[
        Path, typer.Option("--policy", "-p", help="Policy whose tenants' home regions place the evidence.")
    ] = DEFAULT_POLICY_PATH,
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
) -> None:
    """The evidence projector: every event on every topic into sealed Parquet tables.

    Rows go under region=<tenant's home region>/<table>/; prompts and responses are encrypted with
    the tenant's key; every flush is sealed in the manifest, whose head is signed with --signing-key.
    Resumes from its own manifest after any crash: exactly once, from the log alone. Governance
    acts and reviews are judged with the deciders' own rules against --trust-store (the same file
    the deciders use): accepted ones enter policy_events, kill_switches and reviews, refused ones
    the refusals table, with the reason.
    """
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.kernel.signing import load_private_key
    from nexuscore.policy import load_trust_store
    from nexuscore.projections import LocalKeyStore, Projector
    from nexuscore.transport import Topics

    key = load_private_key(_required_key(signing_key))
    trust = load_trust_store(_required_trust(trust_store))
    regions = {t.id: t.home_region for t in load_policy(policy).tenants}

    async def main() -> None:
        projector = Projector(
            bootstrap,
            evidence_dir,
            key,
            SystemClock(),
            regions=regions,
            keystore=LocalKeyStore(keystore or evidence_dir / "_keys"),
            topics=Topics(namespace),
            flush_interval_s=flush_interval,
            flush_rows=flush_rows,
            trust=trust,
        )
        _stop_on_signals(projector.stopping)
        print("projector ready", flush=True)
        await projector.run()

    asyncio.run(main())


@run_app.command("broker")
def run_broker() -> None:
    """A local single-node KRaft Kafka broker on 127.0.0.1 until Ctrl-C (jars fetched once by Maven)."""
    from nexuscore._broker import LocalKafka, ensure_kafka_jars

    ensure_kafka_jars()
    with LocalKafka() as broker:
        bootstrap = broker.start()
        print(f"kafka broker listening on {bootstrap} (export NEXUSCORE_BOOTSTRAP={bootstrap})", flush=True)
        stop = False

        def _stop(*_: object) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, _stop)
        try:
            while not stop:
                signal.pause() if hasattr(signal, "pause") else None
        except KeyboardInterrupt:
            pass


# --- evidence ------------------------------------------------------------------------------------


def _store(evidence_dir: Path, keystore: Path | None) -> EvidenceStore:
    from nexuscore.projections import EvidenceStore, LocalKeyStore

    return EvidenceStore(evidence_dir, LocalKeyStore(keystore or evidence_dir / "_keys"))


@evidence_app.command("sql")
def evidence_sql(
    query: Annotated[str, typer.Argument(help="One DuckDB SELECT statement over the evidence views.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Run one SELECT over the evidence views: requests, decisions, decision_reasons, rejections,
    dispatches, attempts, outcomes, settlements, escalations, reviews, resolutions, policy_events,
    shadow_decisions, circuit_events, kill_switches, deadletters, terminal_states.

    Read-only: any other statement (COPY, SET, ATTACH, INSTALL, ...) or a second one is refused,
    and the query can read no file but the views' sealed Parquet files (exit 2 otherwise)."""
    with _store(evidence_dir, None) as store:
        _print(store.query(query), fmt, output=output)


@evidence_app.command("who-routed-what")
def evidence_who_routed_what(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    feature: Annotated[str | None, typer.Option(help="Only this feature.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model or deployment id.")] = None,
    tier: Annotated[str | None, typer.Option(help="Only this tier (small, mid, frontier).")] = None,
    policy_version: Annotated[str | None, typer.Option(help="Only decisions of this policy version.")] = None,
    since: Since = None,
    until: Until = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Which model served whom: requests by tenant, feature, verdict, tier, deployment, model, region
    and policy version, with estimated and actual cost."""
    with _store(evidence_dir, None) as store:
        table = store.who_routed_what(
            tenant,
            _parse_time(since, "--since"),
            _parse_time(until, "--until"),
            feature=feature,
            model=model,
            tier=tier,
            policy_version=policy_version,
        )
        _print(table, fmt, "Who routed what", output)


@evidence_app.command("lineage")
def evidence_lineage(
    request_id: Annotated[str, typer.Argument(help="The request to trace.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    keystore: KeystoreDir = None,
    tenant: RequestTenant = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Every event of one request, in order: what the model received, which policy and model version
    served it, where the data went and under which transfer basis, what it cost."""
    with _store(evidence_dir, keystore) as store:
        table = store.lineage(request_id, tenant)
        if table.num_rows == 0:
            raise NexusError(f"no events of request {request_id!r} in the evidence under {evidence_dir}")
        _print(table, fmt, f"Lineage of {request_id}", output)


@evidence_app.command("spend")
def evidence_spend(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    since: Since = None,
    until: Until = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Spend by tenant, feature, day and model, with the tenant's daily budget and its utilisation."""
    with _store(evidence_dir, None) as store:
        table = store.spend(tenant, _parse_time(since, "--since"), _parse_time(until, "--until"))
        _print(table, fmt, "Spend", output)


@evidence_app.command("residency")
def evidence_residency(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Residency audit: every call outside its tenant's home region, with its transfer basis.

    Exits 1 if any call went outside the regions its decision allowed (that list must be empty).
    """
    with _store(evidence_dir, None) as store:
        table = store.residency(tenant)
    _print(table, fmt, "Cross-border and out-of-region calls", output)
    breaches = sum(1 for f in table.column("finding").to_pylist() if f != "cross_border")
    if breaches:
        err_console.print(f"[red]{breaches} call(s) outside the allowed regions or without a decision[/]")
        raise typer.Exit(1)


@evidence_app.command("escalations")
def evidence_escalations(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    state: Annotated[
        str | None, typer.Option(help="Only this review state: pending, approved, denied, timed_out.")
    ] = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Requests escalated to a person: why, under which policy, and what the review decided."""
    with _store(evidence_dir, None) as store:
        _print(store.escalations(tenant, state), fmt, "Escalations", output)


@evidence_app.command("report")
def evidence_report(
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path(
        "evidence-report.html"
    ),
    evidence_dir: EvidenceDir = Path("evidence"),
    public_key: PublicKey = None,
) -> None:
    """One self-contained HTML report (no scripts, no network): spend over time, tier mix, decisions
    per policy version, residency and escalations. With a public key, the evidence is verified first
    and the result printed at the top."""
    from nexuscore.projections import render_html

    verified = "Not verified (pass --public-key to verify before reporting)."
    if public_key is not None or _env_key_available():
        report = _verify(evidence_dir, public_key, [], None, quiet=True)
        verified = (
            f"Verified: {report.rows:,} events in {report.files:,} sealed files; manifest of "
            f"{report.signed_entries:,} entries signed by key {report.head.get('key_id')}."
            if report.ok
            else f"VERIFICATION FAILED: {sum(f.fatal for f in report.findings)} problem(s); run nexuscore evidence verify."
        )
    with _store(evidence_dir, None) as store:
        page = render_html(store, datetime.now(UTC), verified)
    try:
        output.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise NexusError(f"cannot write {output}: {exc.strerror}") from exc
    console.print(f"wrote {output} ({len(page) / 1024:.0f} KiB)")


@evidence_app.command("verify")
def evidence_verify(
    evidence_dir: EvidenceDir = Path("evidence"),
    public_key: PublicKey = None,
    policy: Annotated[
        list[Path] | None,
        typer.Option(
            "--policy",
            "-p",
            help="A policy whose digest decisions may carry (repeatable); the bundled policies and "
            "those in the policy_events table are always known.",
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Require a terminal state only of requests before this time (a live pipeline)."),
    ] = None,
    keystore: KeystoreDir = None,
) -> None:
    """Check the evidence is complete and unaltered; name every gap; exit 1 on any.

    Re-hashes the manifest chain and checks its signed head with the trusted key; recomputes each
    file's sha256 and the Merkle root of its rows; checks every offset of every partition is
    accounted for; that the folder holds nothing the manifest does not name; that every content
    key the evidence uses is in the keystore, or was destroyed by `evidence erase` (a signed
    record); and that every request has exactly one terminal state, every decision a request
    and a known policy, every outcome a decision, and no event appears twice.
    """
    until_time = _parse_time(until, "--until")
    report = _verify(evidence_dir, public_key, policy or [], until_time, quiet=False, keystore=keystore)
    for f in report.findings:
        style = "red" if f.fatal else "yellow"
        console.print(f"[{style}]{f.kind}[/] {f.where}: {f.detail}", highlight=False, soft_wrap=True)
    rate = report.rows / report.seconds if report.seconds else 0.0
    console.print(
        f"{report.rows:,} events in {report.files:,} files, {report.partitions} partitions, "
        f"{report.requests:,} requests; manifest {report.signed_entries:,} signed entries "
        f"(key {report.head.get('key_id', '-')}); {report.seconds:.1f} s ({rate:,.0f} events/s)"
    )
    if not report.ok:
        console.print(f"[red]FAILED[/]: {sum(f.fatal for f in report.findings)} problem(s)")
        raise typer.Exit(1)
    console.print("[green]OK[/]: complete and unaltered")


@evidence_app.command("prove")
def evidence_prove(
    request_id: Annotated[str, typer.Argument(help="The request whose events to prove.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: RequestTenant = None,
    public_key: PublicKey = None,
    output: Output = None,
) -> None:
    """Print an inclusion proof (JSON) of every stored event of a request against the signed head.

    The README shows how to check it independently with sha256 and Ed25519 alone.
    """
    from nexuscore.kernel.signing import load_public_key
    from nexuscore.projections import check_proof, prove

    proof = prove(evidence_dir, request_id, tenant)
    text = json.dumps(proof, indent=2) + "\n"
    if public_key is not None or _env_key_available():
        from cryptography.hazmat.primitives import serialization

        key = load_public_key(_public_key_path(public_key))
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        problems = check_proof(proof, raw)
        if problems:
            raise NexusError("the proof does not hold: " + "; ".join(problems))
        err_console.print(f"proof of {len(proof['events'])} events checks out against the trusted key")
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {output}")


@evidence_app.command("erase")
def evidence_erase(
    tenant: Annotated[str, typer.Option(help="The tenant whose content keys to destroy.")],
    reason: Annotated[str, typer.Option(help="Why (kept with the erasure record).")],
    subject: Annotated[
        str | None, typer.Option(help="Only this data subject's key (the request's data_subject).")
    ] = None,
    evidence_dir: EvidenceDir = Path("evidence"),
    keystore: KeystoreDir = None,
    signing_key: SigningKey = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Destroy a tenant's (or one data subject's) content keys: their prompts and responses become
    unreadable for good, while every seal, and so `verify`, still holds. This cannot be undone.

    The key ids destroyed are first recorded in the evidence folder (erasures.jsonl), signed with
    the evidence signing key: `verify` accepts a key as gone only with such a record."""
    from nexuscore.kernel.signing import load_private_key
    from nexuscore.projections import LocalKeyStore, erase

    key = load_private_key(_required_key(signing_key))
    scope = f"tenant {tenant}" + (f", data subject {subject}" if subject else " (every data subject)")
    if not yes and not typer.confirm(f"Destroy the content keys of {scope}? This cannot be undone"):
        raise typer.Exit(1)
    keys = LocalKeyStore(keystore or evidence_dir / "_keys")
    erased = erase(evidence_dir, keys, key, tenant, subject, datetime.now(UTC), reason)
    if not erased:
        raise NexusError(
            f"no content keys of {scope} in the keystore (nothing was ever stored, or already erased)"
        )
    console.print(f"erased {len(erased)} key(s) of {scope}: {', '.join(erased)}")


@evidence_app.command("keygen")
def evidence_keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair.")] = Path("keys"),
    name: Annotated[str, typer.Option(help="File name stem.")] = "evidence-signing",
) -> None:
    """Create an Ed25519 key pair for signing the evidence manifest: NAME.pem (private, mode 0600)
    and NAME.pub (give it to whoever verifies)."""
    from nexuscore.kernel.signing import generate_keypair

    key_id = generate_keypair(out / f"{name}.pem", out / f"{name}.pub")
    console.print(f"key {key_id}: private {out / f'{name}.pem'}, public {out / f'{name}.pub'}")


@evidence_app.command("summary")
def evidence_summary(evidence_dir: EvidenceDir = Path("evidence")) -> None:
    """Counts: requests, requests with a terminal state, duplicates of terminal states, dead letters."""
    with _store(evidence_dir, None) as store:
        for k, v in store.terminal_summary().items():
            console.print(f"{k:>18}: {v}")


def _env_key_available() -> bool:
    import os

    return bool(
        os.environ.get("NEXUSCORE_EVIDENCE_PUBLIC_KEY") or os.environ.get("NEXUSCORE_EVIDENCE_SIGNING_KEY")
    )


def _public_key_path(public_key: Path | None) -> Path:
    import os

    if public_key is not None:
        return public_key
    signing = os.environ.get("NEXUSCORE_EVIDENCE_SIGNING_KEY")
    if signing:
        return Path(signing)
    raise NexusError(
        "no trusted key: pass --public-key (or set NEXUSCORE_EVIDENCE_PUBLIC_KEY) to the signer's public key"
    )


def _required_trust(trust_store: Path | None) -> Path:
    if trust_store is None:
        raise NexusError(
            "no trust store: pass --trust-store or set NEXUSCORE_TRUST_STORE "
            "(a YAML of trusted policy signers: `nexuscore policy keygen --trust-store FILE`)"
        )
    return trust_store


def _required_key(signing_key: Path | None) -> Path:
    if signing_key is None:
        raise NexusError(
            "no signing key: pass --signing-key or set NEXUSCORE_EVIDENCE_SIGNING_KEY "
            "(create one with `nexuscore evidence keygen`)"
        )
    return signing_key


def _verify(
    evidence_dir: Path,
    public_key: Path | None,
    policies: list[Path],
    until: datetime | None,
    *,
    quiet: bool,
    keystore: Path | None = None,
) -> VerifyReport:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nexuscore.kernel.signing import load_public_key
    from nexuscore.projections import LocalKeyStore, verify

    key = load_public_key(_public_key_path(public_key))
    if not (evidence_dir / "manifest.jsonl").exists():
        raise NexusError(
            f"no evidence manifest under {evidence_dir} (run the projector or pass --evidence-dir)"
        )
    # verify() adds the digests in policy_events itself, from the files that pass its checks: a
    # store opened here would fail on a missing file before verify could name it.
    known = {load_policy(p).digest for p in [*sorted(DEFAULT_POLICY_PATH.parent.glob("*.yaml")), *policies]}
    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as progress:
        task = progress.add_task("verify", total=None)
        return verify(
            evidence_dir,
            key,
            known,
            until=until,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            keystore=LocalKeyStore(keystore or evidence_dir / "_keys"),
        )


# --- replay and policy -----------------------------------------------------------------------------


@app.command()
def replay(
    policy: Annotated[
        Path | None, typer.Option("--policy", "-p", help="The candidate policy (signed).")
    ] = None,
    recorded: Annotated[
        bool,
        typer.Option(
            "--recorded",
            help="Verify mode: each request under the policy its decision recorded (from the "
            "governance events in the evidence, signatures checked); every decision must match.",
        ),
    ] = False,
    trust_store: Annotated[
        Path | None,
        typer.Option(
            "--trust-store", "-t", help="Trusted policy signers (YAML).", envvar="NEXUSCORE_TRUST_STORE"
        ),
    ] = None,
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's history.")] = None,
    since: Since = None,
    until: Until = None,
    show: Annotated[int, typer.Option(help="How many changed decisions to list.")] = 10,
    report_out: Annotated[
        Path | None,
        typer.Option(help="Write the report (JSON) here: what `policy promote --replay-report` takes."),
    ] = None,
    diff_out: Annotated[
        Path | None, typer.Option(help="Write every changed decision here (Parquet, one row each).")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    from_kafka: Annotated[
        bool,
        typer.Option(
            "--from-kafka",
            help="Replay what the topics hold (read afresh from offset 0 with --bootstrap/--namespace), "
            "not the evidence store.",
        ),
    ] = False,
    bootstrap: Annotated[
        str | None, typer.Option("--bootstrap", "-b", help="With --from-kafka.", envvar="NEXUSCORE_BOOTSTRAP")
    ] = None,
    namespace: Namespace = "",
) -> None:
    """Re-decide recorded requests under POLICY and report exactly what would change.

    With the policy that was recorded, every decision is reproduced exactly (0 changes). With a
    candidate, the budget state is re-simulated under its prices (recorded token usage): tier and
    model changes, cost deltas, budget denials, escalations, decode strategies and residency. A
    candidate that would send any request outside its allowed regions fails (exit 1). POLICY must be
    signed by a trusted key, as for the agents.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from nexuscore.policy import load_signed_policy, load_trust_store, replay_report_digest
    from nexuscore.projections import EvidenceStore
    from nexuscore.replay import replay as run_replay

    trust = load_trust_store(_required_trust(trust_store))
    if (policy is None) == (not recorded):
        raise NexusError("pass --policy CANDIDATE, or --recorded to verify against the recorded policies")
    candidate = load_signed_policy(policy, trust, datetime.now(UTC)).policy if policy is not None else None
    scratch = None
    if from_kafka:
        import tempfile

        from nexuscore.replay import project_log
        from nexuscore.transport import Topics

        if bootstrap is None:
            raise NexusError("--from-kafka needs --bootstrap (or NEXUSCORE_BOOTSTRAP)")
        regions = {t.id: t.home_region for t in (candidate or load_policy(DEFAULT_POLICY_PATH)).tenants}
        scratch = tempfile.TemporaryDirectory(prefix="nexuscore-replay-")
        evidence_dir = Path(scratch.name)
        reading_columns = (TextColumn("reading the log"), BarColumn(), MofNCompleteColumn())
        with Progress(*reading_columns, console=err_console, transient=True) as reading:
            task = reading.add_task("log", total=None)
            asyncio.run(
                project_log(
                    bootstrap,
                    Topics(namespace),
                    evidence_dir,
                    regions,
                    lambda done, total: reading.update(task, completed=done, total=total),
                    trust,
                )
            )
    known = _recorded_policies(evidence_dir, trust) if recorded else None
    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with (
        EvidenceStore(evidence_dir) as store,
        Progress(*columns, console=err_console, transient=True) as progress,
    ):
        task = progress.add_task("replaying", total=None)

        def tick(done: int, total: int) -> None:
            if done % 500 == 0 or done == total:
                progress.update(task, completed=done, total=total)

        report = run_replay(
            store,
            candidate,
            recorded_policies=known,
            tenant=tenant,
            since=_parse_time(since, "--since"),
            until=_parse_time(until, "--until"),
            progress=tick,
            keep_changes=10**9 if diff_out is not None else 1000,
        )
    r = report
    lines = [
        f"policy {r.policy_version} ({r.policy_digest})",
        f"requests replayed:     {r.requests}",
        f"decisions changed:     {r.changed}  (verdict {r.verdict_changes}, deployment {r.deployment_changes}, tier {r.tier_changes}, decode {r.decode_changes})",
        f"same decision, other context: {r.context_differences}",
        f"budget denials:        {r.recorded_budget_denials} -> {r.candidate_budget_denials}",
        f"escalations:           {r.recorded_escalations} -> {r.candidate_escalations}",
        f"residency changes:     {r.residency_changes} (allowed regions differ); breaches {r.residency_breaches}",
        f"estimated cost delta:  {r.estimated_delta_micros / 1e6:+.6f} USD  ({r.recorded_estimated_micros / 1e6:.6f} -> {r.candidate_estimated_micros / 1e6:.6f})",
        f"actual cost delta:     {r.actual_delta_micros / 1e6:+.6f} USD  (recorded usage repriced)",
    ]
    for line in lines:
        console.print(line, highlight=False)
    rows = [
        {
            "request_id": c.request_id,
            "tenant_id": c.tenant_id,
            "fields": ", ".join(c.fields),
            "recorded": json.dumps(c.recorded),
            "candidate": json.dumps(c.candidate),
        }
        for c in report.changes
    ]
    schema = pa.schema(
        [(n, pa.string()) for n in ("request_id", "tenant_id", "fields", "recorded", "candidate")]
    )
    if report.changes and show:
        _print(
            pa.Table.from_pylist(rows[:show], schema=schema),
            "table",
            f"First {min(show, len(rows))} changed decisions",
        )
    if diff_out is not None:
        _print(pa.Table.from_pylist(rows, schema=schema), "parquet", output=diff_out)
    if report_out is not None:
        data = json.dumps(
            {
                **report.summary(),
                "evidence": str(evidence_dir),
                "tenant": tenant,
                "since": since,
                "until": until,
            },
            indent=2,
            sort_keys=True,
        ).encode()
        report_out.write_bytes(data)
        console.print(f"report {report_out}: {replay_report_digest(data)}")
    if html is not None:
        from nexuscore.replay import render_replay_html

        html.write_text(render_replay_html(report, lines, rows[:500]), encoding="utf-8")
        err_console.print(f"wrote {html}")
    if report.residency_breaches:
        err_console.print(
            f"[red]FAILED[/]: the candidate sends {report.residency_breaches} request(s) outside their allowed regions"
        )
        raise typer.Exit(1)
    if recorded and report.changed + report.context_differences:
        err_console.print(
            f"[red]FAILED[/]: {report.changed + report.context_differences} recorded decision(s) not reproduced "
            f"({report.unknown_policies} under a policy not in the evidence)"
        )
        raise typer.Exit(1)


def _recorded_policies(evidence_dir: Path, trust: TrustStore) -> dict[str, RoutingPolicy]:
    """Every policy the governance events in the evidence carry whose signatures hold."""
    from nexuscore.policy import PolicySignature, check_signatures, parse_policy

    found: dict[str, RoutingPolicy] = {}
    with _store(evidence_dir, None) as store:
        # Checked as of their promotion: a signature that has expired since still proves who approved.
        rows = store.query(
            "SELECT policy_digest, document, signatures, min(occurred_at) AS at FROM policy_events GROUP BY ALL"
        ).to_pylist()
    for r in rows:
        try:
            p = parse_policy(r["document"], f"policy {r['policy_digest'][:19]}…")
            sigs = msgspec.json.decode(r["signatures"] or "{}", type=dict[str, list[PolicySignature]])
            check_signatures(p, r["document"].encode(), sigs.get("signatures", []), trust, r["at"])
        except NexusError as exc:
            err_console.print(f"[yellow]skipped[/] {exc}")
            continue
        found[p.digest] = p
    return found


TrustStoreFile = Annotated[
    Path,
    typer.Option(
        "--trust-store",
        "-t",
        help="YAML file of the trusted public keys and their roles.",
        envvar="NEXUSCORE_TRUST_STORE",
    ),
]
Role = Annotated[str, typer.Option(help="The signer's role: author, reviewer or operator.")]


@policy_app.command("show")
def policy_show(
    path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")],
    trust_store: Annotated[
        Path | None,
        typer.Option(
            "--trust-store",
            "-t",
            help="Check the signatures against this trust store.",
            envvar="NEXUSCORE_TRUST_STORE",
        ),
    ] = None,
) -> None:
    """Validate a policy file and print its version, digest, contents in brief and signatures."""
    from nexuscore.policy import check_signatures, load_trust_store, read_signatures, signatures_path

    p = load_policy(path)
    console.print(f"{p.name} {p.version}\ndigest {p.digest}")
    console.print(
        f"{len(p.deployments)} deployments in {', '.join(p.regions)}; {len(p.tenants)} tenants; "
        f"{len(p.routing.rules)} routing rules; {len(p.escalation)} escalation rules"
    )
    signatures = read_signatures(signatures_path(path))
    for sig in signatures:
        current = "" if sig.digest == p.digest else f"  [covers another digest {sig.digest[:19]}…]"
        console.print(
            f"signed by {sig.signer} as {sig.role} (key {sig.key_id}) at {sig.signed_at.isoformat()}, "
            f"expires {sig.expires_at.isoformat()}{current}",
            highlight=False,
        )
    if not signatures:
        console.print("unsigned")
    if trust_store is not None:
        signed = check_signatures(
            p,
            path.read_bytes(),
            signatures,
            load_trust_store(trust_store),
            datetime.now(UTC),
            source=str(path),
        )
        console.print(f"[green]trusted[/]: {len(signed.signatures)} valid signature(s)")


@policy_app.command("keygen")
def policy_keygen(
    name: Annotated[str, typer.Option(help="Who holds the key (a person or a pipeline).")],
    out: Annotated[Path, typer.Option(help="Folder for NAME.pem (private) and NAME.pub.")] = Path("keys"),
    trust_store: Annotated[
        Path | None, typer.Option("--trust-store", "-t", help="Also add the public key to this trust store.")
    ] = None,
    role: Annotated[
        list[str] | None, typer.Option(help="Role(s) in the trust store: author, reviewer, operator.")
    ] = None,
) -> None:
    """Create an Ed25519 key pair for signing policies (and optionally trust it)."""
    from nexuscore.kernel.signing import generate_keypair

    stem = name.replace("@", "_at_").replace("/", "_")
    key_id = generate_keypair(out / f"{stem}.pem", out / f"{stem}.pub")
    console.print(f"key {key_id} of {name}: private {out / f'{stem}.pem'}, public {out / f'{stem}.pub'}")
    if trust_store is not None:
        _trust_add(trust_store, out / f"{stem}.pub", name, role or ["reviewer"])


@policy_app.command("trust")
def policy_trust(
    trust_store: TrustStoreFile,
    public_key: Annotated[Path | None, typer.Option(help="Add this public key (PEM).")] = None,
    name: Annotated[str | None, typer.Option(help="Its holder, with --public-key.")] = None,
    role: Annotated[list[str] | None, typer.Option(help="Its role(s), with --public-key.")] = None,
    revoke: Annotated[str | None, typer.Option(help="Revoke this key id, from now on.")] = None,
) -> None:
    """List, add to or revoke keys of a trust store."""
    from nexuscore.policy import TrustStore, load_trust_store, save_trust_store

    if public_key is not None:
        if name is None:
            raise NexusError("--public-key needs --name")
        _trust_add(trust_store, public_key, name, role or ["reviewer"])
    if revoke is not None:
        store = load_trust_store(trust_store)
        key = store.get(revoke)
        if key is None:
            raise NexusError(f"{trust_store}: no key {revoke}")
        revoked = key.model_copy(update={"revoked_at": datetime.now(UTC)})
        save_trust_store(trust_store, TrustStore(keys=tuple(revoked if k is key else k for k in store.keys)))
        console.print(f"revoked key {revoke} ({key.name})")
    store = load_trust_store(trust_store) if trust_store.exists() else TrustStore()
    for k in store.keys:
        state = f"revoked {k.revoked_at.isoformat()}" if k.revoked_at else "active"
        console.print(f"{k.key_id}  {k.name:<24} {','.join(k.roles):<20} {state}", highlight=False)


def _trust_add(trust_store: Path, public_key: Path, name: str, roles: list[str]) -> None:
    from nexuscore.kernel.signing import load_public_key
    from nexuscore.policy import TrustStore, load_trust_store, save_trust_store, trusted_key_entry

    allowed = ("author", "reviewer", "operator")
    bad = [r for r in roles if r not in allowed]
    if bad:
        raise NexusError(f"unknown role(s) {', '.join(bad)}: use {', '.join(allowed)}")
    store = load_trust_store(trust_store) if trust_store.exists() else TrustStore()
    entry = trusted_key_entry(load_public_key(public_key), name, tuple(roles))  # type: ignore[arg-type]  # checked above
    if store.get(entry.key_id) is not None:
        raise NexusError(f"{trust_store} already holds key {entry.key_id}")
    save_trust_store(trust_store, TrustStore(keys=(*store.keys, entry)))
    console.print(f"trusted key {entry.key_id} of {name} as {', '.join(roles)} in {trust_store}")


@policy_app.command("sign")
def policy_sign(
    path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")],
    key: Annotated[Path, typer.Option(help="Your Ed25519 private key (PEM).")],
    signer: Annotated[str, typer.Option(help="Your name, as the trust store knows you.")],
    role: Role = "reviewer",
    valid_days: Annotated[int, typer.Option(min=1, help="Days until the signature expires.")] = 180,
) -> None:
    """Sign a policy: adds your signature over its digest to FILE.sig.json."""
    from datetime import timedelta

    from nexuscore.kernel.signing import load_private_key
    from nexuscore.policy import add_signature, sign, signatures_path

    if role not in ("author", "reviewer", "operator"):
        raise NexusError(f"unknown role {role}: use author, reviewer or operator")
    p = load_policy(path)
    sig = sign(
        p,
        path.read_bytes(),
        load_private_key(key),
        signer=signer,
        role=role,  # type: ignore[arg-type]  # checked above
        now=datetime.now(UTC),
        valid_for=timedelta(days=valid_days),
    )
    total = add_signature(signatures_path(path), sig)
    console.print(
        f"signed {p.digest} as {role} (key {sig.key_id}); {len(total)} signature(s) in {signatures_path(path)}"
    )


@policy_app.command("verify")
def policy_verify(
    path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")],
    trust_store: TrustStoreFile,
    min_signers: Annotated[int, typer.Option(min=1, help="Distinct valid signatures required.")] = 1,
) -> None:
    """Check a policy's signatures against the trust store, exactly as the agents do before using it.

    Exit 0 if it may be used; otherwise exit 2 with one reason: invalid_content, unsigned,
    unknown_key, revoked_key, expired, bad_signature or too_few_signatures."""
    from nexuscore.policy import load_signed_policy, load_trust_store

    signed = load_signed_policy(
        path, load_trust_store(trust_store), datetime.now(UTC), min_signers=min_signers
    )
    console.print(f"[green]OK[/]: {signed.policy.digest} signed by {'; '.join(signed.signers)}")


@policy_app.command("diff")
def policy_diff(
    old: Annotated[Path, typer.Argument(help="The policy in force.")],
    new: Annotated[Path, typer.Argument(help="The candidate.")],
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Every field that differs between two policies (deployments, tenants, features and rules matched
    by id). Exit 0 either way; the digests say whether they are the same policy."""
    from nexuscore.policy import policy_diff as diff

    a, b = load_policy(old), load_policy(new)
    rows = [
        {
            "path": path,
            "old": json.dumps(x) if x is not None else "(absent)",
            "new": json.dumps(y) if y is not None else "(absent)",
        }
        for path, x, y in diff(a, b)
    ]
    err_console.print(f"{a.digest} -> {b.digest}: {len(rows)} difference(s)")
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("path", pa.string()), ("old", pa.string()), ("new", pa.string())])
    )
    _print(table, fmt, "Policy differences", output)


@policy_app.command("promote")
def policy_promote(
    path: Annotated[Path, typer.Argument(help="The signed policy to promote.")],
    to: Annotated[str, typer.Option("--to", help="The next stage: draft, shadow, canary or active.")],
    key: Annotated[
        Path,
        typer.Option(
            "--key",
            help="The operator's Ed25519 private key (PEM) that signs the step; it must be in the trust store with the operator role.",
            envvar="NEXUSCORE_OPERATOR_KEY",
        ),
    ],
    bootstrap: Bootstrap,
    trust_store: TrustStoreFile,
    replay_report: Annotated[
        Path | None,
        typer.Option(
            help="The replay report of this exact policy (`replay --report-out`); canary and active need one."
        ),
    ] = None,
    canary_share: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of tenants (stable hash) a canary decides for.")
    ] = 0.0,
    reason: Annotated[str, typer.Option(help="Why (recorded in the evidence).")] = "",
    namespace: Namespace = "",
) -> None:
    """Move a policy one stage on (draft -> shadow -> canary -> active), as an event on the
    governance topic that every decider takes up without a restart.

    The step is signed with the operator's --key (the recorded actor is that key's name in the
    trust store) over the policy's digest and version, the stages, the canary share and the replay
    report's digest. Refused, with its reason, unless the step is the next one for this policy, its
    signatures hold against the trust store, canary and active come with the replay report of this
    exact digest, and active carries signatures of two distinct reviewers. Each decider, and the
    projector, judge all of it again; a refused step is recorded in the evidence's refusals."""
    from nexuscore._operations import promotion_event
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.policy import Registry, judge, load_trust_store
    from nexuscore.streams import GovernanceFollower, PolicyHolder, publish_governance
    from nexuscore.transport import Topics, ensure_topics

    clock = SystemClock()
    trust = load_trust_store(trust_store)
    report = _read_bytes(replay_report, "replay report") if replay_report is not None else b""
    topics = Topics(namespace)
    asyncio.run(ensure_topics(bootstrap, topics))
    holder = PolicyHolder(Registry())
    asyncio.run(GovernanceFollower(bootstrap, topics, trust, clock, holder).catch_up())
    now = clock.now()
    event = promotion_event(path, to, key, trust, holder.registry, report, canary_share, reason, now)
    _, refused = judge(holder.state, event, trust, now)
    if refused is not None:
        raise NexusError(
            f"promotion of {event.policy_version} ({event.policy_digest[:19]}…) to {to} refused: {refused}"
        )
    asyncio.run(publish_governance(bootstrap, topics, event))
    share = f" for {canary_share:.0%} of tenants" if to == "canary" else ""
    console.print(
        f"policy {event.policy_version} {event.policy_digest} is now {to}{share} "
        f"(was {event.from_stage or 'unknown'}), signed by {event.actor}",
        highlight=False,
    )


def _read_bytes(path: Path, what: str, limit: int = 16 * 1024 * 1024) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise NexusError(f"cannot read the {what} {path}: {exc.strerror}") from exc
    if len(data) > limit:
        raise NexusError(f"the {what} {path} is over {limit // (1024 * 1024)} MiB")
    return data


@policy_app.command("history")
def policy_history(
    evidence_dir: EvidenceDir = Path("evidence"),
    trust_store: Annotated[
        Path | None,
        typer.Option(
            "--trust-store",
            "-t",
            help="Name the signers from this trust store.",
            envvar="NEXUSCORE_TRUST_STORE",
        ),
    ] = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Every policy that ever served or was promoted: when, to which stage, by whom, on whose
    signatures and which replay report (provenance, from the evidence). Promotion steps that were
    refused (forged, stale, replayed, out of order) are listed too, as refused, with the reason."""
    from nexuscore.policy import load_trust_store

    names = {}
    if trust_store is not None:
        names = {k.key_id: k.name for k in load_trust_store(trust_store).keys}
    with _store(evidence_dir, None) as store:
        rows = store.query(
            "SELECT occurred_at, policy_version, policy_digest, from_stage, to_stage, actor, signers, "
            "replay_report_digest, canary_share, reason, 'accepted' AS status, src_offset "
            "FROM policy_events UNION ALL "
            "SELECT occurred_at, NULL, policy_digest, NULL, NULL, claimed_actor, [], NULL, NULL, NULL, "
            "'refused (' || code || '): ' || reason, src_offset FROM refusals WHERE act = 'policy_stage' "
            "ORDER BY occurred_at, src_offset"
        ).to_pylist()
    for r in rows:
        r["signers"] = ", ".join(names.get(k, k) for k in r["signers"])
        r["from_stage"] = r["from_stage"] or "-"
    schema = pa.schema(
        [
            ("occurred_at", pa.timestamp("us", tz="UTC")),
            *(
                (n, pa.string())
                for n in (
                    "policy_version",
                    "policy_digest",
                    "from_stage",
                    "to_stage",
                    "actor",
                    "signers",
                    "replay_report_digest",
                )
            ),
            ("canary_share", pa.float64()),
            ("reason", pa.string()),
            ("status", pa.string()),
        ]
    )
    _print(pa.Table.from_pylist(rows, schema=schema), fmt, "Policy history", output)


# --- helpers ---------------------------------------------------------------------------------------


def _parse_time(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = (
            datetime.fromisoformat(value)
            if "T" in value or " " in value
            else datetime.combine(date.fromisoformat(value), datetime.min.time())
        )
    except ValueError as exc:
        raise NexusError(f"{option} {value!r} is not an ISO 8601 date or time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# --- review ----------------------------------------------------------------------------------------

Reviewer = Annotated[
    str,
    typer.Option(
        "--reviewer",
        help="Who decides; optional, as the evidence records the --key's name in the trust store (if given, it must match).",
        envvar="NEXUSCORE_REVIEWER",
    ),
]
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded as evidence).")]
WaitSeconds = Annotated[
    float,
    typer.Option(
        "--wait", min=0.0, help="Seconds to wait for the decider's resolution to reach the evidence."
    ),
]


@review_app.command("list")
def review_list(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    state: Annotated[
        str | None,
        typer.Option(help="pending (default), dispatched, denied, timed_out, refused, or all."),
    ] = "pending",
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Escalated requests, oldest first, with why they were escalated and their review deadline."""
    with _store(evidence_dir, None) as store:
        rows = store.escalations(tenant, None if state == "all" else state)
        columns = ["request_id", "tenant_id", "feature", "escalated_at", "deadline", "review_state", "reason"]
        _print(rows.select(columns) if fmt == "table" else rows, fmt, "Escalations", output)


@review_app.command("show")
def review_show(
    request_id: Annotated[str, typer.Argument(help="The escalated request.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    keystore: KeystoreDir = None,
    tenant: RequestTenant = None,
) -> None:
    """One escalated request: why, its deadline and review state, and its whole lineage (prompt
    decrypted) so the reviewer sees what the model would receive."""
    with _store(evidence_dir, keystore) as store:
        row = _escalation(store, request_id, tenant)
        for key in (
            "tenant_id",
            "feature",
            "escalated_at",
            "deadline",
            "reason",
            "review_state",
            "reviewer",
            "review_reason",
        ):
            if row.get(key) is not None:
                # Reasons and names are whatever the requester or reviewer typed: shown, not obeyed.
                console.print(f"[bold]{key}[/bold]: {safe_text(row[key])}", emoji=False)
        _print(store.lineage(request_id, row["tenant_id"]), "table", f"Lineage of {request_id}")


def _escalation(store: EvidenceStore, request_id: str, tenant: str | None = None) -> dict[str, Any]:
    rows = store.query(
        "SELECT * FROM escalations WHERE request_id = $id AND ($t IS NULL OR tenant_id = $t)",
        {"id": request_id, "t": tenant},
    ).to_pylist()
    if not rows:
        raise NexusError(
            f"request {request_id} is not escalated in this evidence (see `nexuscore review list`)"
        )
    if len({r["tenant_id"] for r in rows}) > 1:
        tenants = ", ".join(sorted({r["tenant_id"] for r in rows}))
        raise NexusError(
            f"request id {request_id} was escalated for several tenants ({tenants}): name one with --tenant"
        )
    row: dict[str, Any] = rows[0]
    return row


def _review(
    action: str,
    request_id: str,
    tenant: str | None,
    reviewer: str,
    reason: str,
    key: Path,
    trust_store: Path,
    bootstrap: str,
    namespace: str,
    evidence_dir: Path,
    wait: float,
) -> None:
    import time

    from nexuscore._operations import publish, review_event
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.transport import Topics

    private, name = _signer(key, trust_store, "reviewer", reviewer)
    with _store(evidence_dir, None) as store:
        row = _escalation(store, request_id, tenant)
        escalation_id = _escalation_event_id(store, row["tenant_id"], request_id)
    if row["review_state"] != "pending":
        raise NexusError(
            f"request {request_id} is no longer awaiting review: {row['review_state']}"
            f"{' by ' + row['reviewer'] if row.get('reviewer') else ''}"
        )
    now = SystemClock().now()
    event = review_event(request_id, row["tenant_id"], escalation_id, action, reason, private, name, now)
    asyncio.run(publish(bootstrap, Topics(namespace), event))
    console.print(f"review {event.event_id} recorded: {action} by {name}", highlight=False)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with _store(evidence_dir, None) as store:
            row = _escalation(store, request_id, row["tenant_id"])
        if row["review_state"] != "pending":
            console.print(f"resolution: {row['review_state']} ({row['resolution_reason']})", highlight=False)
            return
        time.sleep(0.5)
    if wait:
        err_console.print(
            f"no resolution in the evidence after {wait:g} s; see `nexuscore review show {request_id}`"
        )


def _escalation_event_id(store: EvidenceStore, tenant_id: str, request_id: str) -> str:
    """The escalated decision's event id: a review is signed over it, so it answers that one escalation."""
    rows = store.query(
        "SELECT event_id FROM decisions WHERE tenant_id = $t AND request_id = $r AND verdict = 'escalated'",
        {"t": tenant_id, "r": request_id},
    ).to_pylist()
    if not rows:
        raise NexusError(f"request {request_id} of {tenant_id} has no escalated decision in this evidence")
    return str(rows[0]["event_id"])


ReviewerKey = Annotated[
    Path,
    typer.Option(
        "--key",
        help="The reviewer's Ed25519 private key (PEM); its public key must be in the deciders' trust store "
        "with the reviewer role. The evidence records its name there as the reviewer.",
        envvar="NEXUSCORE_REVIEWER_KEY",
    ),
]


@review_app.command("approve")
def review_approve(
    request_id: Annotated[str, typer.Argument(help="The escalated request.")],
    reason: Reason,
    key: ReviewerKey,
    trust_store: TrustStoreFile,
    bootstrap: Bootstrap,
    tenant: RequestTenant = None,
    reviewer: Reviewer = "",
    namespace: Namespace = "",
    evidence_dir: EvidenceDir = Path("evidence"),
    wait: WaitSeconds = 30.0,
) -> None:
    """Approve: the request resumes. The decider decides it again without the escalation stage (budget,
    latency and kill switches as they are now) and dispatches it, or records why it cannot. An
    approval after the deadline ends the request as timed out."""
    _review(
        "approved",
        request_id,
        tenant,
        reviewer,
        reason,
        key,
        trust_store,
        bootstrap,
        namespace,
        evidence_dir,
        wait,
    )


@review_app.command("deny")
def review_deny(
    request_id: Annotated[str, typer.Argument(help="The escalated request.")],
    reason: Reason,
    key: ReviewerKey,
    trust_store: TrustStoreFile,
    bootstrap: Bootstrap,
    tenant: RequestTenant = None,
    reviewer: Reviewer = "",
    namespace: Namespace = "",
    evidence_dir: EvidenceDir = Path("evidence"),
    wait: WaitSeconds = 30.0,
) -> None:
    """Deny: the request ends, with your identity and reason in the evidence."""
    _review(
        "denied",
        request_id,
        tenant,
        reviewer,
        reason,
        key,
        trust_store,
        bootstrap,
        namespace,
        evidence_dir,
        wait,
    )


# --- control ---------------------------------------------------------------------------------------


class Scope(enum.StrEnum):
    global_ = "global"
    tenant = "tenant"
    feature = "feature"


def _switch(
    mode: str,
    scope: Scope,
    target: str,
    actor: str,
    reason: str,
    key: Path | None,
    trust_store: Path,
    bootstrap: str,
    namespace: str,
) -> None:
    from nexuscore._operations import kill_switch_event, publish
    from nexuscore.kernel.clock import SystemClock
    from nexuscore.transport import Topics

    if key is None:
        raise NexusError("an operator's signing key is needed: --key PEM or NEXUSCORE_OPERATOR_KEY")
    private, name = _signer(key, trust_store, "operator", actor)
    event = kill_switch_event(scope.value, target, mode, reason, private, name, SystemClock().now())
    asyncio.run(publish(bootstrap, Topics(namespace), event))
    where = "globally" if scope is Scope.global_ else f"for {scope.value} {target}"
    console.print(
        f"inference {mode} {where}: event {event.event_id} signed by {name} (deciders take it up within a second)",
        highlight=False,
    )


def _signer(key: Path, trust_store: Path, role: str, claimed: str) -> tuple[Any, str]:
    """The private key and the trust store's name for it in ``role`` (``claimed``, if given, must be it)."""
    from nexuscore._operations import signer_name
    from nexuscore.kernel import signing
    from nexuscore.policy import load_trust_store

    private = signing.load_private_key(key)
    name = signer_name(private, load_trust_store(trust_store), role)  # type: ignore[arg-type]
    if claimed and claimed != name:
        raise NexusError(f"--key is {name}'s key in the trust store, not {claimed!r}'s")
    return private, name


ScopeOption = Annotated[Scope, typer.Option("--scope", help="global, tenant or feature.")]
Target = Annotated[
    str,
    typer.Option("--target", help="The tenant id, or the feature id (or tenant/feature); none for global."),
]
Actor = Annotated[
    str,
    typer.Option(
        "--actor",
        help="Who throws the switch; optional, as the evidence records the --key's name in the trust store (if given, it must match).",
        envvar="NEXUSCORE_OPERATOR",
    ),
]
OperatorKey = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="The operator's Ed25519 private key (PEM); its public key must be in the "
        "deciders' trust store with the operator role.",
        envvar="NEXUSCORE_OPERATOR_KEY",
    ),
]


@control_app.command("off")
def control_off(
    reason: Reason,
    bootstrap: Bootstrap,
    trust_store: TrustStoreFile,
    actor: Actor = "",
    scope: ScopeOption = Scope.global_,
    target: Target = "",
    key: OperatorKey = None,
    namespace: Namespace = "",
) -> None:
    """Turn inference off: every new request in scope is denied, with the switch as its reason."""
    _switch("off", scope, target, actor, reason, key, trust_store, bootstrap, namespace)


@control_app.command("offline")
def control_offline(
    reason: Reason,
    bootstrap: Bootstrap,
    trust_store: TrustStoreFile,
    actor: Actor = "",
    scope: ScopeOption = Scope.global_,
    target: Target = "",
    key: OperatorKey = None,
    namespace: Namespace = "",
) -> None:
    """Offline mode: answer from the cache of earlier answers (same tenant, policy, model and prompt),
    marked cached; tools disabled; a request with no cached answer is denied."""
    _switch("offline", scope, target, actor, reason, key, trust_store, bootstrap, namespace)


@control_app.command("on")
def control_on(
    reason: Reason,
    bootstrap: Bootstrap,
    trust_store: TrustStoreFile,
    actor: Actor = "",
    scope: ScopeOption = Scope.global_,
    target: Target = "",
    key: OperatorKey = None,
    namespace: Namespace = "",
) -> None:
    """Lift the switch of this scope and target: inference resumes."""
    _switch("on", scope, target, actor, reason, key, trust_store, bootstrap, namespace)


def _print(table: pa.Table, fmt: str, title: str | None = None, output: Path | None = None) -> None:
    if fmt == "parquet":
        if output is None:
            raise NexusError("--format parquet needs --output FILE")
        import pyarrow.parquet as pq

        pq.write_table(table, output)
        err_console.print(f"wrote {table.num_rows} rows to {safe_text(output)}")
        return
    stream: TextIO
    with contextlib.ExitStack() as stack:
        if output is None:
            stream = sys.stdout
        else:
            try:
                stream = stack.enter_context(output.open("w", encoding="utf-8", newline=""))
            except OSError as exc:
                raise NexusError(f"cannot write {output}: {exc.strerror}") from exc
        rows: list[dict[str, Any]] = table.to_pylist()
        if fmt == "json":
            stream.write(json.dumps(rows, default=_json_default, indent=2) + "\n")
        elif fmt == "csv":
            writer = csv.DictWriter(stream, fieldnames=table.column_names, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        else:
            # Every cell, header and title may hold text from outside (prompts, reasons, names,
            # an SQL alias): as rich Text it is shown literally, never read as markup or escapes.
            out = Table(title=None if title is None else safe_rich_text(title))
            for name in table.column_names:
                out.add_column(safe_rich_text(name), overflow="fold")
            for row in rows:
                out.add_row(*(safe_rich_text("" if v is None else v) for v in row.values()))
            if output is None:
                # A pipe gets the whole width of the rows, not the 80 columns rich assumes.
                (console if console.is_terminal else Console(width=200)).print(out)
            else:
                Console(file=stream, width=200).print(out)
    if output is not None:
        err_console.print(f"wrote {table.num_rows} rows to {safe_text(output)}")


def _json_default(value: object) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def _stop_on_signals(event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except NexusError as exc:
        # The message often quotes input (a file's content, an id, a query): one line, shown as is.
        err_console.print(f"[red]error:[/] {safe_text(exc)}", highlight=False, soft_wrap=True, emoji=False)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
