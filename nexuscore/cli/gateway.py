"""``nexuscore gateway key add|revoke|list`` (the API keys) and ``nexuscore run gateway`` (the
OpenAI-compatible HTTP gateway in the foreground)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import msgspec
import typer

from nexuscore.cli._common import Bootstrap, Namespace, _print_table
from nexuscore.kernel.errors import NexusError

app = typer.Typer(help="The OpenAI-compatible gateway's API keys.", no_args_is_help=True)
keys_app = typer.Typer(
    help="Add, revoke and list API keys (stored hashed; a secret is shown once).", no_args_is_help=True
)
app.add_typer(keys_app, name="key")

KeysFile = Annotated[
    Path,
    typer.Option("--keys", "-k", help="The gateway's key file (mode 0600).", envvar="NEXUSCORE_GATEWAY_KEYS"),
]


@keys_app.command("add")
def key_add(
    tenant: Annotated[str, typer.Option(help="The tenant every request with this key is made for.")],
    keys: KeysFile = Path("gateway-keys.json"),
    feature: Annotated[str, typer.Option(help="Default feature (a request may name another).")] = "",
    data_classification: Annotated[
        str, typer.Option(help="Default data classification: public, internal, confidential, restricted.")
    ] = "confidential",
    risk_class: Annotated[
        str, typer.Option(help="Default risk class: low, medium, high, critical.")
    ] = "medium",
    task_type: Annotated[str, typer.Option(help="Default task type (one of the policy's).")] = "chat",
    latency_slo_ms: Annotated[
        int | None, typer.Option(help="Default latency SLO in ms (else the feature's).")
    ] = None,
) -> None:
    """Make a key for TENANT; prints its id and its secret, once (only the secret's sha256 is kept)."""
    from nexuscore.gateway import KeyDefaults, add_key

    try:
        defaults = msgspec.convert(
            {"feature": feature, "data_classification": data_classification, "risk_class": risk_class,
             "task_type": task_type, "latency_slo_ms": latency_slo_ms},
            KeyDefaults,
        )  # fmt: skip
    except msgspec.ValidationError as exc:
        raise NexusError(f"invalid key defaults: {exc}") from exc
    key, secret = add_key(keys, tenant, defaults, datetime.now(UTC))
    print(f"key {key.key_id} for tenant {key.tenant_id}")
    print(secret)


@keys_app.command("revoke")
def key_revoke(
    key_id: Annotated[str, typer.Argument(help="The key's id (key_...).")],
    keys: KeysFile = Path("gateway-keys.json"),
) -> None:
    """Revoke a key: the running gateway refuses it from its next request on."""
    from nexuscore.gateway import revoke_key

    key = revoke_key(keys, key_id, datetime.now(UTC))
    print(f"key {key.key_id} of tenant {key.tenant_id} revoked at {key.revoked_at}")


@keys_app.command("list")
def key_list(keys: KeysFile = Path("gateway-keys.json")) -> None:
    """Every key with its tenant, defaults and state (never a secret: none is stored)."""
    from nexuscore.gateway import read_keys

    rows = [
        {
            "key": k.key_id,
            "tenant": k.tenant_id,
            "feature": k.defaults.feature,
            "classification": k.defaults.data_classification,
            "risk": k.defaults.risk_class,
            "task": k.defaults.task_type,
            "slo_ms": k.defaults.latency_slo_ms,
            "created": f"{k.created_at:%Y-%m-%d %H:%M}",
            "state": f"revoked {k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "live",
        }  # fmt: skip
        for k in read_keys(keys).keys
    ]
    columns = ["key", "tenant", "feature", "classification", "risk", "task", "slo_ms", "created", "state"]
    _print_table(columns, rows, f"gateway keys in {keys}", None)


def run_gateway(
    bootstrap: Bootstrap,
    keys: KeysFile = Path("gateway-keys.json"),
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="Port to listen on (0 picks a free one).")
    ] = 8080,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0 inside a container).")
    ] = "127.0.0.1",
    namespace: Namespace = "",
    policy: Annotated[
        Path | None,
        typer.Option("--policy", "-p", help="Check requests against this policy's admission before sending."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to await a result before answering 504.")
    ] = 60.0,
    lookback: Annotated[
        float, typer.Option(min=0.0, help="Seconds of past answers read at start (retries after a restart).")
    ] = 300.0,
) -> None:
    """The OpenAI-compatible HTTP gateway: POST /v1/chat/completions, GET /v1/models and
    GET /v1/nexus/requests/{id}; the tenant comes from the API key (Authorization: Bearer)."""
    from nexuscore.gateway import GatewaySettings
    from nexuscore.gateway import run_gateway as run
    from nexuscore.policy import load_policy

    settings = GatewaySettings(
        bootstrap=bootstrap, keys=keys, namespace=namespace, host=host, port=port,
        policy=load_policy(policy) if policy else None, timeout_s=timeout, lookback_s=lookback,
    )  # fmt: skip
    run(settings, lambda url: print(f"gateway listening on {url}", flush=True))
