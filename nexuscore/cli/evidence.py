"""``nexuscore evidence``: query, report on, verify, prove and erase the evidence store."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from nexuscore.cli._common import (
    EvidenceDir,
    Format,
    KeystoreDir,
    Output,
    OutputFormat,
    PublicKey,
    RequestTenant,
    SigningKey,
    Since,
    Tenant,
    Until,
    _print,
    console,
    err_console,
    optional_public_key,
    parse_time,
    required_signing_key,
    trusted_public_key,
)
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import generate_keypair

if TYPE_CHECKING:
    from nexuscore.projections import VerifyReport

# Lazy imports: nexuscore.services loads duckdb, faust and aiokafka, about a second; each command
# imports it when it runs, so that `nexuscore --help` stays fast.

app = typer.Typer(
    help="The evidence store: query it, report on it, verify it, prove what it holds, erase content.",
    no_args_is_help=True,
)


@app.command("sql")
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
    from nexuscore import services

    with services.open_store(evidence_dir) as store:
        _print(store.query(query), fmt, output=output)


@app.command("who-routed-what")
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
    from nexuscore import services

    since_time, until_time = parse_time(since, "--since"), parse_time(until, "--until")
    with services.open_store(evidence_dir) as store:
        table = store.who_routed_what(
            tenant,
            since_time,
            until_time,
            feature=feature,
            model=model,
            tier=tier,
            policy_version=policy_version,
        )
        _print(table, fmt, "Who routed what", output)


@app.command("lineage")
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
    from nexuscore import services

    _print(
        services.lineage_of(evidence_dir, request_id, tenant, keystore),
        fmt,
        f"Lineage of {request_id}",
        output,
    )


@app.command("spend")
def evidence_spend(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    since: Since = None,
    until: Until = None,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Spend by tenant, feature, day and model, with the tenant's daily budget and its utilisation."""
    from nexuscore import services

    since_time, until_time = parse_time(since, "--since"), parse_time(until, "--until")
    with services.open_store(evidence_dir) as store:
        _print(store.spend(tenant, since_time, until_time), fmt, "Spend", output)


@app.command("residency")
def evidence_residency(
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: Tenant = None,
    calls: Annotated[
        bool, typer.Option("--calls", help="List every call, not the counts per finding, route and basis.")
    ] = False,
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Residency audit: the calls outside their tenant's home region, with their transfer basis,
    counted per finding, tenant, event, route and basis (--calls: one row per call).

    Exits 1 if any call went outside the regions its decision allowed (that list must be empty).
    """
    # The evidence package alone: nexuscore.services also loads faust and aiokafka (about half a
    # second of CPU), which a read-only query does not need.
    from nexuscore.projections import EvidenceStore, residency_breaches

    with EvidenceStore(evidence_dir) as store:
        table = store.residency(tenant) if calls else store.residency_summary(tenant)
    _print(table, fmt, "Cross-border and out-of-region calls", output)
    breaches = residency_breaches(table)
    if breaches:
        err_console.print(f"[red]{breaches} call(s) outside the allowed regions or without a decision[/]")
        raise typer.Exit(1)


@app.command("escalations")
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
    from nexuscore import services

    with services.open_store(evidence_dir) as store:
        _print(store.escalations(tenant, state), fmt, "Escalations", output)


@app.command("report")
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
    from nexuscore import services

    key = optional_public_key(public_key)
    verified = None if key is None else _verify(evidence_dir, key, quiet=True)
    size = services.write_evidence_report(evidence_dir, output, verified, datetime.now(UTC))
    console.print(f"wrote {output} ({size / 1024:.0f} KiB)")


@app.command("verify")
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
    deep: Annotated[
        bool,
        typer.Option(
            "--deep",
            help="Also recompute every row's Merkle leaf and every file's Merkle root (proves the "
            "sealed roots, and so every inclusion proof, are those of the rows; slower).",
        ),
    ] = False,
    since_head: Annotated[
        list[Path] | None,
        typer.Option(
            "--since-head",
            help="An earlier manifest.head.json kept outside the evidence folder (repeatable): the "
            "ledger must still extend it. Only this sees a rollback to an earlier signed state.",
        ),
    ] = None,
) -> None:
    """Check the evidence is complete and unaltered; name every gap; exit 1 on any.

    Re-hashes the manifest chain and checks its signed head with the trusted key; recomputes each
    file's sha256 against its sealed entry (with --deep, also every row's leaf and the Merkle root
    of each file's rows); checks every offset of every partition is
    accounted for; that the folder holds nothing the manifest does not name; that every content
    key the evidence uses is in the keystore, or was destroyed by `evidence erase` (a signed
    record); and that every request has exactly one terminal state, every decision a request
    and a known policy, every outcome a decision, and no event appears twice.
    """
    until_time = parse_time(until, "--until")
    key = trusted_public_key(public_key)
    report = _verify(
        evidence_dir,
        key,
        policy or [],
        until_time,
        keystore=keystore,
        deep=deep,
        since_heads=since_head or [],
    )
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
    how = "every row's leaf and every file's Merkle root recomputed" if deep else "every file's sha256"
    console.print(f"[green]OK[/]: complete and unaltered ({how})")


def _verify(
    evidence_dir: Path,
    public_key: Path,
    policies: list[Path] | None = None,
    until: datetime | None = None,
    *,
    keystore: Path | None = None,
    quiet: bool = False,
    deep: bool = False,
    since_heads: list[Path] | None = None,
) -> VerifyReport:
    """``services.verify_evidence`` under a progress bar on stderr (none when ``quiet``)."""
    from nexuscore import services

    columns = (TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as progress:
        task = progress.add_task("verify", total=None)
        return services.verify_evidence(
            evidence_dir,
            public_key,
            policies=policies or [],
            until=until,
            keystore=keystore,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            deep=deep,
            since_heads=since_heads or [],
        )


@app.command("prove")
def evidence_prove(
    request_id: Annotated[
        str | None, typer.Argument(help="The request whose events to prove (not with --consistency).")
    ] = None,
    evidence_dir: EvidenceDir = Path("evidence"),
    tenant: RequestTenant = None,
    consistency: Annotated[
        Path | None,
        typer.Option(help="An older signed head (manifest.head.json): prove the ledger only grew since."),
    ] = None,
    public_key: PublicKey = None,
    output: Output = None,
) -> None:
    """Print an inclusion proof (JSON) of every stored event of a request against the signed head,
    or with --consistency OLD_HEAD a proof that the ledger only grew since that head.

    The README shows how to check either independently with sha256 and Ed25519 alone.
    """
    from nexuscore import services

    if (request_id is None) == (consistency is None):
        raise NexusError(
            "prove a REQUEST_ID, or the ledger's growth with --consistency OLD_HEAD: one of the two"
        )
    key = optional_public_key(public_key)
    if consistency is not None:
        proof = services.prove_growth(evidence_dir, consistency, key)
        if key is not None:
            err_console.print(
                f"the ledger only grew: {proof['old_head']['size']} -> {proof['new_head']['size']} entries, "
                "both heads signed by the trusted key"
            )
    else:
        assert request_id is not None
        proof = services.prove_request(evidence_dir, request_id, tenant, key)
        if key is not None:
            err_console.print(f"proof of {len(proof['events'])} events checks out against the trusted key")
    text = json.dumps(proof, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text, encoding="utf-8")
        err_console.print(f"wrote {output}")


@app.command("compact")
def evidence_compact(
    evidence_dir: EvidenceDir = Path("evidence"),
    signing_key: SigningKey = None,
    file_rows: Annotated[
        int, typer.Option(help="Rows per compacted file at most (files this large are left as they are).")
    ] = 1_000_000,
) -> None:
    """Merge the small sealed files (one per table and region per flush) into large ones,
    sorted by tenant and request, and re-seal them: a `compaction` entry in the signed ledger names
    the files replaced and the new ones; the old ones are deleted only after it is committed.

    Refused while a projector is writing the folder (they share its lock). Every row stays, once;
    `verify` (both modes) and `prove` hold before and after."""
    from nexuscore import services

    key = required_signing_key(signing_key)
    report = services.compact_evidence(evidence_dir, key, datetime.now(UTC), file_rows)
    indexed = f"; request index of {report.indexed:,} rows written" if report.indexed else ""
    if not report.groups:
        console.print(
            f"nothing to compact: {report.files_before:,} files, none small enough to merge{indexed}"
        )
        return
    console.print(
        f"compacted {report.replaced:,} files into {report.written:,} ({report.rows:,} rows); "
        f"{report.files_before:,} files before, {report.files_after:,} now{indexed}"
    )


@app.command("erase")
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
    from nexuscore import services

    key = required_signing_key(signing_key)
    scope = services.erasure_scope(tenant, subject)
    if not yes and not typer.confirm(f"Destroy the content keys of {scope}? This cannot be undone"):
        raise typer.Exit(1)
    erased = services.erase_content(
        evidence_dir, key, tenant, subject, reason, datetime.now(UTC), keystore=keystore
    )
    console.print(f"erased {len(erased)} key(s) of {scope}: {', '.join(erased)}")


@app.command("keygen")
def evidence_keygen(
    out: Annotated[Path, typer.Option(help="Folder for the key pair.")] = Path("keys"),
    name: Annotated[str, typer.Option(help="File name stem.")] = "evidence-signing",
) -> None:
    """Create an Ed25519 key pair for signing the evidence manifest: NAME.pem (private, mode 0600)
    and NAME.pub (give it to whoever verifies)."""
    key_id = generate_keypair(out / f"{name}.pem", out / f"{name}.pub")
    console.print(f"key {key_id}: private {out / f'{name}.pem'}, public {out / f'{name}.pub'}")


@app.command("summary")
def evidence_summary(evidence_dir: EvidenceDir = Path("evidence")) -> None:
    """Counts: requests, requests with a terminal state, duplicates of terminal states, dead letters."""
    from nexuscore import services

    with services.open_store(evidence_dir) as store:
        for k, v in store.terminal_summary().items():
            console.print(f"{k:>18}: {v}")
