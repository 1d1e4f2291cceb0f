"""``nexuscore policy``: show, diff, sign, verify and promote policies; keys and the trust store;
the history of every step."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from nexuscore.cli._common import (
    Bootstrap,
    EvidenceDir,
    Format,
    Namespace,
    Output,
    OutputFormat,
    TrustStoreFile,
    _print,
    console,
    err_console,
)
from nexuscore.kernel.errors import NexusError

# Lazy imports: nexuscore.services loads faust, aiokafka and duckdb, about a second; each command
# imports it when it runs, so that `nexuscore --help` stays fast.

app = typer.Typer(
    help="Routing policies: show, diff, sign and verify them; manage the keys trusted to sign.",
    no_args_is_help=True,
)

Role = Annotated[str, typer.Option(help="The signer's role: author, reviewer or operator.")]


@app.command("show")
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
    from nexuscore.policy import (
        check_signatures,
        load_policy,
        load_trust_store,
        read_signatures,
        signatures_path,
    )

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
        trust = load_trust_store(trust_store)
        signed = check_signatures(
            p, path.read_bytes(), signatures, trust, datetime.now(UTC), source=str(path)
        )
        console.print(f"[green]trusted[/]: {len(signed.signatures)} valid signature(s)")


@app.command("keygen")
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
    from nexuscore import services

    key_id, private, public = services.create_signer_key(name, out)
    console.print(f"key {key_id} of {name}: private {private}, public {public}")
    if trust_store is not None:
        _trust(trust_store, public, name, role or ["reviewer"])


@app.command("trust")
def policy_trust(
    trust_store: TrustStoreFile,
    public_key: Annotated[Path | None, typer.Option(help="Add this public key (PEM).")] = None,
    name: Annotated[str | None, typer.Option(help="Its holder, with --public-key.")] = None,
    role: Annotated[list[str] | None, typer.Option(help="Its role(s), with --public-key.")] = None,
    revoke: Annotated[str | None, typer.Option(help="Revoke this key id, from now on.")] = None,
) -> None:
    """List, add to or revoke keys of a trust store."""
    from nexuscore import services

    if public_key is not None:
        if name is None:
            raise NexusError("--public-key needs --name")
        _trust(trust_store, public_key, name, role or ["reviewer"])
    if revoke is not None:
        revoked = services.revoke_key(trust_store, revoke, datetime.now(UTC))
        console.print(f"revoked key {revoke} ({revoked.name})")
    for k in services.trusted_keys(trust_store):
        state = f"revoked {k.revoked_at.isoformat()}" if k.revoked_at else "active"
        console.print(f"{k.key_id}  {k.name:<24} {','.join(k.roles):<20} {state}", highlight=False)


def _trust(trust_store: Path, public_key: Path, name: str, roles: list[str]) -> None:
    from nexuscore import services

    entry = services.trust_key(trust_store, public_key, name, roles)
    console.print(f"trusted key {entry.key_id} of {name} as {', '.join(roles)} in {trust_store}")


@app.command("sign")
def policy_sign(
    path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")],
    key: Annotated[Path, typer.Option(help="Your Ed25519 private key (PEM).")],
    signer: Annotated[str, typer.Option(help="Your name, as the trust store knows you.")],
    role: Role = "reviewer",
    valid_days: Annotated[int, typer.Option(min=1, help="Days until the signature expires.")] = 180,
) -> None:
    """Sign a policy: adds your signature over its digest to FILE.sig.json."""
    from nexuscore import services
    from nexuscore.policy import signatures_path

    sig, total = services.sign_policy(path, key, signer, role, datetime.now(UTC), valid_days)
    console.print(
        f"signed {sig.digest} as {role} (key {sig.key_id}); {len(total)} signature(s) in {signatures_path(path)}"
    )


@app.command("verify")
def policy_verify(
    path: Annotated[Path, typer.Argument(help="RoutingPolicy YAML file.")],
    trust_store: TrustStoreFile,
    min_signers: Annotated[int, typer.Option(min=1, help="Distinct valid signatures required.")] = 1,
) -> None:
    """Check a policy's signatures against the trust store, exactly as the agents do before using it.

    Exit 0 if it may be used; otherwise exit 2 with one reason: invalid_content, unsigned,
    unknown_key, revoked_key, expired, bad_signature or too_few_signatures."""
    from nexuscore.policy import load_signed_policy, load_trust_store

    trust = load_trust_store(trust_store)
    signed = load_signed_policy(path, trust, datetime.now(UTC), min_signers=min_signers)
    console.print(f"[green]OK[/]: {signed.policy.digest} signed by {'; '.join(signed.signers)}")


@app.command("diff")
def policy_diff(
    old: Annotated[Path, typer.Argument(help="The policy in force.")],
    new: Annotated[Path, typer.Argument(help="The candidate.")],
    fmt: Format = OutputFormat.table,
    output: Output = None,
) -> None:
    """Every field that differs between two policies (deployments, tenants, features and rules matched
    by id). Exit 0 either way; the digests say whether they are the same policy."""
    from nexuscore import services
    from nexuscore.policy import load_policy

    a, b = load_policy(old), load_policy(new)
    table = services.differences_table(a, b)
    err_console.print(f"{a.digest} -> {b.digest}: {table.num_rows} difference(s)")
    _print(table, fmt, "Policy differences", output)


@app.command("promote")
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
    from nexuscore import services

    event = services.promote(
        path,
        to,
        key=key,
        trust_store=trust_store,
        bootstrap=bootstrap,
        namespace=namespace,
        replay_report=replay_report,
        canary_share=canary_share,
        reason=reason,
    )
    share = f" for {canary_share:.0%} of tenants" if to == "canary" else ""
    console.print(
        f"policy {event.policy_version} {event.policy_digest} is now {to}{share} "
        f"(was {event.from_stage or 'unknown'}), signed by {event.actor}",
        highlight=False,
    )


@app.command("history")
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
    from nexuscore import services

    _print(services.policy_history(evidence_dir, trust_store), fmt, "Policy history", output)
