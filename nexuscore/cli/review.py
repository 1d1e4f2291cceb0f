"""``nexuscore review``: the escalations awaiting a person; approve or deny one, signed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from nexuscore._text import safe_text
from nexuscore.cli._common import (
    Bootstrap,
    EvidenceDir,
    Format,
    KeystoreDir,
    Namespace,
    Output,
    OutputFormat,
    Reason,
    RequestTenant,
    Tenant,
    TrustStoreFile,
    _print,
    console,
    err_console,
)

# Lazy imports: nexuscore.services loads faust, aiokafka and duckdb, about a second; each command
# imports it when it runs, so that `nexuscore --help` stays fast.

app = typer.Typer(
    help="The escalation boundary: requests waiting for a person. List them, look at one, approve "
    "(the request resumes) or deny it (it ends); either way your identity and reason are evidence.",
    no_args_is_help=True,
)

Reviewer = Annotated[
    str,
    typer.Option(
        "--reviewer",
        help="Who decides; optional, as the evidence records the --key's name in the trust store (if given, it must match).",
        envvar="NEXUSCORE_REVIEWER",
    ),
]
WaitSeconds = Annotated[
    float,
    typer.Option(
        "--wait", min=0.0, help="Seconds to wait for the decider's resolution to reach the evidence."
    ),
]
ReviewerKey = Annotated[
    Path,
    typer.Option(
        "--key",
        help="The reviewer's Ed25519 private key (PEM); its public key must be in the deciders' trust store "
        "with the reviewer role. The evidence records its name there as the reviewer.",
        envvar="NEXUSCORE_REVIEWER_KEY",
    ),
]
# What `review list` shows as a table (the other formats get every column).
LIST_COLUMNS = ["request_id", "tenant_id", "feature", "escalated_at", "deadline", "review_state", "reason"]
SHOWN_FIELDS = (
    "tenant_id",
    "feature",
    "escalated_at",
    "deadline",
    "reason",
    "review_state",
    "reviewer",
    "review_reason",
)


@app.command("list")
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
    from nexuscore import services

    with services.open_store(evidence_dir) as store:
        rows = services.review_queue(store, tenant, state)
        _print(rows.select(LIST_COLUMNS) if fmt == "table" else rows, fmt, "Escalations", output)


@app.command("show")
def review_show(
    request_id: Annotated[str, typer.Argument(help="The escalated request.")],
    evidence_dir: EvidenceDir = Path("evidence"),
    keystore: KeystoreDir = None,
    tenant: RequestTenant = None,
) -> None:
    """One escalated request: why, its deadline and review state, and its whole lineage (prompt
    decrypted) so the reviewer sees what the model would receive."""
    from nexuscore import services

    with services.open_store(evidence_dir, keystore) as store:
        row = services.find_escalation(store, request_id, tenant)
        for key in SHOWN_FIELDS:
            if row.get(key) is not None:
                # Reasons and names are whatever the requester or reviewer typed: shown, not obeyed.
                console.print(f"[bold]{key}[/bold]: {safe_text(row[key])}", emoji=False)
        _print(store.lineage(request_id, row["tenant_id"]), "table", f"Lineage of {request_id}")


def _review(
    action: Literal["approved", "denied"],
    request_id: str,
    reason: str,
    *,
    key: Path,
    trust_store: Path,
    bootstrap: str,
    namespace: str,
    evidence_dir: Path,
    tenant: str | None,
    reviewer: str,
    wait: float,
) -> None:
    from nexuscore import services

    event = services.submit_review(
        action,
        request_id,
        reason,
        key=key,
        trust_store=trust_store,
        evidence_dir=evidence_dir,
        bootstrap=bootstrap,
        namespace=namespace,
        tenant=tenant,
        reviewer=reviewer,
    )
    console.print(f"review {event.event_id} recorded: {action} by {event.reviewer}", highlight=False)
    row = services.wait_for_resolution(evidence_dir, request_id, event.tenant_id, wait)
    if row is not None:
        console.print(f"resolution: {row['review_state']} ({row['resolution_reason']})", highlight=False)
    elif wait:
        err_console.print(
            f"no resolution in the evidence after {wait:g} s; see `nexuscore review show {request_id}`"
        )


@app.command("approve")
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
        reason,
        key=key,
        trust_store=trust_store,
        bootstrap=bootstrap,
        namespace=namespace,
        evidence_dir=evidence_dir,
        tenant=tenant,
        reviewer=reviewer,
        wait=wait,
    )


@app.command("deny")
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
        reason,
        key=key,
        trust_store=trust_store,
        bootstrap=bootstrap,
        namespace=namespace,
        evidence_dir=evidence_dir,
        tenant=tenant,
        reviewer=reviewer,
        wait=wait,
    )
