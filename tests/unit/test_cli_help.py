"""Command help reads as paragraphs: every command's docstring is reflowed when the app is built,
so the terminal wraps it once (typer kept the source's line breaks after the first paragraph)."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from nexuscore.cli import app
from nexuscore.cli._help import reflow

RUNNER = CliRunner()


def test_reflow_joins_each_paragraphs_lines_and_keeps_paragraphs_apart() -> None:
    doc = """First line
    goes on.

        Second paragraph,
        wrapped here
        and here.
    """
    assert reflow(doc) == "First line goes on.\n\nSecond paragraph, wrapped here and here."


def test_every_commands_help_is_its_paragraphs_one_line_each() -> None:
    def commands(t: typer.Typer) -> list[str]:
        docs = [c.callback.__doc__ for c in t.registered_commands if c.callback and c.callback.__doc__]
        for group in t.registered_groups:
            if group.typer_instance is not None:
                docs += commands(group.typer_instance)
        return docs

    docs = commands(app)
    assert len(docs) > 20
    for doc in docs:
        assert all("\n" not in p for p in doc.split("\n\n")), doc


def test_verify_help_wraps_at_the_terminal_not_at_the_source() -> None:
    shown = RUNNER.invoke(app, ["evidence", "verify", "--help"], terminal_width=200).output
    text = re.sub(r"\s+", " ", shown)
    # The source broke these words across lines; on a wide terminal they now share one.
    assert any(
        "recomputes each file's sha256 against its sealed entry" in line for line in shown.splitlines()
    ), text
