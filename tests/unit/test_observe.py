"""The metrics hooks: nothing kept while metrics are off, counters moved once per batch by exactly
the events of the batch, and free-text reasons turned into bounded labels."""

from __future__ import annotations

import re
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from nexuscore.core import EMPTY_STATE, on_request
from nexuscore.kernel.errors import NexusError
from nexuscore.observe import (
    Tally,
    configure_tracing,
    enabled,
    parse_traceparent,
    reason_class,
    serve_metrics,
    trace_id_of,
    tracing_enabled,
    valid_trace_id,
    with_trace,
)
from nexuscore.policy import default_policy
from nexuscore.schemas import RequestDecided
from nexuscore.transport import dead_letter
from tests.factories import request

NOW = datetime(2026, 11, 30, 9, tzinfo=UTC)


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def metrics_on() -> None:
    if not enabled():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        serve_metrics(port, "127.0.0.1")


def test_a_tally_keeps_nothing_while_metrics_are_off() -> None:
    if enabled():
        pytest.fail("run this test before metrics are turned on in this process (it is first in the file)")
    tally = Tally("decider")
    _, _, out = on_request(EMPTY_STATE, request(), default_policy(), "tests", NOW)
    tally.extend(out)
    assert tally.events == []


def test_decisions_rejections_and_dead_letters_move_their_counters_once_per_batch(metrics_on: None) -> None:
    tally = Tally("test-stage")
    policy = default_policy()
    decisions = [
        on_request(EMPTY_STATE, request(request_id=f"m-{i}"), policy, "tests", NOW)[2] for i in range(3)
    ]
    rejected = on_request(EMPTY_STATE, request(request_id="m-x", tenant_id="nobody"), policy, "tests", NOW)[2]
    first = decisions[0][0]
    assert isinstance(first, RequestDecided)
    labels = {"verdict": first.verdict, "tier": first.routing.tier or "none", "tenant": "acme-bank"}
    before = value("nexuscore_decisions_total", **labels)
    for out in decisions:
        tally.extend(out)
    tally.extend(rejected)
    tally.add(dead_letter("t", 0, 7, b"k", b"v", "not avro: bad magic 0x7b", "tests", NOW))
    assert value("nexuscore_decisions_total", **labels) == before, "nothing moves before the batch ends"
    tally.flush()
    assert value("nexuscore_decisions_total", **labels) == before + 3
    assert value("nexuscore_decisions_total", verdict="rejected", tier="none", tenant="unknown") >= 1
    assert value("nexuscore_refusals_total", stage="test-stage", kind="request", reason="unknown_tenant") == 1
    assert value("nexuscore_dead_letters_total", stage="test-stage", reason="not avro") == 1
    assert value("nexuscore_budget_utilisation", tenant="acme-bank", feature="*") > 0
    assert tally.events == []


@pytest.mark.parametrize(
    ("reason", "label"),
    [
        ("not avro: bad magic 0x7b", "not avro"),
        (
            "message key b'\\x00evil' is not the request id 'x'",
            "message key bx00evil is not the request id x",
        ),
        ("internal error: KeyError: 'x'", "internal error"),
        ("", "unspecified"),
        ("\x1b[31m" + "A" * 200, "31m" + "a" * 45),
    ],
)
def test_a_reason_becomes_a_bounded_label(reason: str, label: str) -> None:
    assert reason_class(reason) == label
    assert len(reason_class(reason)) <= 48


def test_a_bad_metrics_port_is_one_clear_error() -> None:
    with pytest.raises(NexusError, match="--metrics-port"):
        serve_metrics(70000)


@pytest.mark.parametrize(
    ("header", "parsed"),
    [
        (
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ),
        (
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ),
        (b"00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
        (b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
        (b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", None),
        (b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra", None),
        (b"\xff\xfe garbage", None),
        (None, None),
    ],
)
def test_traceparent_headers_are_read_as_w3c_says(
    header: bytes | str | None, parsed: tuple[str, str] | None
) -> None:
    assert parse_traceparent(header) == parsed


def test_a_request_without_a_valid_trace_id_gets_a_stable_derived_one() -> None:
    own = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of(own, "acme-bank", "r1") == own
    derived = trace_id_of("not-a-trace", "acme-bank", "r1")
    assert valid_trace_id(derived) and derived == trace_id_of("", "acme-bank", "r1")
    assert derived != trace_id_of("", "other-bank", "r1"), "request ids are unique per tenant only"
    assert with_trace(request(trace_id="")).trace_id == trace_id_of("", "acme-bank", "req-1")


def test_every_metric_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    names = {m.name for m in REGISTRY.collect() if m.name.startswith("nexuscore_")}
    assert names, "the metrics are registered on import"
    missing = [n for n in names if not re.search(rf"`{n}(_total)?`", readme)]
    assert not missing, missing


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"},
     {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}],
)  # fmt: skip
def test_tracing_stays_off_unless_opentelemetry_is_configured(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert configure_tracing("tests") is False
    assert not tracing_enabled()


def test_an_exporter_this_build_lacks_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(NexusError, match="OTEL_TRACES_EXPORTER='zipkin' is not supported"):
        configure_tracing("tests")


def test_a_runtime_that_never_ends_a_batch_is_counted_in_bounded_chunks(metrics_on: None) -> None:
    tally = Tally("no-batches")
    letters = [dead_letter("t", 0, i, b"k", b"v", "bad: x", "tests", NOW) for i in range(2500)]
    for dl in letters:
        tally.add(dl)
    assert len(tally.events) == 2500 % 1000
    assert value("nexuscore_dead_letters_total", stage="no-batches", reason="bad") == 2000
