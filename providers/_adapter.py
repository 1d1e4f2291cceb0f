"""The provider-neutral call shape every model adapter speaks.

The gateway builds one :class:`ChatRequest` per routed call and gets back one :class:`ChatResult`;
the wire format of each vendor stays inside its adapter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec


class ChatRequest(msgspec.Struct, frozen=True, kw_only=True):
    """One single-turn chat call as the gateway decided it.

    ``idempotency_key`` is forwarded as the ``Idempotency-Key`` header so a retried call is not billed
    twice by providers that honour it. ``decode_strategy`` is the gateway's decode decision, carried
    here so it travels with the request into evidence; the adapters do not send it to the provider.
    ``timeout_s`` bounds the whole call, connection set-up included.
    """

    model: str
    prompt: str
    max_output_tokens: int
    idempotency_key: str
    decode_strategy: str = "standard"
    timeout_s: float = 30.0
    # The W3C trace context of the worker's span over this call, sent as the ``traceparent`` header.
    traceparent: str = ""


class ChatResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a provider answered to a :class:`ChatRequest`.

    ``model_version`` is the model name the provider reports in its response, which may be more
    specific than the requested ``model`` (a dated snapshot, for example).
    """

    text: str
    input_tokens: int
    output_tokens: int
    finish_reason: str
    model_version: str


@runtime_checkable
class ProviderAdapter(Protocol):
    """A client for one provider wire protocol.

    ``complete`` raises :class:`nexuscore.kernel.errors.ProviderError` for every failure of the call, with
    ``retryable`` telling the caller whether another attempt is worthwhile.
    """

    async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
        """Send ``request`` to the provider at ``base_url`` and return its answer."""
        ...

    async def aclose(self) -> None:
        """Release the adapter's own resources (never an HTTP client it was given)."""
        ...
