"""Adapter for the Anthropic Messages wire protocol."""

from __future__ import annotations

from typing import Annotated

import httpx
import msgspec

from nexuscore.kernel.errors import ProviderError

from ._adapter import ChatRequest, ChatResult
from ._http import post_json, poster_for

_PROVIDER = "anthropic"
ANTHROPIC_VERSION = "2023-06-01"

_Count = Annotated[int, msgspec.Meta(ge=0)]


class _ContentBlock(msgspec.Struct, frozen=True):
    type: str
    # Only "text" blocks carry text; thinking or tool_use blocks do not.
    text: str | None = None


class _Usage(msgspec.Struct, frozen=True):
    input_tokens: _Count
    output_tokens: _Count


class _Response(msgspec.Struct, frozen=True):
    model: str
    content: list[_ContentBlock]
    usage: _Usage
    stop_reason: str


class _OutMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class _Body(msgspec.Struct, frozen=True):
    model: str
    max_tokens: int
    messages: list[_OutMessage]


_decoder = msgspec.json.Decoder(_Response)
_encoder = msgspec.json.Encoder()


class AnthropicMessagesAdapter:
    """Calls ``POST {base_url}/messages``.

    An injected ``client`` is shared and left open by :meth:`aclose`; without one the adapter owns a
    pooled aiohttp client (256 connections) and closes it in :meth:`aclose`.
    """

    def __init__(self, client: httpx.AsyncClient | None = None, api_key: str | None = None) -> None:
        self._poster = poster_for(client)
        self._api_key = api_key

    async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
        """Send one message; raises :class:`ProviderError` on any failure (529 overloaded is retryable)."""
        url = base_url.rstrip("/") + "/messages"
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": ANTHROPIC_VERSION,
            "Idempotency-Key": request.idempotency_key,
        }
        if self._api_key:
            headers["x-api-key"] = self._api_key
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        body = _encoder.encode(
            _Body(
                model=request.model,
                max_tokens=request.max_output_tokens,
                messages=[_OutMessage(role="user", content=request.prompt)],
            )
        )
        raw = await post_json(
            self._poster, provider=_PROVIDER, url=url, headers=headers, body=body, timeout_s=request.timeout_s
        )
        try:
            parsed = _decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise ProviderError(
                f"{_PROVIDER} call to {url} returned a malformed body: {exc}", retryable=False
            ) from exc
        # Joining the text blocks equals content[0].text for the usual single-block answer, and stays
        # right when a thinking block comes first.
        text = "".join(block.text for block in parsed.content if block.type == "text" and block.text)
        return ChatResult(
            text=text,
            input_tokens=parsed.usage.input_tokens,
            output_tokens=parsed.usage.output_tokens,
            finish_reason=parsed.stop_reason,
            model_version=parsed.model,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this adapter created it (an injected one stays open)."""
        await self._poster.aclose()
