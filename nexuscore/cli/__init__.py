"""The ``nexuscore`` command line: typer parses the options, a function of ``nexuscore.services``
does the work, the command prints what it returns. Every deliberate error is one line on stderr
and exit code 2 (``main``).

One module per command group: ``run``, ``evidence``, ``policy``, ``review``, ``control``, ``gateway``
(its keys; ``run gateway`` too), and the top-level ``replay`` and ``demo``; ``_common`` holds the root app, the shared option types, the
printing of rows and ``main``.
"""

from nexuscore.cli import control, demo, evidence, gateway, policy, replay, review, run
from nexuscore.cli._common import app, main
from nexuscore.cli._help import reflow_help

app.command()(demo.demo)
app.command()(replay.replay)
run.app.command("gateway")(gateway.run_gateway)
app.add_typer(run.app, name="run")
app.add_typer(evidence.app, name="evidence")
app.add_typer(policy.app, name="policy")
app.add_typer(review.app, name="review")
app.add_typer(control.app, name="control")
app.add_typer(gateway.app, name="gateway")
reflow_help(app)

__all__ = ["app", "main"]
