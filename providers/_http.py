"""HTTP plumbing shared by the adapters: the client they post through, and the error mapping.

An adapter posts through a :class:`Poster`. Its own is :class:`AiohttpPoster` (aiohttp called
directly); a caller may inject an ``httpx.AsyncClient`` instead (its own transport, a mock in tests),
which :class:`HttpxPoster` wraps. Either way every failure becomes a :class:`ProviderError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp
import httpx

from nexuscore.kernel.errors import ProviderError

# Sized for ~200 calls in flight at once without waiting on the pool.
POOL_CONNECTIONS = 256

# The largest answer read from a provider (after decompression): a chat completion is a few KB; a
# provider streaming gigabytes must not fill the worker's memory.
MAX_RESPONSE_BYTES = 8 * 1024 * 1024

# Enough of an error body to say what went wrong without flooding a log line.
_ERROR_SNIPPET_CHARS = 200

# aiohttp's own timeouts off: post_json's one deadline bounds the whole call (connection set-up and
# a provider trickling bytes included), and a second timer per call only costs CPU.
_NO_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None)


class Poster(Protocol):
    """Sends one POST and returns (status, body); raises :class:`ProviderError` for any failure
    but a timeout, which the caller's deadline reports."""

    async def post(
        self, provider: str, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]: ...

    async def aclose(self) -> None: ...


def _no_connection(provider: str, url: str, timeout_s: float, exc: Exception | None = None) -> ProviderError:
    # The cause says which: refused, a name that does not resolve, a certificate refused.
    cause = f": {exc}" if exc is not None else ""
    return ProviderError(
        f"{provider} call to {url}: no connection (refused, or none within {timeout_s:g}s){cause}",
        retryable=True,
    )


def _unsendable(provider: str, url: str, exc: Exception) -> ProviderError:
    # A bad base URL or a request we built wrongly fails the same way on every attempt.
    return ProviderError(f"{provider} call to {url} could not be sent: {exc}", retryable=False)


def _failed(provider: str, url: str, exc: Exception) -> ProviderError:
    return ProviderError(f"{provider} call to {url} failed: {type(exc).__name__}: {exc}", retryable=True)


def _too_large(provider: str, url: str) -> ProviderError:
    return ProviderError(
        f"{provider} call to {url} answered more than {MAX_RESPONSE_BYTES} bytes", retryable=False
    )


async def _bounded(chunks: AsyncIterator[bytes], provider: str, url: str) -> bytes:
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise _too_large(provider, url)
        parts.append(chunk)
    return b"".join(parts)


class AiohttpPoster:
    """The adapters' own pooled client: aiohttp called directly.

    The httpx interface over the same aiohttp transport spent about a third of the worker's CPU in
    the pipeline benchmark building and parsing its request and response models
    (``python -m bench.pipeline --phases throughput --profile worker``).
    """

    def __init__(self, connections: int = POOL_CONNECTIONS) -> None:
        self._connections = connections
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _opened(self) -> aiohttp.ClientSession:
        # Made on first use, and again under another event loop: a session belongs to its loop.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self._connections)
            # No cookies kept: one provider's answer must not shape the calls to another. The
            # environment's proxy settings (HTTPS_PROXY, NO_PROXY) apply, as they did with httpx.
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=_NO_TIMEOUT,
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=True,
            )
            self._loop = loop
        return self._session

    async def post(
        self, provider: str, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        try:
            # Never followed, as httpx does not by default: a 307 would carry the prompt to a host
            # the routing never chose, possibly outside the allowed regions.
            async with self._opened().post(
                url, data=body, headers=headers, allow_redirects=False
            ) as response:
                return response.status, await _bounded(response.content.iter_any(), provider, url)
        except aiohttp.ClientConnectorError as exc:
            raise _no_connection(provider, url, timeout_s, exc) from exc
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError, ValueError) as exc:
            raise _unsendable(provider, url, exc) from exc
        except aiohttp.ClientError as exc:
            raise _failed(provider, url, exc) from exc

    async def aclose(self) -> None:
        session, self._session = self._session, None  # a call made meanwhile opens a new one
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()


class HttpxPoster:
    """Posts through an injected ``httpx.AsyncClient``, which stays open when the adapter closes."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(
        self, provider: str, url: str, headers: Mapping[str, str], body: bytes, timeout_s: float
    ) -> tuple[int, bytes]:
        try:
            async with self.client.stream(
                "POST", url, content=body, headers=headers, timeout=timeout_s
            ) as response:
                return response.status_code, await _bounded(response.aiter_bytes(), provider, url)
        except httpx.ConnectTimeout as exc:
            raise _no_connection(provider, url, timeout_s) from exc
        except httpx.TimeoutException as exc:
            raise TimeoutError from exc  # reported by post_json, as for every poster
        except (httpx.UnsupportedProtocol, httpx.LocalProtocolError, httpx.InvalidURL) as exc:
            raise _unsendable(provider, url, exc) from exc
        except (httpx.TransportError, httpx.DecodingError) as exc:
            raise _failed(provider, url, exc) from exc
        except ValueError as exc:  # a header value httpx cannot encode, for one
            raise _unsendable(provider, url, exc) from exc

    async def aclose(self) -> None:
        """Nothing to release: the injected client is its owner's to close."""


def poster_for(client: httpx.AsyncClient | None) -> Poster:
    """The injected client's poster, or a pooled client of the adapter's own."""
    return HttpxPoster(client) if client is not None else AiohttpPoster()


def is_retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (rate limits and server-side failures)."""
    return status == 429 or status >= 500


def _snippet(content: bytes) -> str:
    text = " ".join(content[: 4 * _ERROR_SNIPPET_CHARS].decode("utf-8", "replace").split())
    if len(text) > _ERROR_SNIPPET_CHARS:
        return text[:_ERROR_SNIPPET_CHARS] + "..."
    return text


async def post_json(
    poster: Poster,
    *,
    provider: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    timeout_s: float,
) -> bytes:
    """POST an already encoded JSON body and return the 2xx response body.

    Every failure becomes a :class:`ProviderError`, so callers never see a client library's exception.
    """
    try:
        # One deadline over the whole call, so a provider trickling bytes cannot hold a request
        # past timeout_s.
        async with asyncio.timeout(timeout_s):
            status, content = await poster.post(provider, url, headers, body, timeout_s)
    except TimeoutError as exc:
        raise ProviderError(
            f"{provider} call to {url} timed out after {timeout_s:g}s", retryable=True
        ) from exc
    if not 200 <= status < 300:
        raise ProviderError(
            f"{provider} call to {url} answered HTTP {status}: {_snippet(content)}",
            retryable=is_retryable_status(status),
            status_code=status,
        )
    return content
