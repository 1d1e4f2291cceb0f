"""HTTP plumbing shared by the adapters: the owned client and the error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx
from httpx_aiohttp import HttpxAiohttpClient

from nexuscore.kernel.errors import ProviderError

# Sized for ~200 calls in flight at once without waiting on the pool.
POOL_LIMITS = httpx.Limits(max_connections=256, max_keepalive_connections=256)

# Enough of an error body to say what went wrong without flooding a log line.
_ERROR_SNIPPET_CHARS = 200


def new_client() -> httpx.AsyncClient:
    """Create the pooled client an adapter owns when none is injected.

    The httpx interface over aiohttp's connection handling: on this 2-core machine httpx's own
    transport cost about 6.9 ms of CPU per call at 64 calls in flight, the aiohttp transport about
    1.1 ms (both measured against the simulated provider in one process).
    """
    return HttpxAiohttpClient(limits=POOL_LIMITS)


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (rate limits and server-side failures)."""
    return status == 429 or status >= 500


def _snippet(response: httpx.Response) -> str:
    text = " ".join(response.text.split())
    if len(text) > _ERROR_SNIPPET_CHARS:
        return text[:_ERROR_SNIPPET_CHARS] + "..."
    return text


async def post_json(
    client: httpx.AsyncClient,
    *,
    provider: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    timeout_s: float,
) -> bytes:
    """POST an already encoded JSON body and return the 2xx response body.

    Every failure becomes a :class:`ProviderError`, so callers never see an ``httpx`` exception.
    """
    try:
        # httpx timeouts apply per network operation; the outer deadline bounds the whole call,
        # so a provider trickling bytes cannot hold a request past timeout_s.
        async with asyncio.timeout(timeout_s):
            response = await client.post(url, content=body, headers=headers, timeout=timeout_s)
    except httpx.ConnectTimeout as exc:
        # The aiohttp transport reports a refused connection this way too, within milliseconds.
        raise ProviderError(
            f"{provider} call to {url}: no connection (refused, or none within {timeout_s:g}s)",
            retryable=True,
        ) from exc
    except (TimeoutError, httpx.TimeoutException) as exc:
        raise ProviderError(
            f"{provider} call to {url} timed out after {timeout_s:g}s", retryable=True
        ) from exc
    except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
        # A bad base URL or a request we built wrongly fails the same way on every attempt.
        raise ProviderError(f"{provider} call to {url} could not be sent: {exc}", retryable=False) from exc
    except httpx.TransportError as exc:
        raise ProviderError(
            f"{provider} call to {url} failed: {type(exc).__name__}: {exc}", retryable=True
        ) from exc

    status = response.status_code
    if not 200 <= status < 300:
        raise ProviderError(
            f"{provider} call to {url} answered HTTP {status}: {_snippet(response)}",
            retryable=is_retryable_status(status),
            status_code=status,
        )
    return response.content
