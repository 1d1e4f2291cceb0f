"""What every command module shares: the root app, the option types, the options' own checks
(required keys, times), the one way rows are printed, and ``main`` (every deliberate error: one
line on stderr, exit 2)."""

from __future__ import annotations

import base64
import contextlib
import csv
import enum
import importlib.util
import json
import logging
import os
import sys
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO

import typer
from rich.console import Console
from rich.table import Table

from nexuscore._text import safe_rich_text, safe_text
from nexuscore.kernel.errors import NexusError

if TYPE_CHECKING:
    import pyarrow as pa

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    help="NexusCore: a governed LLM gateway. Decides which model may answer, where, under which budget "
    "and decode strategy, and records every decision as queryable evidence.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

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


def _checked_namespace(value: str) -> str:
    """A bad --namespace is one line and exit 2, before anything starts."""
    if not value:
        return value
    from nexuscore.transport import check_namespace  # lazy: aiokafka; --help stays fast

    return check_namespace(value)


Namespace = Annotated[
    str,
    typer.Option(
        "--namespace",
        help="Isolates a pipeline on a shared broker: NS names the topics NS.nexus.* and the groups "
        "NS.nexuscore-* (letters, digits, '_' and '-').",
        callback=_checked_namespace,
    ),
]
MetricsPort = Annotated[
    int,
    typer.Option(
        "--metrics-port",
        min=0,
        max=65535,
        help="Serve Prometheus metrics on this port at /metrics (0: off).",
        envvar="NEXUSCORE_METRICS_PORT",
    ),
]
PolicyFile = Annotated[Path, typer.Option("--policy", "-p", help="RoutingPolicy YAML file.")]


def _bundled_policy() -> Path:
    """``nexuscore.policy.DEFAULT_POLICY_PATH``, found without importing that package: pydantic and
    the policy model are about a quarter of a second of every command's start-up (a test pins the
    two paths equal)."""
    spec = importlib.util.find_spec("nexuscore.policy")
    folder = spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else "."
    return (Path(folder) / "policies" / "default.yaml").resolve()


DEFAULT_POLICY_FILE = _bundled_policy()
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
# The deciders' trust store, where a command may also be run without one (it then says so).
SignersTrust = Annotated[
    Path | None,
    typer.Option(
        "--trust-store", "-t", help="Trusted policy signers (YAML).", envvar="NEXUSCORE_TRUST_STORE"
    ),
]
TrustStoreFile = Annotated[
    Path,
    typer.Option(
        "--trust-store",
        "-t",
        help="YAML file of the trusted public keys and their roles.",
        envvar="NEXUSCORE_TRUST_STORE",
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
Reason = Annotated[str, typer.Option("--reason", help="Why (recorded as evidence).")]


# --- the options' own checks ------------------------------------------------------------------------


def parse_time(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 date or time option as an aware datetime (UTC unless it names a zone)."""
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


def required_trust(trust_store: Path | None) -> Path:
    if trust_store is None:
        raise NexusError(
            "no trust store: pass --trust-store or set NEXUSCORE_TRUST_STORE "
            "(a YAML of trusted policy signers: `nexuscore policy keygen --trust-store FILE`)"
        )
    return trust_store


def required_signing_key(signing_key: Path | None) -> Path:
    if signing_key is None:
        raise NexusError(
            "no signing key: pass --signing-key or set NEXUSCORE_EVIDENCE_SIGNING_KEY "
            "(create one with `nexuscore evidence keygen`)"
        )
    return signing_key


def trusted_public_key(public_key: Path | None) -> Path:
    """--public-key, else the public half of NEXUSCORE_EVIDENCE_SIGNING_KEY."""
    key = optional_public_key(public_key)
    if key is None:
        raise NexusError(
            "no trusted key: pass --public-key (or set NEXUSCORE_EVIDENCE_PUBLIC_KEY) to the signer's public key"
        )
    return key


def optional_public_key(public_key: Path | None) -> Path | None:
    """The trusted key if one was given (option or environment); None: the command does not verify."""
    if public_key is not None:
        return public_key
    signing = os.environ.get("NEXUSCORE_EVIDENCE_SIGNING_KEY")
    return Path(signing) if signing else None


# --- printing ---------------------------------------------------------------------------------------


def _print(table: pa.Table, fmt: str, title: str | None = None, output: Path | None = None) -> None:
    """Rows as a table, CSV, JSON or Parquet, on stdout or in ``output``; text from outside (prompts,
    reasons, names) shown literally, never read as markup or terminal escapes."""
    if fmt == "parquet":
        if output is None:
            raise NexusError("--format parquet needs --output FILE")
        # pyarrow.parquet: only for the one format that needs it.
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
            _print_table(table.column_names, rows, title, None if output is None else stream)
    if output is not None:
        err_console.print(f"wrote {table.num_rows} rows to {safe_text(output)}")


def _print_table(
    columns: list[str], rows: list[dict[str, Any]], title: str | None, stream: TextIO | None
) -> None:
    # Every cell, header and title may hold text from outside (prompts, reasons, names, an SQL
    # alias): as rich Text it is shown literally, never read as markup or escapes.
    out = Table(title=None if title is None else safe_rich_text(title))
    for name in columns:
        out.add_column(safe_rich_text(name), overflow="fold")
    for row in rows:
        out.add_row(*(safe_rich_text("" if v is None else v) for v in row.values()))
    if stream is None:
        # A pipe gets the whole width of the rows, not the 80 columns rich assumes.
        (console if console.is_terminal else Console(width=200)).print(out)
    else:
        Console(file=stream, width=200).print(out)


def _json_default(value: object) -> str:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    return str(value)


def log_level(name: str) -> int:
    """The level NEXUSCORE_LOG_LEVEL names (INFO shows what a stage does on the way: restores,
    rebalances). WARNING when unset or unknown: a misspelt level is not worth refusing to start."""
    level = logging.getLevelName(name.strip().upper() or "WARNING")
    return level if isinstance(level, int) else logging.WARNING


def main() -> None:
    """The ``nexuscore`` command: every deliberate error is one line on stderr and exit code 2."""
    logging.basicConfig(
        level=log_level(os.environ.get("NEXUSCORE_LOG_LEVEL", "")),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app()
    except NexusError as exc:
        # The message often quotes input (a file's content, an id, a query): one line, shown as is.
        err_console.print(f"[red]error:[/] {safe_text(exc)}", highlight=False, soft_wrap=True, emoji=False)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
