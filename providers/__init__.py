"""Model provider adapters and a simulated OpenAI-compatible provider.

Adapters turn a provider-neutral :class:`ChatRequest` into one vendor HTTP call and raise
:class:`nexuscore.kernel.errors.ProviderError` (with ``retryable``) for every failure.
"""

from __future__ import annotations

import httpx

from ._adapter import ChatRequest, ChatResult, ProviderAdapter
from ._anthropic import AnthropicMessagesAdapter
from ._http import MAX_RESPONSE_BYTES
from ._openai import OpenAIChatAdapter
from ._simulated import SimulatedProvider, SimulatedProviderConfig, serve_forever

__all__ = [
    "AnthropicMessagesAdapter",
    "ChatRequest",
    "ChatResult",
    "MAX_RESPONSE_BYTES",
    "OpenAIChatAdapter",
    "ProviderAdapter",
    "SimulatedProvider",
    "SimulatedProviderConfig",
    "adapter_for",
    "serve_forever",
]

_ADAPTERS: dict[str, type[OpenAIChatAdapter] | type[AnthropicMessagesAdapter]] = {
    "openai": OpenAIChatAdapter,
    "anthropic": AnthropicMessagesAdapter,
}


def adapter_for(
    kind: str, client: httpx.AsyncClient | None = None, *, api_key: str | None = None
) -> ProviderAdapter:
    """Build the adapter for a provider ``kind`` ("openai" or "anthropic").

    ``client`` is shared with the adapter and stays open when the adapter is closed.
    Raises ``ValueError`` for any other kind.
    """
    adapter_type = _ADAPTERS.get(kind)
    if adapter_type is None:
        allowed = ", ".join(sorted(_ADAPTERS))
        raise ValueError(f"unknown provider kind {kind!r}; expected one of: {allowed}")
    return adapter_type(client=client, api_key=api_key)
