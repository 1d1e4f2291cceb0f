"""Adapter for the OpenAI chat-completions wire protocol (and the many servers that copy it)."""

from __future__ import annotations

from typing import Annotated

import httpx
import msgspec

from nexuscore.kernel.errors import ProviderError

from ._adapter import ChatRequest, ChatResult
from ._http import post_json, poster_for

_PROVIDER = "openai"

_Count = Annotated[int, msgspec.Meta(ge=0)]


class _Message(msgspec.Struct, frozen=True):
    # Null when the model answered with tool calls or a refusal only; we send no tools, so treat as empty.
    content: str | None = None


class _Choice(msgspec.Struct, frozen=True):
    message: _Message
    finish_reason: str


class _Usage(msgspec.Struct, frozen=True):
    prompt_tokens: _Count
    completion_tokens: _Count


class _Response(msgspec.Struct, frozen=True):
    model: str
    choices: list[_Choice]
    usage: _Usage


class _OutMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class _Body(msgspec.Struct, frozen=True):
    model: str
    messages: list[_OutMessage]
    max_tokens: int


# Built once: msgspec compiles the type's decoding plan on construction.
_decoder = msgspec.json.Decoder(_Response)
_encoder = msgspec.json.Encoder()


class OpenAIChatAdapter:
    """Calls ``POST {base_url}/chat/completions``.

    An injected ``client`` is shared and left open by :meth:`aclose`; without one the adapter owns a
    pooled aiohttp client (256 connections) and closes it in :meth:`aclose`.
    """

    def __init__(self, client: httpx.AsyncClient | None = None, api_key: str | None = None) -> None:
        self._poster = poster_for(client)
        self._api_key = api_key

    async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
        """Send one chat completion; raises :class:`ProviderError` on any failure."""
        url = base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json", "Idempotency-Key": request.idempotency_key}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if request.traceparent:
            headers["traceparent"] = request.traceparent
        body = _encoder.encode(
            _Body(
                model=request.model,
                messages=[_OutMessage(role="user", content=request.prompt)],
                max_tokens=request.max_output_tokens,
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
        if not parsed.choices:
            raise ProviderError(f"{_PROVIDER} call to {url} returned no choices", retryable=False)
        choice = parsed.choices[0]
        return ChatResult(
            text=choice.message.content or "",
            input_tokens=parsed.usage.prompt_tokens,
            output_tokens=parsed.usage.completion_tokens,
            finish_reason=choice.finish_reason,
            model_version=parsed.model,
        )

    async def aclose(self) -> None:
        """Close the HTTP client if this adapter created it (an injected one stays open)."""
        await self._poster.aclose()
