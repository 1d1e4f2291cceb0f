"""What people do to a running pipeline: review escalations, and turn inference off or offline.

Both are events on Kafka (``review_recorded.v1`` on the reviews topic, keyed by tenant so that it
reaches the decider holding the request; ``kill_switch_changed.v1`` on the governance topic,
signed by an operator), so they are taken up without a restart and recorded as evidence.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from nexuscore import _signing
from nexuscore.core import MODES, SCOPES, derive_id
from nexuscore.errors import NexusError
from nexuscore.schemas import AvroCodec, KillSwitchChanged, ReviewRecorded
from nexuscore.streams import Topics
from nexuscore.streams._governance import POLICY_KEY, sign_kill_switch
from nexuscore.streams._kafka import new_producer, start_client


def review_event(
    request_id: str, tenant_id: str, action: str, reviewer: str, reason: str, now: datetime
) -> ReviewRecorded:
    if action not in ("approved", "denied"):
        raise NexusError(f"a review approves or denies, not {action!r}")
    if not reviewer.strip():
        raise NexusError("a review needs the reviewer's identity (--reviewer or NEXUSCORE_REVIEWER)")
    if not reason.strip():
        raise NexusError("a review needs a reason (--reason): it goes into the evidence")
    return ReviewRecorded(
        event_id=derive_id(request_id, tenant_id, "review", action, reviewer, now.isoformat()),
        request_id=request_id,
        tenant_id=tenant_id,
        occurred_at=now,
        producer="nexuscore.review",
        action=action,  # type: ignore[arg-type]  # checked above
        reviewer=reviewer,
        reason=reason,
    )


def kill_switch_event(
    scope: str, target: str, mode: str, actor: str, reason: str, key_path: Path, now: datetime
) -> KillSwitchChanged:
    if scope not in SCOPES:
        raise NexusError(f"--scope must be one of {', '.join(SCOPES)}, not {scope!r}")
    if mode not in MODES:
        raise NexusError(f"the mode must be one of {', '.join(MODES)}, not {mode!r}")
    if (scope == "global") != (target == ""):
        raise NexusError("--target names the tenant or feature; a global switch has none")
    if not reason.strip():
        raise NexusError("a kill switch needs a reason (--reason): it goes into the evidence")
    unsigned = KillSwitchChanged(
        event_id=derive_id("kill-switch", scope, target, mode, actor, now.isoformat()),
        request_id="",
        tenant_id=target if scope == "tenant" else "",
        occurred_at=now,
        producer="nexuscore.control",
        scope=scope,
        target=target,
        mode=mode,
        actor=actor,
        reason=reason,
    )
    return sign_kill_switch(unsigned, _signing.load_private_key(key_path))


async def publish(bootstrap: str, topics: Topics, event: ReviewRecorded | KillSwitchChanged) -> None:
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    try:
        if isinstance(event, ReviewRecorded):
            topic, key = topics.reviews, event.tenant_id.encode()
        else:
            topic, key = topics.governance, POLICY_KEY
        await producer.send_and_wait(topic, AvroCodec().encode(event), key=key)
    finally:
        await producer.stop()
