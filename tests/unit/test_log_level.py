"""NEXUSCORE_LOG_LEVEL: an operator's way to see what a stage does, never a reason not to start."""

from __future__ import annotations

import logging

import pytest

from nexuscore.cli._common import log_level


@pytest.mark.parametrize(
    ("name", "level"), [("INFO", logging.INFO), (" debug ", logging.DEBUG), ("error", logging.ERROR)]
)
def test_a_named_level_is_taken(name: str, level: int) -> None:
    assert log_level(name) == level


@pytest.mark.parametrize("name", ["", "verbose", "Level 5", "\x00"])
def test_an_unset_or_unknown_level_stays_warning(name: str) -> None:
    assert log_level(name) == logging.WARNING
