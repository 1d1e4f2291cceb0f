"""Fixtures shared by the test tiers. The broker is real Kafka, started once per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nexuscore._broker import kafka_broker


@pytest.fixture(scope="session")
def bootstrap() -> Iterator[str]:
    """A real Kafka broker: NEXUSCORE_BOOTSTRAP, testcontainers where Docker answers, else a local KRaft broker."""
    with kafka_broker() as address:
        yield address
