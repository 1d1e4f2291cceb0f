"""Provider adapters against the simulated provider and against canned HTTP answers."""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
import pytest_asyncio
from aiohttp import web

from nexuscore.kernel.errors import ProviderError
from nexuscore.providers import (
    MAX_RESPONSE_BYTES,
    AnthropicMessagesAdapter,
    ChatRequest,
    ChatResult,
    OpenAIChatAdapter,
    ProviderAdapter,
    SimulatedProvider,
    SimulatedProviderConfig,
    adapter_for,
)

PROMPT = "Summarise the quarterly residency report for the EU region, please."
Handler = Callable[[httpx.Request], httpx.Response]


def _request(prompt: str = PROMPT, *, max_output_tokens: int = 256, timeout_s: float = 5.0) -> ChatRequest:
    return ChatRequest(
        model="gpt-test",
        prompt=prompt,
        max_output_tokens=max_output_tokens,
        idempotency_key="idem-123",
        timeout_s=timeout_s,
    )


@pytest_asyncio.fixture
async def openai_adapter() -> AsyncIterator[OpenAIChatAdapter]:
    adapter = OpenAIChatAdapter()
    yield adapter
    await adapter.aclose()


async def _started(config: SimulatedProviderConfig) -> tuple[SimulatedProvider, str]:
    provider = SimulatedProvider(config)
    return provider, await provider.start()


async def _call_mock(
    adapter_type: type[OpenAIChatAdapter] | type[AnthropicMessagesAdapter],
    handler: Handler,
    *,
    api_key: str | None = None,
    base_url: str = "https://api.example.test/v1",
) -> ChatResult:
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        adapter = adapter_type(client=client, api_key=api_key)
        try:
            return await adapter.complete(base_url, _request())
        finally:
            await adapter.aclose()


# --- OpenAI adapter against the real simulated provider -------------------------------------------


@pytest.mark.asyncio
async def test_openai_against_simulator_returns_deterministic_answer(
    openai_adapter: OpenAIChatAdapter,
) -> None:
    provider, url = await _started(SimulatedProviderConfig())
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        first = await openai_adapter.complete(url, _request())
        second = await openai_adapter.complete(url, _request())
    finally:
        await provider.stop()

    assert first == second
    assert first.text == f"simulated answer to {PROMPT[:40]}"
    assert first.input_tokens == len(PROMPT) // 4
    assert first.output_tokens == 16 + len(PROMPT) % 48
    assert first.finish_reason == "stop"
    assert first.model_version == "gpt-test-sim-2026.11"
    assert provider.calls == 2
    assert provider.errors == 0


@pytest.mark.asyncio
async def test_simulator_caps_output_at_max_tokens_and_reports_length(
    openai_adapter: OpenAIChatAdapter,
) -> None:
    provider, url = await _started(SimulatedProviderConfig(output_tokens=500))
    try:
        capped = await openai_adapter.complete(url, _request(max_output_tokens=7))
        fixed = await openai_adapter.complete(url, _request(max_output_tokens=1000))
        tiny = await openai_adapter.complete(url, _request(prompt="hi"))
    finally:
        await provider.stop()

    assert (capped.output_tokens, capped.finish_reason) == (7, "length")
    assert (fixed.output_tokens, fixed.finish_reason) == (500, "stop")
    assert tiny.input_tokens == 1  # never reports zero input tokens, even for a two-character prompt


@pytest.mark.asyncio
async def test_simulator_error_rate_one_gives_retryable_503(openai_adapter: OpenAIChatAdapter) -> None:
    provider, url = await _started(SimulatedProviderConfig(error_rate=1.0))
    try:
        with pytest.raises(ProviderError) as caught:
            await openai_adapter.complete(url, _request())
    finally:
        await provider.stop()

    assert caught.value.retryable is True
    assert caught.value.status_code == 503
    assert (provider.calls, provider.errors) == (1, 1)


async def _failure_pattern(adapter: OpenAIChatAdapter, config: SimulatedProviderConfig, n: int) -> list[bool]:
    provider, url = await _started(config)
    pattern: list[bool] = []
    try:
        for _ in range(n):
            try:
                await adapter.complete(url, _request())
                pattern.append(False)
            except ProviderError:
                pattern.append(True)
    finally:
        await provider.stop()
    assert provider.errors == sum(pattern)
    return pattern


@pytest.mark.asyncio
async def test_simulator_errors_are_reproducible_from_the_seed(openai_adapter: OpenAIChatAdapter) -> None:
    n = 40
    a = await _failure_pattern(openai_adapter, SimulatedProviderConfig(error_rate=0.5, seed=7), n)
    b = await _failure_pattern(openai_adapter, SimulatedProviderConfig(error_rate=0.5, seed=7), n)
    # Jitter draws must not shift which calls fail.
    jittered = SimulatedProviderConfig(error_rate=0.5, seed=7, latency_ms=1.0, latency_jitter_ms=1.0)
    c = await _failure_pattern(openai_adapter, jittered, n)
    other = await _failure_pattern(openai_adapter, SimulatedProviderConfig(error_rate=0.5, seed=8), n)

    assert a == b == c
    assert 0 < sum(a) < n
    assert other != a


@pytest.mark.asyncio
async def test_simulator_adds_latency(openai_adapter: OpenAIChatAdapter) -> None:
    provider, url = await _started(SimulatedProviderConfig(latency_ms=80.0))
    try:
        started = time.perf_counter()
        await openai_adapter.complete(url, _request())
        elapsed = time.perf_counter() - started
    finally:
        await provider.stop()
    assert elapsed >= 0.075  # a lower bound: a sleep is never shorter, so this cannot flake


@pytest.mark.asyncio
async def test_timeout_is_retryable_without_status(openai_adapter: OpenAIChatAdapter) -> None:
    provider, url = await _started(SimulatedProviderConfig(latency_ms=400.0))
    try:
        # The provider answers after 400 ms: only the 50 ms timeout can make this call fail.
        with pytest.raises(ProviderError, match="timed out") as caught:
            await openai_adapter.complete(url, _request(timeout_s=0.05))
    finally:
        await provider.stop()
    assert caught.value.retryable is True
    assert caught.value.status_code is None


@pytest.mark.asyncio
async def test_timeout_bounds_the_whole_call_not_just_each_read() -> None:
    # A mock transport does no network reads, so only the overall deadline can stop this call.
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5)
        return _openai_ok(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
        adapter = OpenAIChatAdapter(client=client)
        # The transport answers after 5 s: only the overall deadline can make this call fail.
        with pytest.raises(ProviderError, match="timed out") as caught:
            await adapter.complete("https://api.example.test/v1", _request(timeout_s=0.05))
    assert caught.value.retryable is True


@pytest.mark.asyncio
async def test_refused_connection_is_retryable(openai_adapter: OpenAIChatAdapter) -> None:
    provider, url = await _started(SimulatedProviderConfig())
    await provider.stop()  # the port is now closed, so the connect is refused
    with pytest.raises(ProviderError) as caught:
        await openai_adapter.complete(url, _request())
    assert caught.value.retryable is True
    assert caught.value.status_code is None


@pytest.mark.asyncio
async def test_simulator_rejects_malformed_request_with_400() -> None:
    provider, url = await _started(SimulatedProviderConfig())
    try:
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{url}/chat/completions", content=b'{"model": "x"}')
    finally:
        await provider.stop()
    assert response.status_code == 400
    assert "messages" in response.json()["error"]["message"]
    assert (provider.calls, provider.errors) == (1, 0)


@pytest.mark.asyncio
async def test_simulator_start_twice_and_bad_config_are_rejected() -> None:
    provider, _ = await _started(SimulatedProviderConfig())
    try:
        with pytest.raises(RuntimeError, match="already started"):
            await provider.start()
    finally:
        await provider.stop()
    await provider.stop()  # idempotent
    with pytest.raises(ValueError, match="error_rate"):
        SimulatedProvider(SimulatedProviderConfig(error_rate=1.5))


def test_serve_forever_announces_url_and_stops_on_sigterm() -> None:
    code = (
        "from nexuscore.providers import SimulatedProviderConfig, serve_forever\n"
        "serve_forever(SimulatedProviderConfig(), '127.0.0.1', 0)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            assert sel.select(timeout=15), "no startup line within 15s"
        line = proc.stdout.readline().strip()
        prefix = "simulated provider listening on "
        assert line.startswith(prefix), line
        url = line.removeprefix(prefix)
        body = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 8}
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=5.0)
        assert response.status_code == 200
        assert response.json()["model"] == "m-sim-2026.11"

        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 0, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --- OpenAI adapter against canned answers --------------------------------------------------------


def _openai_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "x",
            "model": "gpt-test-2026-01-01",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"},
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        },
    )


@pytest.mark.asyncio
async def test_openai_sends_expected_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _openai_ok(request)

    result = await _call_mock(
        OpenAIChatAdapter, handler, api_key="sk-test", base_url="https://api.example.test/v1/"
    )
    assert result == ChatResult(
        text="hello",
        input_tokens=11,
        output_tokens=3,
        finish_reason="stop",
        model_version="gpt-test-2026-01-01",
    )
    (sent,) = seen
    assert sent.method == "POST"
    assert str(sent.url) == "https://api.example.test/v1/chat/completions"
    assert sent.headers["Idempotency-Key"] == "idem-123"
    assert sent.headers["Authorization"] == "Bearer sk-test"
    assert json.loads(sent.content) == {
        "model": "gpt-test",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 256,
    }


@pytest.mark.asyncio
async def test_openai_omits_authorization_without_api_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _openai_ok(request)

    await _call_mock(OpenAIChatAdapter, handler)
    assert "Authorization" not in seen[0].headers
    assert seen[0].headers["Idempotency-Key"] == "idem-123"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (404, False), (429, True), (500, True), (502, True), (503, True)],
)
async def test_openai_maps_http_status(status: int, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"error": {"message": "nope"}})

    with pytest.raises(ProviderError, match=f"HTTP {status}") as caught:
        await _call_mock(OpenAIChatAdapter, handler)
    assert caught.value.retryable is retryable
    assert caught.value.status_code == status


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        b"not json at all",
        b'{"model": "m", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}',
        b'{"model": "m", "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]}',
        b'{"model": "m", "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}],'
        b' "usage": {"prompt_tokens": "many", "completion_tokens": 1}}',
        b'{"model": "m", "choices": [{"message": {"content": "x"}, "finish_reason": "stop"}],'
        b' "usage": {"prompt_tokens": -1, "completion_tokens": 1}}',
    ],
)
async def test_openai_malformed_body_is_not_retryable(body: bytes) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body)

    with pytest.raises(ProviderError) as caught:
        await _call_mock(OpenAIChatAdapter, handler)
    assert caught.value.retryable is False


@pytest.mark.asyncio
async def test_openai_null_content_is_empty_text() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "model": "m",
                "choices": [{"message": {"content": None}, "finish_reason": "content_filter"}],
                "usage": {"prompt_tokens": 2, "completion_tokens": 0},
            },
        )

    result = await _call_mock(OpenAIChatAdapter, handler)
    assert (result.text, result.finish_reason, result.output_tokens) == ("", "content_filter", 0)


# --- Anthropic adapter ----------------------------------------------------------------------------


def _anthropic_ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-test-20260101",
            "content": [{"type": "text", "text": "bonjour"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 21, "output_tokens": 5},
        },
    )


@pytest.mark.asyncio
async def test_anthropic_parses_answer_and_sends_expected_request() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _anthropic_ok(request)

    result = await _call_mock(
        AnthropicMessagesAdapter, handler, api_key="ak-test", base_url="https://api.anthropic.example/v1"
    )
    assert result == ChatResult(
        text="bonjour",
        input_tokens=21,
        output_tokens=5,
        finish_reason="end_turn",
        model_version="claude-test-20260101",
    )
    (sent,) = seen
    assert str(sent.url) == "https://api.anthropic.example/v1/messages"
    assert sent.headers["x-api-key"] == "ak-test"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["Idempotency-Key"] == "idem-123"
    assert "Authorization" not in sent.headers
    assert json.loads(sent.content) == {
        "model": "gpt-test",
        "max_tokens": 256,
        "messages": [{"role": "user", "content": PROMPT}],
    }


@pytest.mark.asyncio
async def test_anthropic_omits_api_key_header_without_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _anthropic_ok(request)

    await _call_mock(AnthropicMessagesAdapter, handler)
    assert "x-api-key" not in seen[0].headers
    assert seen[0].headers["anthropic-version"] == "2023-06-01"


@pytest.mark.asyncio
async def test_anthropic_skips_non_text_blocks() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200,
            json={
                "model": "c",
                "stop_reason": "max_tokens",
                "usage": {"input_tokens": 1, "output_tokens": 9},
                "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "answer"}],
            },
        )

    result = await _call_mock(AnthropicMessagesAdapter, handler)
    assert (result.text, result.finish_reason) == ("answer", "max_tokens")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (403, False), (429, True), (500, True), (529, True)]
)
async def test_anthropic_maps_http_status(status: int, retryable: bool) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json={"type": "error", "error": {"type": "overloaded_error"}})

    with pytest.raises(ProviderError) as caught:
        await _call_mock(AnthropicMessagesAdapter, handler)
    assert caught.value.retryable is retryable
    assert caught.value.status_code == status


@pytest.mark.asyncio
async def test_anthropic_malformed_body_is_not_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "c", "content": "not a list"})

    with pytest.raises(ProviderError, match="malformed") as caught:
        await _call_mock(AnthropicMessagesAdapter, handler)
    assert caught.value.retryable is False
    assert caught.value.status_code is None


@pytest.mark.asyncio
async def test_transport_errors_map_to_retryable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset", request=request)

    with pytest.raises(ProviderError) as caught:
        await _call_mock(AnthropicMessagesAdapter, handler)
    assert caught.value.retryable is True


@pytest.mark.asyncio
async def test_unsupported_scheme_is_not_retryable(openai_adapter: OpenAIChatAdapter) -> None:
    with pytest.raises(ProviderError) as caught:
        await openai_adapter.complete("ftp://example.test/v1", _request())
    assert caught.value.retryable is False


# --- what a provider answers is bounded ------------------------------------------------------------


async def _serving(handler: Callable[[web.Request], Awaitable[web.Response]]) -> tuple[web.AppRunner, str]:
    """A provider on a real port whose chat completions ``handler`` answers."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}/v1"


async def _answering(body: bytes, *, gzip: bool = False) -> tuple[web.AppRunner, str]:
    """A provider that answers every call with ``body`` (gzip-encoded on the wire)."""

    async def handler(request: web.Request) -> web.Response:
        response = web.Response(body=body, content_type="application/json")
        if gzip:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    return await _serving(handler)


@pytest.mark.asyncio
@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip-bomb"])
async def test_an_answer_larger_than_the_bound_is_refused_not_read_whole(
    openai_adapter: OpenAIChatAdapter, gzip: bool
) -> None:
    # 9 MiB of JSON whitespace: gzip shrinks it to a few KB on the wire, so only a bound on the
    # decompressed bytes stops it.
    runner, url = await _answering(b" " * (MAX_RESPONSE_BYTES + 1024 * 1024), gzip=gzip)
    try:
        with pytest.raises(ProviderError, match="answered more than") as caught:
            await openai_adapter.complete(url, _request())
    finally:
        await runner.cleanup()
    assert caught.value.retryable is False


@pytest.mark.asyncio
async def test_an_answer_within_the_bound_is_read_whole(openai_adapter: OpenAIChatAdapter) -> None:
    text = "x" * (MAX_RESPONSE_BYTES - 1024)
    answer = {"model": "m", "choices": [{"message": {"content": text}, "finish_reason": "stop"}]}
    answer["usage"] = {"prompt_tokens": 1, "completion_tokens": 2}
    runner, url = await _answering(json.dumps(answer).encode())
    try:
        result = await openai_adapter.complete(url, _request())
    finally:
        await runner.cleanup()
    assert result.text == text


@pytest.mark.asyncio
async def test_a_redirect_is_not_followed_so_the_prompt_stays_where_it_was_routed(
    openai_adapter: OpenAIChatAdapter,
) -> None:
    elsewhere, elsewhere_url = await _started(SimulatedProviderConfig())

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{elsewhere_url}/chat/completions")

    runner, url = await _serving(redirect)
    try:
        with pytest.raises(ProviderError, match="HTTP 307") as caught:
            await openai_adapter.complete(url, _request())
    finally:
        await runner.cleanup()
        await elsewhere.stop()
    assert caught.value.retryable is False
    assert elsewhere.calls == 0


@pytest.mark.asyncio
async def test_an_injected_client_bounds_the_answer_too() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b" " * (MAX_RESPONSE_BYTES + 1))

    with pytest.raises(ProviderError, match="answered more than"):
        await _call_mock(OpenAIChatAdapter, handler)


# --- adapter_for ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_adapter_for_builds_each_kind_and_leaves_shared_client_open() -> None:
    async with httpx.AsyncClient(transport=httpx.MockTransport(_anthropic_ok)) as client:
        openai = adapter_for("openai", client)
        anthropic = adapter_for("anthropic", client)
        assert isinstance(openai, OpenAIChatAdapter)
        assert isinstance(anthropic, AnthropicMessagesAdapter)
        assert isinstance(anthropic, ProviderAdapter)
        result = await anthropic.complete("https://a.example/v1", _request())
        assert result.text == "bonjour"
        await openai.aclose()
        await anthropic.aclose()
        assert not client.is_closed


@pytest.mark.parametrize("kind", ["gemini", "OpenAI", ""])
def test_adapter_for_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="expected one of: anthropic, openai") as caught:
        adapter_for(kind)
    assert repr(kind) in str(caught.value)


def test_an_adapter_of_its_own_client_serves_one_event_loop_after_another() -> None:
    # A client belongs to the loop it was made in: each loop gets its own, not an error.
    adapter = OpenAIChatAdapter()

    async def call_once() -> str:
        provider, url = await _started(SimulatedProviderConfig())
        try:
            return (await adapter.complete(url, _request())).text
        finally:
            await adapter.aclose()
            await provider.stop()

    first = asyncio.run(call_once())
    assert asyncio.run(call_once()) == first != ""
