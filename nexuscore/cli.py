"""The ``nexuscore`` command line: a thin shell over the library. Every error is one line."""

from __future__ import annotations

import asyncio
import csv
import enum
import json
import logging
import signal
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import typer
from rich.console import Console
from rich.table import Table

from nexuscore.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH, load_policy

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
    help="Query the evidence store (Parquet tables through DuckDB views).", no_args_is_help=True
)
policy_app = typer.Typer(help="Inspect and validate routing policy files.", no_args_is_help=True)
app.add_typer(run_app, name="run")
app.add_typer(evidence_app, name="evidence")
app.add_typer(policy_app, name="policy")

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


class OutputFormat(enum.StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


Format = Annotated[OutputFormat, typer.Option("--format", "-f", help="How to print the rows.")]


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
) -> None:
    """Run the whole pipeline on a local Kafka broker with synthetic traffic, then summarise.

    Starts (or reuses, with NEXUSCORE_BOOTSTRAP) a broker, the simulated provider, the decision agent,
    a worker and the projector; publishes N requests from several tenants plus a few malformed
    messages; exits 0 only once every request has exactly one terminal state in the evidence.
    """
    from nexuscore._demo import run_demo
    from nexuscore.projections import EvidenceStore

    run_demo(requests, evidence_dir, policy, timeout, console)
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
    latency_ms: Annotated[float, typer.Option(help="Mean added latency per call.")] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of calls answered with HTTP 503.")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the error draws.")] = 0,
) -> None:
    """The simulated model provider: an OpenAI-compatible chat-completions server on localhost."""
    from nexuscore.providers import SimulatedProviderConfig, serve_forever

    try:
        serve_forever(
            SimulatedProviderConfig(latency_ms=latency_ms, error_rate=error_rate, seed=seed),
            host,
            port,
        )
    except OSError as exc:
        raise NexusError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


@run_app.command("decider")
def run_decider(
    bootstrap: Bootstrap, policy: PolicyFile = DEFAULT_POLICY_PATH, namespace: Namespace = ""
) -> None:
    """The decision agent (faust): residency, routing, budget and decode for every request."""
    from faust.worker import Worker as FaustWorker

    from nexuscore._broker import wait_for_broker
    from nexuscore._clock import SystemClock
    from nexuscore.streams import Topics, build_decider, ensure_topics

    loaded = load_policy(policy)
    topics = Topics(namespace)
    asyncio.run(wait_for_broker(bootstrap, 15))
    asyncio.run(ensure_topics(bootstrap, topics))
    faust_app, _ = build_decider(bootstrap, loaded, SystemClock(), topics=topics)
    print(f"decider ready: policy {loaded.version} {loaded.digest}", flush=True)
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
) -> None:
    """The data-plane worker: calls the chosen deployment for each dispatch, records attempts and outcome."""
    from nexuscore._clock import SystemClock
    from nexuscore.streams import Caller, Topics, Worker, default_adapters

    async def main() -> None:
        adapters = default_adapters()
        clock = SystemClock()
        worker = Worker(
            bootstrap,
            Caller(adapters, clock, endpoint_override=simulated_url),
            clock,
            topics=Topics(namespace),
            concurrency=concurrency,
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
    bootstrap: Bootstrap, evidence_dir: EvidenceDir = Path("evidence"), namespace: Namespace = ""
) -> None:
    """The evidence projector: every event on every topic into Parquet tables."""
    from nexuscore.projections import Projector
    from nexuscore.streams import Topics

    async def main() -> None:
        projector = Projector(bootstrap, evidence_dir, topics=Topics(namespace))
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


@evidence_app.command("sql")
def evidence_sql(
    query: Annotated[str, typer.Argument(help="A DuckDB SELECT over the evidence views.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    fmt: Format = OutputFormat.table,
) -> None:
    """Run SQL over the evidence views: requests, decisions, decision_reasons, rejections, dispatches,
    attempts, outcomes, settlements, deadletters, terminal_states."""
    from nexuscore.projections import EvidenceStore

    with EvidenceStore(evidence_dir) as store:
        _print(store.query(query), fmt)


@evidence_app.command("who-routed-what")
def evidence_who_routed_what(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Only decisions at or after this date or time (ISO 8601, UTC).")
    ] = None,
    fmt: Format = OutputFormat.table,
) -> None:
    """Which model served whom: requests, verdicts, tiers, deployments, policy versions and cost."""
    from nexuscore.projections import EvidenceStore

    with EvidenceStore(evidence_dir) as store:
        _print(store.who_routed_what(tenant, _parse_since(since)), fmt, "Who routed what")


@evidence_app.command("summary")
def evidence_summary(evidence_dir: EvidenceDir = Path("evidence")) -> None:
    """Counts: requests, requests with a terminal state, duplicates of terminal states, dead letters."""
    from nexuscore.projections import EvidenceStore

    with EvidenceStore(evidence_dir) as store:
        for k, v in store.terminal_summary().items():
            console.print(f"{k:>18}: {v}")


# --- replay and policy -----------------------------------------------------------------------------


@app.command()
def replay(
    policy: PolicyFile,
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's history.")] = None,
    show: Annotated[int, typer.Option(help="How many changed decisions to list.")] = 10,
) -> None:
    """Re-decide every recorded request under POLICY and report what would change.

    With the policy that was recorded, every decision is reproduced exactly (0 changes). With a
    candidate policy, the budget state is re-simulated under its prices.
    """
    from rich.progress import Progress

    from nexuscore.projections import EvidenceStore
    from nexuscore.replay import replay as run_replay

    candidate = load_policy(policy)
    with EvidenceStore(evidence_dir) as store, Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("replaying", total=None)

        def tick(done: int, total: int) -> None:
            if done % 500 == 0 or done == total:
                progress.update(task, completed=done, total=total)

        report = run_replay(store, candidate, tenant=tenant, progress=tick)
    console.print(f"policy {report.policy_version} ({report.policy_digest})")
    console.print(f"requests replayed:     {report.requests}")
    console.print(
        f"decisions changed:     {report.changed}  (verdict {report.verdict_changes}, deployment {report.deployment_changes}, tier {report.tier_changes})"
    )
    console.print(f"same decision, other context: {report.context_differences}")
    console.print(
        f"estimated cost delta:  {report.estimated_delta_micros / 1e6:+.6f} USD  ({report.recorded_estimated_micros / 1e6:.6f} -> {report.candidate_estimated_micros / 1e6:.6f})"
    )
    console.print(
        f"actual cost delta:     {report.actual_delta_micros / 1e6:+.6f} USD  (recorded usage repriced)"
    )
    if report.changes and show:
        rows = [
            {
                "request_id": c.request_id,
                "tenant_id": c.tenant_id,
                "fields": ", ".join(c.fields),
                "recorded": json.dumps(c.recorded),
                "candidate": json.dumps(c.candidate),
            }
            for c in report.changes[:show]
        ]
        _print(pa.Table.from_pylist(rows), "table", f"First {len(rows)} changed decisions")


@policy_app.command("show")
def policy_show(path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")]) -> None:
    """Validate a policy file and print its version, digest and contents in brief."""
    p = load_policy(path)
    console.print(f"{p.name} {p.version}\ndigest {p.digest}")
    console.print(
        f"{len(p.deployments)} deployments in {', '.join(p.regions)}; {len(p.tenants)} tenants; "
        f"{len(p.routing.rules)} routing rules; {len(p.escalation)} escalation rules"
    )


# --- helpers ---------------------------------------------------------------------------------------


def _parse_since(since: str | None) -> datetime | None:
    if since is None:
        return None
    try:
        parsed = (
            datetime.fromisoformat(since)
            if "T" in since or " " in since
            else datetime.combine(date.fromisoformat(since), datetime.min.time())
        )
    except ValueError as exc:
        raise NexusError(f"--since {since!r} is not an ISO 8601 date or time") from exc
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _print(table: pa.Table, fmt: str, title: str | None = None) -> None:
    rows: list[dict[str, Any]] = table.to_pylist()
    if fmt == "json":
        sys.stdout.write(json.dumps(rows, default=str, indent=2) + "\n")
    elif fmt == "csv":
        writer = csv.DictWriter(sys.stdout, fieldnames=table.column_names)
        writer.writeheader()
        writer.writerows(rows)
    else:
        out = Table(title=title)
        for name in table.column_names:
            out.add_column(name, overflow="fold")
        for row in rows:
            out.add_row(*("" if v is None else str(v) for v in row.values()))
        console.print(out)


def _stop_on_signals(event: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except NexusError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
