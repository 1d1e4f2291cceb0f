"""The escalation boundary seen from the evidence: what awaits a person, one escalation, and a
reviewer's signed decision on it (refused here when the request is no longer pending)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from nexuscore.kernel.clock import SystemClock
from nexuscore.kernel.errors import NexusError
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import ReviewRecorded
from nexuscore.services._acts import load_signer, publish, review_event
from nexuscore.services._evidence import open_store
from nexuscore.transport import Topics


def review_queue(store: EvidenceStore, tenant: str | None, state: str | None = "pending") -> pa.Table:
    """Escalated requests in review ``state`` (``all`` or None: every state), oldest first."""
    return store.escalations(tenant, None if state == "all" else state)


def find_escalation(store: EvidenceStore, request_id: str, tenant: str | None = None) -> dict[str, Any]:
    """The escalation of ``request_id`` (its row of the escalations view); request ids are unique per
    tenant only, so an id escalated for several tenants needs ``tenant``."""
    rows = store.query(
        "SELECT * FROM escalations WHERE request_id = $id AND ($t IS NULL OR tenant_id = $t)",
        {"id": request_id, "t": tenant},
    ).to_pylist()
    if not rows:
        raise NexusError(
            f"request {request_id} is not escalated in this evidence (see `nexuscore review list`)"
        )
    if len({r["tenant_id"] for r in rows}) > 1:
        tenants = ", ".join(sorted({r["tenant_id"] for r in rows}))
        raise NexusError(
            f"request id {request_id} was escalated for several tenants ({tenants}): name one with --tenant"
        )
    row: dict[str, Any] = rows[0]
    return row


def escalation_event_id(store: EvidenceStore, tenant_id: str, request_id: str) -> str:
    """The escalated decision's event id: a review is signed over it, so it answers that one escalation."""
    rows = store.query(
        "SELECT event_id FROM decisions WHERE tenant_id = $t AND request_id = $r AND verdict = 'escalated'",
        {"t": tenant_id, "r": request_id},
    ).to_pylist()
    if not rows:
        raise NexusError(f"request {request_id} of {tenant_id} has no escalated decision in this evidence")
    return str(rows[0]["event_id"])


def pending_escalation(store: EvidenceStore, request_id: str, tenant: str | None = None) -> tuple[str, str]:
    """(tenant, escalated decision's event id) of an escalation still awaiting review; one that has
    been resolved (dispatched, denied, timed out, refused) cannot be reviewed again."""
    row = find_escalation(store, request_id, tenant)
    escalation_id = escalation_event_id(store, row["tenant_id"], request_id)
    if row["review_state"] != "pending":
        raise NexusError(
            f"request {request_id} is no longer awaiting review: {row['review_state']}"
            f"{' by ' + row['reviewer'] if row.get('reviewer') else ''}"
        )
    return row["tenant_id"], escalation_id


def submit_review(
    action: Literal["approved", "denied"],
    request_id: str,
    reason: str,
    *,
    key: Path,
    trust_store: Path,
    evidence_dir: Path,
    bootstrap: str,
    namespace: str = "",
    tenant: str | None = None,
    reviewer: str = "",
) -> ReviewRecorded:
    """Approve or deny a pending escalation: a review signed with a reviewer's ``key`` (recorded in the
    trust store's name for it; ``reviewer``, if given, must be that name), put on the reviews topic."""
    private, name = load_signer(key, trust_store, "reviewer", reviewer)
    with open_store(evidence_dir) as store:
        tenant_id, escalation_id = pending_escalation(store, request_id, tenant)
    now = SystemClock().now()
    event = review_event(request_id, tenant_id, escalation_id, action, reason, private, name, now)
    asyncio.run(publish(bootstrap, Topics(namespace), event))
    return event


def wait_for_resolution(
    evidence_dir: Path, request_id: str, tenant_id: str, wait_s: float
) -> dict[str, Any] | None:
    """The escalation's row once the evidence shows it resolved, polling for up to ``wait_s``
    seconds; None if it is still pending then."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        with open_store(evidence_dir) as store:
            row = find_escalation(store, request_id, tenant_id)
        if row["review_state"] != "pending":
            return row
        time.sleep(0.5)
    return None
