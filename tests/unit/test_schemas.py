"""The wire contract: explicit names, Avro single-object encoding, committed .avsc files."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime

import fastavro
import msgspec
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form

from nexuscore.core import EMPTY_STATE, on_outcome, on_request, on_review, shadow_event
from nexuscore.kernel.errors import DecodeError
from nexuscore.schemas import (
    AVRO_DIR,
    EVENT_TYPES,
    ActRefused,
    AvroCodec,
    CircuitStateChanged,
    DeadLettered,
    Event,
    InferenceRequested,
    KillSwitchChanged,
    ModelCallAttempted,
    OutcomeRecorded,
    PolicyStageChanged,
    RequestDecided,
    RequestRejected,
    ReviewRecorded,
    avro_name,
    crc64_avro,
    fingerprint,
    schema_for,
    wire_name,
)
from tests.factories import POLICY, T0, replace, request

CODEC = AvroCodec()


def sample_events() -> list[Event]:
    req = request(feature="credit-memo", task_type="credit_decision", risk_class="high", complexity=0.3)
    state, reservation, decided = on_request(EMPTY_STATE, req, POLICY, "tests", T0)
    outcome = OutcomeRecorded(
        event_id="o1", request_id=req.request_id, tenant_id=req.tenant_id, occurred_at=T0, producer="t",
        status="answered", feature=req.feature, deployment_id="eu-mid-1", model="m", model_version="m-1",
        region="eu", attempts=1, input_tokens=8, output_tokens=20, cost_micros=93, latency_ms=12.5,
        response="ok", finish_reason="stop",
    )  # fmt: skip
    _, settled = on_outcome(state, reservation, outcome, "tests", T0)
    rejected = on_request(EMPTY_STATE, request(tenant_id="nobody"), POLICY, "tests", T0)[2][0]
    attempt = ModelCallAttempted(
        event_id="a1", request_id="r", tenant_id="t", occurred_at=T0, producer="t", attempt=1,
        deployment_id="eu-mid-1", region="eu", status="error", http_status=503, latency_ms=1.5, retryable=True,
        error="overloaded",
    )  # fmt: skip
    dead = DeadLettered(
        event_id="d1", request_id="", tenant_id="", occurred_at=T0, producer="t", source_topic="nexus.requests",
        source_partition=2, source_offset=41, reason="not Avro", raw_key=None, raw_value=b"\x00\xff",
    )  # fmt: skip
    review = ReviewRecorded(
        event_id="v1", request_id=req.request_id, tenant_id=req.tenant_id, occurred_at=T0, producer="t",
        action="approved", reviewer="alice@example.com", reason="checked the memo", deadline=T0,
    )  # fmt: skip
    stage = PolicyStageChanged(
        event_id="p1", request_id="", tenant_id="", occurred_at=T0, producer="t", policy_digest="sha256:ab",
        policy_version="2", from_stage="canary", to_stage="active", actor="bob", signers=["k1", "k2"],
        replay_report_digest="sha256:cd",
    )  # fmt: skip
    shadow = shadow_event(EMPTY_STATE, req, POLICY, decided[0], "tests", T0)
    critical = request(request_id="crit", risk_class="critical")
    escalated = on_request(EMPTY_STATE, critical, POLICY, "tests", T0)[2][0]
    assert isinstance(escalated, RequestDecided) and escalated.verdict == "escalated"
    approval = msgspec.structs.replace(review, request_id="crit")
    resolved = on_review(EMPTY_STATE, critical, escalated, approval, POLICY, "tests", T0)[2]
    circuit = CircuitStateChanged(
        event_id="c1", request_id="r", tenant_id="t", occurred_at=T0, producer="w1", deployment_id="eu-mid-1",
        region="eu", from_state="closed", to_state="open", reason="5 consecutive failures: HTTP 503",
        consecutive_failures=5, open_until=T0,
    )  # fmt: skip
    switch = KillSwitchChanged(
        event_id="k1", request_id="", tenant_id="", occurred_at=T0, producer="t", scope="tenant",
        target="acme-bank", mode="offline", actor="carol", reason="provider outage", key_id="ab", signature="c2ln",
    )  # fmt: skip
    refused = ActRefused(
        event_id="x1", request_id="", tenant_id="", occurred_at=T0, producer="t", act="kill_switch",
        act_event_id="k0", source_topic="nexus.governance", source_partition=0, source_offset=7, key_id="",
        claimed_actor="mallory", code="unsigned", reason="kill switch k0 is not signed",
    )  # fmt: skip
    return [
        req, *decided, outcome, *settled, rejected, attempt, dead, review, stage, shadow, escalated,
        *resolved, circuit, switch, refused,
    ]  # fmt: skip


def test_every_event_type_round_trips_and_the_samples_cover_them_all() -> None:
    events = sample_events()
    assert {type(e) for e in events} == set(EVENT_TYPES)
    for e in events:
        assert CODEC.decode(CODEC.encode(e)) == e


def test_wire_names_are_explicit_and_versioned_never_class_paths() -> None:
    names = [wire_name(t) for t in EVENT_TYPES]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[a-z_]+\.v[0-9]+", name), name


def test_the_committed_avsc_files_are_exactly_what_the_events_declare() -> None:
    # Drift between code and contract fails here; `make schemas` regenerates the files.
    for t in EVENT_TYPES:
        committed = json.loads((AVRO_DIR / f"{avro_name(t)}.avsc").read_text())
        assert committed == schema_for(t), f"{avro_name(t)}.avsc is stale: run `make schemas`"


def test_messages_are_single_object_encoded_and_readable_with_plain_fastavro() -> None:
    for e in sample_events():
        data = CODEC.encode(e)
        assert data[:2] == b"\xc3\x01"
        schema = json.loads((AVRO_DIR / f"{avro_name(type(e))}.avsc").read_text())
        canonical = to_parsing_canonical_form(schema)
        assert data[2:10].hex() == fastavro_fingerprint(canonical, "CRC-64-AVRO")
        record = fastavro.schemaless_reader(io.BytesIO(data[10:]), fastavro.parse_schema(schema), None)
        assert record["event_id"] == e.event_id


def test_crc64_avro_matches_the_specifications_empty_fingerprint_and_fastavro() -> None:
    assert crc64_avro(b"") == 0xC15D213AA4D7A795
    canonical = to_parsing_canonical_form({"type": "string"})
    assert crc64_avro(canonical.encode()).to_bytes(8, "little").hex() == fastavro_fingerprint(
        canonical, "CRC-64-AVRO"
    )


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b'{"tenant_id": "acme"}', "not Avro single-object encoding"),
        (b"\xc3\x01" + b"\x00" * 8 + b"\x02", "unknown schema fingerprint"),
    ],
)
def test_bad_bytes_are_refused_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        CODEC.decode(data)


def test_truncated_and_out_of_range_messages_are_refused() -> None:
    valid = CODEC.encode(request())
    with pytest.raises(DecodeError, match="body does not match inference_requested_v1"):
        CODEC.decode(valid[: len(valid) // 2])
    zero = CODEC.encode(replace(request(), max_output_tokens=0))
    with pytest.raises(DecodeError, match=r"invalid inference_requested_v1: Expected `int` >= 1"):
        CODEC.decode(zero)
    bad_class = CODEC.encode(replace(request(), data_classification="secret"))
    with pytest.raises(DecodeError, match="Invalid enum value 'secret'"):
        CODEC.decode(bad_class)


def test_tombstones_and_trailing_bytes_are_refused() -> None:
    with pytest.raises(DecodeError, match="no value"):
        CODEC.decode(None)
    with pytest.raises(DecodeError, match="3 bytes after the inference_requested_v1 body"):
        CODEC.decode(CODEC.encode(request()) + b"xyz")


def test_an_event_on_the_wrong_topic_is_refused() -> None:
    rejected = RequestRejected(
        event_id="x", request_id="r", tenant_id="t", occurred_at=T0, producer="p", reason_code="c", reason="r"
    )
    with pytest.raises(DecodeError, match="does not belong on this topic"):
        CODEC.decode(CODEC.encode(rejected), (InferenceRequested,))


def test_times_are_tz_aware_utc_on_the_way_back() -> None:
    e = request(occurred_at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC))
    back = CODEC.decode(CODEC.encode(e))
    assert back.occurred_at == e.occurred_at and back.occurred_at.utcoffset() is not None
    assert msgspec.structs.asdict(back) == msgspec.structs.asdict(e)


def test_a_message_written_with_an_earlier_schema_version_is_read_into_the_current_one() -> None:
    # inference_requested.v1 gained `data_subject` (with a default); messages written before still decode.
    old_path = next((AVRO_DIR / "history").glob("inference_requested_v1.*.avsc"))
    old = json.loads(old_path.read_text())
    assert "data_subject" not in {f["name"] for f in old["fields"]}
    req = request()
    record = {
        k: v for k, v in msgspec.to_builtins(req, builtin_types=(datetime,)).items() if k != "data_subject"
    }
    body = io.BytesIO()
    fastavro.schemaless_writer(body, fastavro.parse_schema(old), record)
    data = b"\xc3\x01" + fingerprint(old) + body.getvalue()
    assert data[2:10].hex() == old_path.name.split(".")[1]
    assert CODEC.decode(data) == req
