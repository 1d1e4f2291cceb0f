"""The offline answer cache's keys and records (kill switches themselves are governance:
``nexuscore.policy.Controls``, re-exported here for the core's callers)."""

from __future__ import annotations

import hashlib

import msgspec

# Requests needing these are never answered from the cache: tools are disabled offline.
TOOL_CAPABILITIES = frozenset({"tools"})


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
