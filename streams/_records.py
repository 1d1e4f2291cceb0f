"""What the decider keeps per request in its Tables, beside the budget state: escalations awaiting
review and each request's decision as it went out (so a redelivered input gets the same events)."""

from __future__ import annotations

import msgspec

from nexuscore.schemas import AvroCodec, ReviewRecorded

Sent = list[tuple[str, bytes, bytes]]  # (topic, key, value) of each output, in order


class EscalationRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What the decider knows of one escalation.

    Awaiting review: the request and its decision as they went out, and the deadline. A review can
    also arrive first: after a crash the request is decided again, possibly after the review that
    the first decision prompted; it is kept (``early_review``) and applied as soon as the request
    is escalated again. Once resolved, the record stays as a marker, so that a redelivered request
    or review changes nothing.
    """

    request: bytes = b""
    decided: bytes = b""
    deadline_us: int = 0
    early_review: bytes = b""
    resolved: bool = False
    # The review that resolved it and what that sent: sent again if the same review is redelivered.
    resolved_by: str = ""
    sent: Sent = msgspec.field(default_factory=list)


class DecidedRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A request's decision as it went out, kept so that a redelivered request gets the very same
    events (a new decision against a moved budget could differ: denied once, dispatched the next
    time) and its budget effect is applied once. ``version_before`` is the tenant's budget-state
    version it was decided against: a state still at or below it never received the effect."""

    sent: Sent
    version_before: int
    reservation: bytes = b""
    # Whether the decision was an escalation: a review of a request decided otherwise is refused.
    escalated: bool = False
    # The outcome that settled it and the settlement sent: sent again if the outcome is redelivered.
    settled_by: str = ""
    settlement: Sent = msgspec.field(default_factory=list)


_decided_encoder = msgspec.msgpack.Encoder()
_decided_decoder = msgspec.msgpack.Decoder(DecidedRecord)
_escalation_encoder = msgspec.msgpack.Encoder()
_escalation_decoder = msgspec.msgpack.Decoder(EscalationRecord)


def decided_record(data: bytes | None) -> DecidedRecord | None:
    return None if data is None else _decided_decoder.decode(data)


def escalation_record(data: bytes | None) -> EscalationRecord | None:
    return None if data is None else _escalation_decoder.decode(data)


def encode_decided(record: DecidedRecord) -> bytes:
    return _decided_encoder.encode(record)


def encode_escalation(record: EscalationRecord) -> bytes:
    return _escalation_encoder.encode(record)


def early_review(record: EscalationRecord | None) -> ReviewRecorded | None:
    """The review kept before its escalation was known, if any."""
    if record is None or not record.early_review:
        return None
    early = _codec.decode(record.early_review, (ReviewRecorded,))
    assert isinstance(early, ReviewRecorded)
    return early


_codec = AvroCodec()
