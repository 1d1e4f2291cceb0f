"""Operator controls: kill switches (inference off, or offline: cached answers only), and the
offline answer cache's keys and records. Pure: the decider folds governance events into
``Controls`` and passes it to the core with each request.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from nexuscore.schemas import KillSwitchChanged

Mode = Literal["on", "off", "offline"]
Scope = Literal["global", "tenant", "feature"]
MODES: tuple[str, ...] = ("on", "off", "offline")
SCOPES: tuple[str, ...] = ("global", "tenant", "feature")
# "off" outranks "offline": of the switches that cover a request, the most restrictive applies.
_SEVERITY = {"offline": 1, "off": 2}
# Requests needing these are never answered from the cache: tools are disabled offline.
TOOL_CAPABILITIES = frozenset({"tools"})


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


class CachedAnswer(msgspec.Struct, frozen=True, kw_only=True):
    """An answer kept for offline mode: where it came from and what it said."""

    request_id: str
    deployment_id: str
    model: str
    model_version: str
    region: str
    response: str
    input_tokens: int
    output_tokens: int
    finish_reason: str


def prompt_digest(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def answer_key(tenant: str, policy_digest: str, model: str, prompt_sha256: str) -> bytes:
    """The cache key: partitioned by tenant (first), then the deciding policy and the model."""
    return "\x1f".join((tenant, policy_digest, model, prompt_sha256)).encode()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(CachedAnswer)


def encode_answer(answer: CachedAnswer) -> bytes:
    return _encoder.encode(answer)


def decode_answer(data: bytes | None) -> CachedAnswer | None:
    return None if not data else _decoder.decode(data)


def kill_switch_message(event: KillSwitchChanged) -> bytes:
    """The bytes an operator signs: every field that decides what the switch does, and when."""
    body = {
        "purpose": "nexuscore-kill-switch-v1",
        "event_id": event.event_id,
        "scope": event.scope,
        "target": event.target,
        "mode": event.mode,
        "actor": event.actor,
        "reason": event.reason,
        "occurred_at": event.occurred_at.isoformat(),
        "key_id": event.key_id,
    }
    return msgspec.json.encode(body, order="sorted")
