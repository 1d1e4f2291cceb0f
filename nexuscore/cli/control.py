"""``nexuscore control``: kill switches (off, offline, on), signed by an operator."""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer

from nexuscore.cli._common import Bootstrap, Namespace, Reason, TrustStoreFile, console
from nexuscore.kernel.errors import NexusError

# Lazy import: nexuscore.services loads faust, aiokafka and duckdb, about a second; each command
# imports it when it runs, so that `nexuscore --help` stays fast.

app = typer.Typer(
    help="Kill switches: turn inference off, or offline (cached answers only, tools disabled), "
    "globally or for one tenant or feature, in seconds and without a restart; then on again.",
    no_args_is_help=True,
)


class Scope(enum.StrEnum):
    global_ = "global"
    tenant = "tenant"
    feature = "feature"


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
    from nexuscore import services

    if key is None:
        raise NexusError("an operator's signing key is needed: --key PEM or NEXUSCORE_OPERATOR_KEY")
    event = services.throw_switch(
        mode,
        scope.value,
        target,
        reason,
        key=key,
        trust_store=trust_store,
        bootstrap=bootstrap,
        namespace=namespace,
        actor=actor,
    )
    where = "globally" if scope is Scope.global_ else f"for {scope.value} {target}"
    console.print(
        f"inference {mode} {where}: event {event.event_id} signed by {event.actor} (deciders take it up within a second)",
        highlight=False,
    )


@app.command("off")
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


@app.command("offline")
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


@app.command("on")
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
