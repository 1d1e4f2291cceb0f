"""Operator controls: which kill switches are in force. Pure: the governance fold applies signed
``kill_switch_changed.v1`` events to ``Controls``, and the core reads it with each request."""

from __future__ import annotations

from typing import get_args

import msgspec

from nexuscore.schemas import KillSwitchChanged, SwitchMode, SwitchScope

# The values as the wire contract defines them (``nexuscore.schemas``), in one place.
MODES: tuple[str, ...] = get_args(SwitchMode)
SCOPES: tuple[str, ...] = get_args(SwitchScope)
# "off" outranks "offline": of the switches that cover a request, the most restrictive applies.
_SEVERITY = {"offline": 1, "off": 2}


class Switch(msgspec.Struct, frozen=True, kw_only=True):
    scope: str
    target: str
    mode: str
    actor: str
    reason: str
    event_id: str

    def describe(self) -> str:
        where = "globally" if self.scope == "global" else f"for {self.scope} {self.target}"
        return f"inference {self.mode} {where} by {self.actor} ({self.reason}; event {self.event_id[:12]})"


class Controls(msgspec.Struct, frozen=True, kw_only=True):
    switches: tuple[Switch, ...] = ()

    def apply(self, event: KillSwitchChanged) -> Controls:
        """The controls with ``event`` taken up: it replaces any switch of the same scope and target."""
        kept = tuple(s for s in self.switches if (s.scope, s.target) != (event.scope, event.target))
        if event.mode == "on":
            return Controls(switches=kept)
        switch = Switch(
            scope=event.scope,
            target=event.target,
            mode=event.mode,
            actor=event.actor,
            reason=event.reason,
            event_id=event.event_id,
        )
        return Controls(switches=(*kept, switch))

    def for_request(self, tenant: str, feature: str) -> Switch | None:
        """The most restrictive switch covering a tenant's feature, or None when inference is on."""
        covering = [
            s
            for s in self.switches
            if s.scope == "global"
            or (s.scope == "tenant" and s.target == tenant)
            or (s.scope == "feature" and s.target in (feature, f"{tenant}/{feature}"))
        ]
        return max(covering, key=lambda s: _SEVERITY.get(s.mode, 0), default=None)


NO_CONTROLS = Controls()
