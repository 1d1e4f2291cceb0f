"""The producer SDK's pure parts: building and checking a request by the decider's rules, the
trace context, and folding a request's events into its result."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2

from nexuscore.client import (
    InvalidRequest,
    RequestSpec,
    Result,
    build_request,
    child_context,
    encode_checked,
    fold,
    parse_traceparent,
    request_event_id,
)
from nexuscore.core import EMPTY_STATE, MAX_PROMPT_BYTES, on_request
from nexuscore.schemas import AvroCodec, InferenceRequested, OutcomeRecorded, RequestDecided
from tests.factories import POLICY, T0

CODEC = AvroCodec()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def spec(**overrides: object) -> RequestSpec:
    fields: dict[str, object] = {
        "tenant_id": "acme-bank",
        "feature": "support-chat",
        "task_type": "chat",
        "risk_class": "low",
        "data_classification": "public",
        "prompt": "What is the balance on my account?",
        "max_output_tokens": 128,
    }
    fields.update(overrides)
    return msgspec.convert(fields, RequestSpec)


def built(**overrides: object) -> InferenceRequested:
    return build_request(spec(**overrides), request_id="r-1", trace_id=TRACE, now=T0, producer="tests")


def refused(**overrides: object) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        encode_checked(CODEC, built(**overrides), POLICY)
    return caught.value


def test_a_valid_request_encodes_to_what_the_decider_decodes() -> None:
    request = built(complexity=0.4, latency_slo_ms=3000, required_capabilities=["tools"])
    value = encode_checked(CODEC, request, POLICY)
    assert CODEC.decode(value, (InferenceRequested,)) == request
    assert request.trace_id == TRACE
    assert request.event_id == request_event_id("acme-bank", "r-1")


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"max_output_tokens": 0}, ">= 1"),
        ({"max_output_tokens": 32769}, "<= 32768"),
        ({"complexity": 1.5}, "<= 1.0"),
        ({"latency_slo_ms": 0}, ">= 1"),
        ({"risk_class": "extreme"}, "risk_class"),
        ({"data_classification": "secret"}, "data_classification"),
        ({"prompt": ""}, "prompt"),
        ({"feature": ""}, "feature"),
        ({"tenant_id": ""}, "tenant id"),
    ],
)
def test_what_the_decider_would_dead_letter_fails_in_the_producer_with_the_reason(
    overrides: dict[str, object], words: str
) -> None:
    error = refused(**overrides)
    assert error.code == "invalid_request"
    assert words in error.reason


def test_an_over_long_or_control_character_request_id_fails_in_the_producer() -> None:
    for rid in ("x" * 129, "bad\nid"):
        request = build_request(spec(), request_id=rid, trace_id=TRACE, now=T0, producer="tests")
        with pytest.raises(InvalidRequest, match="request_id"):
            encode_checked(CODEC, request, POLICY)


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"tenant_id": "nobody"}, "unknown_tenant"),
        ({"feature": "no-such-feature"}, "unknown_feature"),
        ({"task_type": "poetry"}, "unknown_task_type"),
        ({"prompt": "x" * 4 * 100_001}, "input_too_large"),
    ],
)
def test_admission_is_the_deciders_own_with_its_code_and_reason(
    overrides: dict[str, object], code: str
) -> None:
    error = refused(**overrides)
    assert error.code == code
    # The very rejection the decider records for the same request.
    _, _, out = on_request(EMPTY_STATE, built(**overrides), POLICY, "tests", T0)
    assert out[0].reason_code == code  # type: ignore[attr-defined]
    assert out[0].reason == error.reason  # type: ignore[attr-defined]


def test_without_a_policy_only_the_wire_and_the_size_limit_are_checked() -> None:
    encode_checked(CODEC, built(tenant_id="nobody"), None)  # the decider will reject it, with its reason
    with pytest.raises(InvalidRequest) as caught:
        encode_checked(CODEC, built(prompt="é" * (MAX_PROMPT_BYTES // 2 + 1)), None)
    assert caught.value.code == "request_too_large"


def test_the_key_is_the_tenant_id_and_the_partition_murmur2_of_it() -> None:
    # What the stages rely on: aiokafka's default partitioner is Kafka's (murmur2, positive, mod n).
    key = b"acme-bank"
    partitions = list(range(4))
    assert DefaultPartitioner()(key, partitions, partitions) == (murmur2(key) & 0x7FFFFFFF) % 4


def test_a_callers_traceparent_keeps_its_trace_and_gets_a_new_span() -> None:
    caller = f"00-{TRACE}-00f067aa0ba902b7-01"
    ctx = child_context(caller, "a" * 32, "b" * 16)
    assert ctx.trace_id == TRACE
    assert ctx.traceparent == f"00-{TRACE}-{'b' * 16}-01"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "00-xyz",
        f"01-{TRACE}-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-00f067aa0ba902b7-01",
        f"00-{TRACE}-{'0' * 16}-01",
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",
    ],
)
def test_a_malformed_traceparent_starts_a_new_trace(bad: str) -> None:
    assert parse_traceparent(bad) is None
    assert child_context(bad, "a" * 32, "b" * 16).trace_id == "a" * 32


def _decisions(**overrides: object) -> list[object]:
    _, _, out = on_request(EMPTY_STATE, built(**overrides), POLICY, "tests", T0)
    return out


def test_a_dispatch_then_its_outcome_folds_to_answered_and_stays_there() -> None:
    decided, dispatch = _decisions()
    assert isinstance(decided, RequestDecided)
    r = fold(None, decided)
    assert r is not None and r.status == "dispatched" and not r.terminal
    outcome = OutcomeRecorded(
        event_id="o-1", request_id="r-1", tenant_id="acme-bank", occurred_at=T0 + timedelta(seconds=1),
        producer="tests", status="answered", feature="support-chat", deployment_id="eu-small-1",
        model="m", model_version="v", region="eu", attempts=1, input_tokens=5, output_tokens=7,
        cost_micros=3, latency_ms=12.0, response="hello", finish_reason="stop",
    )  # fmt: skip
    answered = fold(r, outcome)
    assert answered is not None and answered.status == "answered" and answered.response == "hello"
    # A late or re-emitted event never rewrites a terminal state.
    assert fold(answered, decided) is answered
    assert fold(answered, msgspec.structs.replace(outcome, status="failed")) is answered


def test_an_escalation_carries_its_deadline_and_a_critical_request_escalates() -> None:
    (decided,) = _decisions(risk_class="critical")
    r = fold(None, decided)  # type: ignore[arg-type]
    assert isinstance(r, Result) and r.status == "escalated" and r.review_deadline is not None
    assert not r.terminal


def test_a_denial_for_budget_names_the_budget() -> None:
    from tests.factories import with_budgets

    poor = with_budgets(POLICY, "0", "0")
    _, _, out = on_request(EMPTY_STATE, built(), poor, "tests", T0)
    r = fold(None, out[0])
    assert r is not None and r.status == "denied" and r.reason_code == "budget_exhausted"


def test_the_consumer_drops_copies_by_event_id_and_messages_keyed_by_another_tenant() -> None:
    from nexuscore.client import NexusClient

    nexus = NexusClient("127.0.0.1:1", tenants=["acme-bank"])  # never started: take() is the fold
    decided, _ = _decisions()
    value = CODEC.encode(decided)  # type: ignore[arg-type]
    nexus.take(b"globex-insurance", value)  # not this client's tenant: not even decoded
    nexus.take(b"acme-bank", b"\xc3\x01garbage")
    assert nexus.peek("acme-bank", "r-1") is None and nexus.stats.undecodable == 1
    nexus.take(b"acme-bank", value)
    first = nexus.peek("acme-bank", "r-1")
    assert first is not None and first.status == "dispatched"
    nexus.take(b"acme-bank", value)
    assert nexus.stats.duplicates == 1 and nexus.peek("acme-bank", "r-1") is first
    everyone = NexusClient("127.0.0.1:1")
    everyone.take(b"globex-insurance", value)  # keyed by another tenant than the event's: ignored
    everyone.take(None, value)
    assert everyone.peek("acme-bank", "r-1") is None
