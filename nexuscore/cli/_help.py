"""Command help as paragraphs: a docstring's line breaks are where its source wraps, not where the
reader's terminal does.

Typer (0.29) keeps the single line breaks of every paragraph after a command's first, so a help
text came out broken twice: at the source's 100 columns and again at the terminal's. Each command's
docstring is reflowed once, when the app is assembled: paragraphs (split on blank lines) become one
line each, and the terminal wraps them.
"""

from __future__ import annotations

import inspect

import typer


def reflow(doc: str) -> str:
    """``doc`` with each paragraph's lines joined by spaces; paragraphs stay apart."""
    paragraphs = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def reflow_help(app: typer.Typer) -> None:
    """Reflow the docstring of every command of ``app`` and of its sub-apps, in place."""
    for command in app.registered_commands:
        if command.callback is not None and command.callback.__doc__:
            command.callback.__doc__ = reflow(command.callback.__doc__)
    for group in app.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)
