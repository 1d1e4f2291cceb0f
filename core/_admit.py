"""Admission: is this a request the policy knows how to decide at all?

The first stage of ``route`` (``core/_route.py``). Pure: it reads the request's tenant, feature, task
type, data classification, prompt length (in estimated tokens, and in bytes when over the gateway's
limit) and ``max_output_tokens``, and the policy.
"""

from __future__ import annotations

import msgspec

from nexuscore.policy import RoutingPolicy, Tenant
from nexuscore.schemas import InferenceRequested


class Rejection(msgspec.Struct, frozen=True, kw_only=True):
    """Admission refused the request; nothing else was decided."""

    code: str
    reason: str


def estimate_input_tokens(prompt: str) -> int:
    """Roughly four characters a token: the same rule the simulated provider bills by."""
    return max(1, len(prompt) // 4)


def admit(request: InferenceRequested, policy: RoutingPolicy) -> Rejection | Tenant:
    """Admission: is this a request the policy knows how to decide at all?"""
    tenant = policy.tenants_by_id.get(request.tenant_id)
    if tenant is None:
        return Rejection(
            code="unknown_tenant", reason=f"tenant {request.tenant_id!r} is not in policy {policy.version}"
        )
    if not any(f.id == request.feature for f in tenant.features):
        return Rejection(
            code="unknown_feature",
            reason=f"feature {request.feature!r} is not configured for tenant {tenant.id!r}",
        )
    if request.task_type not in policy.task_types:
        # The rules were written for the listed task types only; anything else would be routed by
        # complexity alone, as if no rule applied to it.
        return Rejection(
            code="unknown_task_type",
            reason=f"task type {request.task_type!r} is not in policy {policy.version}",
        )
    if request.data_classification not in policy.residency_by_class:
        return Rejection(
            code="no_residency_rule",
            reason=f"no residency rule covers {request.data_classification!r} data",
        )
    tokens = estimate_input_tokens(request.prompt)
    if tokens > policy.max_input_tokens:
        return Rejection(
            code="input_too_large",
            reason=f"about {tokens} input tokens exceed the policy limit of {policy.max_input_tokens}",
        )
    if tokens + request.max_output_tokens > policy.max_context_tokens:
        return Rejection(
            code="context_too_large",
            reason=(
                f"{tokens} input + {request.max_output_tokens} output tokens exceed every deployment's "
                f"context (largest {policy.max_context_tokens})"
            ),
        )
    return tenant


# The broker takes messages of up to 1 MiB. A dispatch carries the prompt once, beside fields the
# schema bounds (a few KiB at most): a prompt of at most this many UTF-8 bytes always fits. Tokens
# alone do not bound it (four characters a token, and a character may take four bytes).
MAX_PROMPT_BYTES = 512 * 1024


def oversize_bytes(prompt: str) -> int:
    """The prompt's size in UTF-8 bytes when it is over ``MAX_PROMPT_BYTES``, else 0.

    A character takes at most four bytes (a lone surrogate, passed through, three), so a prompt of
    at most a quarter of the limit in characters is never encoded to find out.
    """
    if len(prompt) * 4 <= MAX_PROMPT_BYTES:
        return 0
    size = len(prompt.encode("utf-8", "surrogatepass"))
    return size if size > MAX_PROMPT_BYTES else 0


def admit_size(request: InferenceRequested) -> Rejection | None:
    """Admission by encoded size: no accepted request may produce an event the broker refuses."""
    size = oversize_bytes(request.prompt)
    if size:
        return Rejection(
            code="request_too_large",
            reason=f"the prompt is {size} bytes of UTF-8, over the gateway's limit of {MAX_PROMPT_BYTES}",
        )
    return None
