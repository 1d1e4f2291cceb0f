"""compose.yaml checked without Docker: every service that runs nexuscore gives a command the CLI's
own parser accepts (resolved and its context built, nothing run), and every file it names exists
once ``make compose-keys`` has run, or is a volume the stack makes. Where a Docker engine answers,
``docker compose up`` is run for real and a request must be decided."""

from __future__ import annotations

import os
import re
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.core import TyperGroup

from nexuscore._broker import docker_available
from nexuscore._devkeys import compose_keys
from nexuscore.cli import app
from nexuscore.policy import DEFAULT_POLICY_PATH

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
NEXUSCORE = sorted(n for n, s in COMPOSE["services"].items() if (s.get("command") or [""])[0] == "nexuscore")
# Commands another branch adds (the gateway): checked once the CLI has them.
_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]+)\}")


def parse(args: list[str]) -> Any:
    """The context the CLI would run ``nexuscore ARGS`` in: every group resolved by name, the
    command's options converted and checked (a bad flag or value raises), the command not called."""
    command: Any = typer.main.get_command(app)
    name, ctx = "nexuscore", None
    while isinstance(command, TyperGroup):
        ctx = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        sub = command.get_command(ctx, args[0]) if args else None
        assert sub is not None, f"no command {args[:1]} under {name}"
        command, name, args = sub, args[0], args[1:]
    return command.make_context(name, list(args), parent=ctx)


def mounts(service: dict[str, Any], keys: Path) -> dict[str, Path | None]:
    """Container folder -> host folder (None: a named volume the stack makes)."""
    out: dict[str, Path | None] = {}
    for volume in service.get("volumes", []):
        source, target = _DEFAULT.sub(r"\1", volume).split(":")[:2]
        if source == "./deploy/keys":
            out[target] = keys
        elif source.startswith("."):
            out[target] = ROOT / source
        else:
            out[target] = None
    return out


def referenced_files(ctx: Any) -> list[Path]:
    return [v for v in ctx.params.values() if isinstance(v, Path)]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("compose-keys")
    compose_keys(folder, DEFAULT_POLICY_PATH)  # what `make compose-keys` runs
    return folder


def test_compose_runs_every_stage_the_init_and_prometheus() -> None:
    services = COMPOSE["services"]
    assert {"kafka", "init", "decider", "worker", "projector", "gateway", "provider", "prometheus"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    for name in ("decider", "worker", "projector", "gateway"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert services["init"]["depends_on"]["kafka"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", NEXUSCORE)
def test_every_command_is_accepted_by_the_cli_and_its_files_exist(name: str, keys: Path) -> None:
    service = COMPOSE["services"][name]
    args = service["command"][1:]
    ctx = parse(args)
    volumes = mounts(service, keys)
    for path in referenced_files(ctx):
        mount = next((m for m in volumes if path.is_relative_to(m)), None)
        assert mount is not None, f"{name}: {path} is on no volume"
        host = volumes[mount]
        if host is not None and path.suffix:  # a file on a host folder; named volumes are made
            assert (host / path.relative_to(mount)).is_file(), f"{name}: {path} is not made by compose-keys"


def test_a_bad_flag_or_value_fails_the_parse() -> None:
    with pytest.raises(Exception, match="No such option"):
        parse(["run", "worker", "--bootstrap", "kafka:9092", "--no-such-flag"])
    with pytest.raises(typer.BadParameter, match="65535"):
        parse(["run", "worker", "--bootstrap", "kafka:9092", "--metrics-port", "70000"])
    with pytest.raises(AssertionError, match="no command"):
        parse(["run", "no-such-stage"])


def test_prometheus_scrapes_every_stage_metrics_port() -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {
        t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]
    }
    for name in NEXUSCORE:
        args = COMPOSE["services"][name]["command"]
        if "--metrics-port" in args:
            assert f"{name}:{args[args.index('--metrics-port') + 1]}" in targets


@pytest.mark.skipif(not docker_available(), reason="no Docker engine answers here")
def test_docker_compose_up_decides_a_request(keys: Path) -> None:
    project = f"nexuscore-test-{uuid.uuid4().hex[:6]}"
    compose = ["docker", "compose", "-p", project, "-f", str(ROOT / "compose.yaml")]
    run_env = {**os.environ, "NEXUSCORE_KEYS": str(keys)}
    try:
        subprocess.run([*compose, "up", "-d", "--build", "--wait", "decider", "worker", "projector", "provider"],
                       check=True, env=run_env, timeout=900)  # fmt: skip
        publish = (
            "import asyncio; from datetime import UTC, datetime;"
            "from nexuscore._synthetic import synthetic_requests, publish;"
            "from nexuscore.policy import default_policy; from nexuscore.schemas import AvroCodec;"
            "from nexuscore.transport import Topics, new_producer, start_client\n"
            "async def main():\n"
            " p = new_producer('kafka:9092'); await start_client(p, 'kafka:9092')\n"
            " await publish(p, Topics(), AvroCodec(), synthetic_requests(default_policy(), 5, seed=1, start=datetime.now(UTC), run='compose'))\n"
            " await p.stop()\n"
            "asyncio.run(main())"
        )
        subprocess.run(
            [*compose, "exec", "-T", "decider", "python", "-c", publish], check=True, env=run_env, timeout=120
        )
        scrape = (
            "import sys, time, urllib.request\n"
            "for _ in range(120):\n"
            " text = urllib.request.urlopen('http://localhost:9100/metrics').read().decode()\n"
            " if 'nexuscore_decisions_total{' in text: sys.exit(0)\n"
            " time.sleep(1)\n"
            "sys.exit(1)"
        )
        subprocess.run(
            [*compose, "exec", "-T", "decider", "python", "-c", scrape], check=True, env=run_env, timeout=180
        )
    finally:
        subprocess.run([*compose, "down", "-v"], env=run_env, timeout=300, check=False)
