"""``nexuscore demo``: the whole pipeline on a local broker, end to end, then who routed what."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nexuscore.cli._common import DEFAULT_POLICY_FILE, EvidenceDir, PolicyFile, _print, console

# Lazy imports: the demo and nexuscore.services load faust, aiokafka and duckdb, about a second;
# the command imports them when it runs, so that `nexuscore --help` stays fast.


def demo(
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=1, help="How many synthetic requests to send.")
    ] = 1000,
    evidence_dir: EvidenceDir = Path("evidence"),
    policy: PolicyFile = DEFAULT_POLICY_FILE,
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
    from nexuscore import services
    from nexuscore._demo import run_demo

    run_demo(requests, evidence_dir, policy, timeout, console, keys_dir=keys_dir)
    title = "Who routed what (by tenant, tier and terminal state)"
    _print(services.routing_summary(evidence_dir.resolve()), "table", title)
    console.print(
        f"evidence: {evidence_dir.resolve()}  (try: nexuscore evidence who-routed-what -e {evidence_dir})"
    )
