"""Kill switches: an operator's signed switch, put on the governance topic that every decider
follows (each judges it again against its own trust store and takes it up within a second)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nexuscore.kernel.clock import SystemClock
from nexuscore.schemas import KillSwitchChanged
from nexuscore.services._acts import kill_switch_event, load_signer, publish
from nexuscore.transport import Topics


def throw_switch(
    mode: str,
    scope: str,
    target: str,
    reason: str,
    *,
    key: Path,
    trust_store: Path,
    bootstrap: str,
    namespace: str = "",
    actor: str = "",
) -> KillSwitchChanged:
    """Turn inference ``mode`` (off, offline, on) for ``scope`` (global, tenant, feature) and
    ``target``, signed with an operator's ``key`` (recorded in the trust store's name for it;
    ``actor``, if given, must be that name); return the published event."""
    private, name = load_signer(key, trust_store, "operator", actor)
    event = kill_switch_event(scope, target, mode, reason, private, name, SystemClock().now())
    asyncio.run(publish(bootstrap, Topics(namespace), event))
    return event
