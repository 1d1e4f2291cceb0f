"""``nexuscore replay``: recorded history under a candidate policy, or under the recorded ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nexuscore.cli._common import (
    EvidenceDir,
    Namespace,
    SignersTrust,
    Since,
    Until,
    _print,
    console,
    err_console,
    parse_time,
    required_trust,
)
from nexuscore.kernel.errors import NexusError

if TYPE_CHECKING:
    from nexuscore.policy import RoutingPolicy, TrustStore
    from nexuscore.replay import ReplayReport

# Lazy import: nexuscore.services loads duckdb, faust and aiokafka, about a second; the command
# imports it when it runs, so that `nexuscore --help` stays fast.


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
    trust_store: SignersTrust = None,
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
    from nexuscore import services
    from nexuscore.policy import load_signed_policy, load_trust_store

    trust = load_trust_store(required_trust(trust_store))
    if (policy is None) == (not recorded):
        raise NexusError("pass --policy CANDIDATE, or --recorded to verify against the recorded policies")
    candidate = load_signed_policy(policy, trust, datetime.now(UTC)).policy if policy is not None else None
    if from_kafka and bootstrap is None:
        raise NexusError("--from-kafka needs --bootstrap (or NEXUSCORE_BOOTSTRAP)")
    since_time, until_time = parse_time(since, "--since"), parse_time(until, "--until")
    with contextlib.ExitStack() as stack:
        if from_kafka and bootstrap is not None:
            evidence_dir = stack.enter_context(_log_snapshot(bootstrap, namespace, trust, candidate))
        known = None
        if recorded:
            known, skipped = services.recorded_policies(evidence_dir, trust)
            for why in skipped:
                err_console.print(f"[yellow]skipped[/] {why}")
        report = _replay(evidence_dir, candidate, known, tenant, since_time, until_time, diff_out is not None)
    scope = {"evidence": str(evidence_dir), "tenant": tenant, "since": since, "until": until}
    _show(report, show, diff_out, report_out, html, scope)
    failure = services.replay_failure(report, verify_mode=recorded)
    if failure is not None:
        err_console.print(f"[red]FAILED[/]: {failure}")
        raise typer.Exit(1)


def _replay(
    evidence_dir: Path,
    candidate: RoutingPolicy | None,
    known: dict[str, RoutingPolicy] | None,
    tenant: str | None,
    since: datetime | None,
    until: datetime | None,
    keep_all_changes: bool,
) -> ReplayReport:
    """``services.replay_history`` under a progress bar on stderr."""
    from nexuscore import services

    columns = (TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("replaying", total=None)

        def tick(done: int, total: int) -> None:
            if done % 500 == 0 or done == total:
                progress.update(task, completed=done, total=total)

        return services.replay_history(
            evidence_dir,
            candidate,
            known,
            tenant=tenant,
            since=since,
            until=until,
            keep_all_changes=keep_all_changes,
            progress=tick,
        )


@contextlib.contextmanager
def _log_snapshot(
    bootstrap: str, namespace: str, trust: TrustStore, candidate: RoutingPolicy | None
) -> Iterator[Path]:
    """``services.log_snapshot`` with a progress bar on stderr while the log is read."""
    from nexuscore import services

    with contextlib.ExitStack() as stack:
        with Progress(
            TextColumn("reading the log"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err_console,
            transient=True,
        ) as reading:
            task = reading.add_task("log", total=None)
            root = stack.enter_context(
                services.log_snapshot(
                    bootstrap,
                    namespace,
                    trust,
                    candidate,
                    lambda done, total: reading.update(task, completed=done, total=total),
                )
            )
        yield root


def _show(
    report: ReplayReport,
    show: int,
    diff_out: Path | None,
    report_out: Path | None,
    html: Path | None,
    scope: dict[str, str | None],
) -> None:
    """The summary on the terminal, and the files asked for."""
    from nexuscore import services

    for line in services.summary_lines(report):
        console.print(line, highlight=False)
    if report.changes and show:
        title = f"First {min(show, len(report.changes))} changed decisions"
        _print(services.changes_table(report, show), "table", title)
    if diff_out is not None:
        _print(services.changes_table(report), "parquet", output=diff_out)
    if report_out is not None:
        console.print(f"report {report_out}: {services.write_replay_report(report_out, report, scope)}")
    if html is not None:
        services.write_replay_html(html, report)
        err_console.print(f"wrote {html}")
