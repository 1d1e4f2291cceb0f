"""Deterministic ids: an event's id is derived from its cause, so redelivery repeats it exactly."""

from __future__ import annotations

import hashlib


def derive_id(*parts: str | int) -> str:
    """A 32-hex-digit id from the cause's id and what is derived from it."""
    joined = "\x1f".join(str(p) for p in parts)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()[:32]
