"""The generated Avro writer (``schemas/_encoder.py``) writes exactly fastavro's bytes.

fastavro, fed ``msgspec.to_builtins`` as the codec fed it before, is the reference: every event of a
recorded history, every sample event type, and generated events with values at the edges (aware
times across centuries, longs at both ends of 64 bits, NaN and infinities, empty and long lists,
unions on either branch) must encode to the same bytes, or fail the same way.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import fastavro
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexuscore.schemas import AVRO_DIR, EVENT_TYPES, AvroCodec, Event, avro_name
from nexuscore.schemas._codec import _NATIVE
from nexuscore.schemas._encoder import compile_encoder
from tests.factories import POLICY, T0, replace, run_history
from tests.unit.test_schemas import sample_events

CODEC = AvroCodec()
SCHEMAS = {
    cls: json.loads((AVRO_DIR / f"{avro_name(cls)}.avsc").read_text(encoding="utf-8")) for cls in EVENT_TYPES
}
PARSED = {cls: fastavro.parse_schema(schema) for cls, schema in SCHEMAS.items()}


def reference(event: Event) -> bytes:
    """What the codec wrote before the generated writer: fastavro over the event's builtins."""
    out = io.BytesIO()
    out.write(CODEC.encode(event)[:10])  # the marker and fingerprint, which the writer does not touch
    builtins = msgspec.to_builtins(event, builtin_types=_NATIVE)
    fastavro.schemaless_writer(out, PARSED[type(event)], builtins)
    return out.getvalue()


def outcome(write: Any, event: Event) -> tuple[str, bytes]:
    try:
        return "ok", write(event)
    except Exception as exc:  # noqa: BLE001  # the same failure is what is compared
        return type(exc).__name__, b""


def test_every_committed_schema_gets_a_generated_writer() -> None:
    # Without one the codec silently falls back to fastavro, three times slower for a decision.
    missing = [avro_name(cls) for cls, schema in SCHEMAS.items() if compile_encoder(schema) is None]
    assert missing == []


def test_every_event_of_a_recorded_history_and_every_sample_encodes_as_fastavro_does() -> None:
    events = [*run_history(POLICY, 400, seed=3), *sample_events()]
    assert {type(e) for e in events} >= {
        cls for cls in EVENT_TYPES if cls.__name__ != "ShadowDecisionRecorded"
    }
    differing = [(type(e).__name__, e.event_id) for e in events if CODEC.encode(e) != reference(e)]
    assert differing == []
    assert all(CODEC.decode(CODEC.encode(e)) == e for e in events)


def test_a_naive_time_is_written_by_fastavro_as_before() -> None:
    naive = replace(sample_events()[0], occurred_at=datetime(2026, 11, 30, 12, 0))  # noqa: DTZ001
    assert CODEC.encode(naive) == reference(naive)


def test_a_value_of_the_wrong_type_fails_as_fastavro_fails() -> None:
    wrong = replace(sample_events()[0], max_output_tokens="many")
    assert outcome(CODEC.encode, wrong)[0] == outcome(reference, wrong)[0] != "ok"


def test_a_schema_with_a_type_the_generator_does_not_write_is_left_to_fastavro() -> None:
    for field_type in ({"type": "map", "values": "string"}, {"type": "enum", "name": "e", "symbols": ["a"]}):
        schema = {"type": "record", "name": "r", "fields": [{"name": "f", "type": field_type}]}
        assert compile_encoder(schema) is None
    three = {"type": "record", "name": "u", "fields": [{"name": "f", "type": ["null", "string", "long"]}]}
    assert compile_encoder(three) is None


def test_values_fastavro_refuses_are_refused_not_written_differently() -> None:
    # Found by a review: the generated code once wrote these where fastavro raises.
    samples = {type(e).__name__: e for e in sample_events()}
    outcome_event = samples["OutcomeRecorded"]
    decided = next(e for e in sample_events() if type(e).__name__ == "RequestDecided" and e.decode)
    odd = [
        replace(outcome_event, skipped=None),
        replace(samples["ModelCallAttempted"], http_status=True),
        replace(decided, decode=replace(decided.decode, fits_slo=1)),
        replace(decided, routing=replace(decided.routing, complexity=1)),
    ]
    for event in odd:
        assert outcome(CODEC.encode, event) == outcome(reference, event)


def test_record_names_never_reach_the_generated_source_and_namespaces_stay_apart() -> None:
    inner_p = {"type": "record", "name": "x", "namespace": "p", "fields": [{"name": "s", "type": "string"}]}
    inner_q = {"type": "record", "name": "x", "namespace": "q", "fields": [{"name": "n", "type": "long"}]}
    outer = {
        "type": "record",
        "name": "r(v, buf): pass\ndef evil",
        "fields": [{"name": "a", "type": inner_p}, {"name": "b", "type": inner_q}],
    }
    write = compile_encoder(outer)
    assert write is not None
    a, b = msgspec.defstruct("A", [("s", str)]), msgspec.defstruct("B", [("n", int)])
    event = msgspec.defstruct("O", [("a", a), ("b", b)])(a=a(s="hi"), b=b(n=5))
    buf = bytearray()
    write(event, buf)
    expected = io.BytesIO()
    fastavro.schemaless_writer(expected, fastavro.parse_schema(outer), {"a": {"s": "hi"}, "b": {"n": 5}})
    assert bytes(buf) == expected.getvalue()
    keyword_field = {"type": "record", "name": "k", "fields": [{"name": "from", "type": "string"}]}
    assert compile_encoder(keyword_field) is None


_LONG = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 63, 64, 8191, 8192, -1, -64, -65]))
_TIME = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)


def _with_edges(event: Event, data: st.DataObject) -> Event:
    """The event with some fields replaced by edge values of their own type."""
    changes: dict[str, Any] = {}
    for name in event.__struct_fields__:
        value = getattr(event, name)
        if isinstance(value, bool) or not data.draw(st.booleans()):
            continue
        if isinstance(value, int):
            changes[name] = data.draw(_LONG)
        elif isinstance(value, float):
            changes[name] = data.draw(st.floats(allow_nan=True, allow_infinity=True))
        elif isinstance(value, str):
            changes[name] = data.draw(st.text(max_size=300))
        elif isinstance(value, datetime):
            changes[name] = data.draw(_TIME)
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            changes[name] = data.draw(st.lists(st.text(max_size=20), max_size=70))
    return replace(event, **changes) if changes else event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_events_with_edge_values_encode_as_fastavro_does(data: st.DataObject) -> None:
    event = _with_edges(data.draw(st.sampled_from(sample_events())), data)
    assert outcome(CODEC.encode, event) == outcome(reference, event)


def test_unions_on_both_branches_and_empty_lists_encode_as_fastavro_does() -> None:
    decided = next(e for e in sample_events() if type(e).__name__ == "RequestDecided")
    assert decided.decode is not None and decided.reasons
    for variant in (replace(decided, decode=None), replace(decided, reasons=[])):
        assert CODEC.encode(variant) == reference(variant)
    assert CODEC.decode(CODEC.encode(replace(decided, decode=None))).occurred_at == T0


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_the_generated_writer_is_used_for_every_type(cls: type[Event]) -> None:
    # The codec keeps the writer it compiled: a type left to fastavro would show None here.
    assert CODEC._by_type[cls].body is not None
