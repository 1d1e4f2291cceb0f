"""The simulated provider's fault knobs (429s, hangs, latency spikes) and its ``/_faults`` control
endpoint, exercised in-process over real HTTP with httpx. Fast and deterministic: the fault
sequences come from the seed, and every time bound allows a wide margin."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from nexuscore.cli import app
from nexuscore.kernel.errors import ProviderError
from nexuscore.providers import ChatRequest, OpenAIChatAdapter, SimulatedProvider, SimulatedProviderConfig

BODY = {
    "model": "gpt-test",
    "messages": [{"role": "user", "content": "What is my balance?"}],
    "max_tokens": 32,
}


@pytest_asyncio.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=5.0) as c:
        yield c


async def _started(config: SimulatedProviderConfig) -> tuple[SimulatedProvider, str]:
    provider = SimulatedProvider(config)
    url = await provider.start()
    return provider, url.removesuffix("/v1")


async def _statuses(client: httpx.AsyncClient, config: SimulatedProviderConfig, n: int) -> list[int]:
    """The HTTP status of ``n`` calls made one after the other (arrival order = call order)."""
    provider, root = await _started(config)
    try:
        return [(await client.post(f"{root}/v1/chat/completions", json=BODY)).status_code for _ in range(n)]
    finally:
        await provider.stop()


def test_every_fault_is_off_by_default() -> None:
    config = SimulatedProviderConfig()
    assert (config.error_rate, config.rate_limit_rate, config.timeout_rate, config.spike_rate) == (0, 0, 0, 0)
    assert (config.spike_ms, config.hang_s) == (0.0, 60.0)


@pytest.mark.parametrize(
    "bad",
    [
        {"rate_limit_rate": 1.5},
        {"timeout_rate": -0.1},
        {"spike_rate": 2.0},
        {"hang_s": -1.0},
        {"spike_ms": -5.0},
    ],
)
def test_invalid_fault_settings_are_refused_at_construction(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SimulatedProvider(SimulatedProviderConfig(**bad))


@pytest.mark.asyncio
async def test_rate_limit_answers_429_with_retry_after_zero(client: httpx.AsyncClient) -> None:
    provider, root = await _started(SimulatedProviderConfig(rate_limit_rate=1.0))
    try:
        response = await client.post(f"{root}/v1/chat/completions", json=BODY)
        adapter = OpenAIChatAdapter(client=client)
        request = ChatRequest(model="gpt-test", prompt="hi", max_output_tokens=8, idempotency_key="k")
        with pytest.raises(ProviderError) as caught:
            await adapter.complete(f"{root}/v1", request)
    finally:
        await provider.stop()
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "0"
    assert response.json()["error"]["type"] == "rate_limit_error"
    # The gateway's adapter sees a retryable rate limit.
    assert (caught.value.status_code, caught.value.retryable) == (429, True)
    assert (provider.calls, provider.rate_limited, provider.errors) == (2, 2, 0)


@pytest.mark.asyncio
async def test_fault_sequences_are_reproducible_and_independent(client: httpx.AsyncClient) -> None:
    n = 60
    limits = SimulatedProviderConfig(rate_limit_rate=0.3, seed=5)
    a = await _statuses(client, limits, n)
    b = await _statuses(client, limits, n)
    other_seed = await _statuses(client, SimulatedProviderConfig(rate_limit_rate=0.3, seed=6), n)
    assert a == b
    assert a != other_seed
    assert set(a) == {200, 429} and 5 <= a.count(429) <= 35
    # Turning 503s on takes over some calls (a 503 wins over a 429) but moves no 429 to another call.
    both = await _statuses(client, SimulatedProviderConfig(rate_limit_rate=0.3, error_rate=0.3, seed=5), n)
    assert {i for i, s in enumerate(both) if s == 429} <= {i for i, s in enumerate(a) if s == 429}
    assert all(s == 503 for x, s in zip(a, both, strict=True) if x == 429 and s != 429)
    # And the 503 sequence is the one the seed always gave, whatever the new knobs draw.
    errors_only = await _statuses(client, SimulatedProviderConfig(error_rate=0.3, seed=5), n)
    assert [s == 503 for s in both] == [s == 503 for s in errors_only]


@pytest.mark.asyncio
async def test_a_hang_outlasts_the_client_timeout(client: httpx.AsyncClient) -> None:
    provider, root = await _started(SimulatedProviderConfig(timeout_rate=1.0, hang_s=0.5, error_rate=1.0))
    adapter = OpenAIChatAdapter(client=client)
    request = ChatRequest(
        model="gpt-test", prompt="hi", max_output_tokens=8, idempotency_key="k", timeout_s=0.1
    )
    try:
        with pytest.raises(ProviderError, match="timed out") as caught:  # the hang outlasted 0.1 s
            await adapter.complete(f"{root}/v1", request)
        # A client that waits long enough gets a normal answer: a hang wins over the 503.
        started = time.perf_counter()
        late = await client.post(f"{root}/v1/chat/completions", json=BODY)
        answered_after = time.perf_counter() - started
    finally:
        await provider.stop()
    assert (caught.value.retryable, caught.value.status_code) == (True, None)
    # A lower bound: the hang is a sleep, never shorter, so this cannot flake.
    assert late.status_code == 200 and answered_after >= 0.45
    assert (provider.hangs, provider.errors) == (2, 0)


@pytest.mark.asyncio
async def test_a_spike_adds_its_latency_to_the_call(client: httpx.AsyncClient) -> None:
    provider, root = await _started(SimulatedProviderConfig(spike_rate=1.0, spike_ms=150.0))
    try:
        started = time.perf_counter()
        spiked = await client.post(f"{root}/v1/chat/completions", json=BODY)
        elapsed = time.perf_counter() - started
    finally:
        await provider.stop()
    assert spiked.status_code == 200
    assert elapsed >= 0.14  # a lower bound: a sleep is never shorter, so this cannot flake
    assert provider.spikes == 1


@pytest.mark.asyncio
async def test_faults_change_at_run_time_through_the_control_endpoint(client: httpx.AsyncClient) -> None:
    provider, root = await _started(SimulatedProviderConfig(latency_ms=1.0, seed=3))
    try:
        before = await client.post(f"{root}/v1/chat/completions", json=BODY)
        changed = await client.post(f"{root}/_faults", json={"rate_limit_rate": 1, "spike_ms": 20})
        during = await client.post(f"{root}/v1/chat/completions", json=BODY)
        shown = await client.get(f"{root}/_faults")
        restored = await client.post(f"{root}/_faults", json={"rate_limit_rate": 0.0})
        after = await client.post(f"{root}/v1/chat/completions", json=BODY)
    finally:
        await provider.stop()
    assert (before.status_code, during.status_code, after.status_code) == (200, 429, 200)
    assert changed.status_code == 200
    # The fields not named keep their values; the answer is the whole new configuration.
    assert changed.json() == {
        **{f: getattr(SimulatedProviderConfig(), f) for f in SimulatedProviderConfig.__struct_fields__},
        "latency_ms": 1.0,
        "seed": 3,
        "rate_limit_rate": 1.0,
        "spike_ms": 20.0,
    }
    assert shown.json() == changed.json()
    assert restored.json()["rate_limit_rate"] == 0.0 and restored.json()["spike_ms"] == 20.0
    assert provider.config.rate_limit_rate == 0.0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b'{"error_rate": 1.5}', "error_rate must be between 0 and 1"),
        (b'{"hang_s": -1}', "must not be negative"),
        (b'{"spike_rate": "often"}', "Expected `float`, got `str`"),
        (b'{"timeout_rate": true}', "Expected `float`, got `bool`"),
        (b'{"chaos": 1}', "unknown field(s): chaos"),
        (b"[0.5]", "expected a JSON object"),
        (b"not json", "invalid fault configuration"),
    ],
)
async def test_the_control_endpoint_refuses_bad_input_with_400(
    client: httpx.AsyncClient, body: bytes, problem: str
) -> None:
    config = SimulatedProviderConfig(error_rate=0.25)
    provider, root = await _started(config)
    try:
        response = await client.post(f"{root}/_faults", content=body)
    finally:
        await provider.stop()
    assert response.status_code == 400
    assert problem in response.json()["error"]["message"]
    assert provider.config == config  # nothing half-applied


@pytest.mark.asyncio
async def test_a_new_seed_through_the_control_endpoint_restarts_the_sequences(
    client: httpx.AsyncClient,
) -> None:
    n = 30
    expected = await _statuses(client, SimulatedProviderConfig(rate_limit_rate=0.5, seed=9), n)
    provider, root = await _started(SimulatedProviderConfig(rate_limit_rate=0.5, seed=1))
    try:
        for _ in range(7):  # move the seed-1 sequences along
            await client.post(f"{root}/v1/chat/completions", json=BODY)
        await client.post(f"{root}/_faults", json={"seed": 9})
        got = [(await client.post(f"{root}/v1/chat/completions", json=BODY)).status_code for _ in range(n)]
    finally:
        await provider.stop()
    assert got == expected


def test_run_provider_documents_every_fault_option() -> None:
    result = CliRunner().invoke(app, ["run", "provider", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in (
        "--error-rate",
        "--rate-limit-rate",
        "--timeout-rate",
        "--hang-s",
        "--spike-rate",
        "--spike-ms",
    ):
        assert option in result.output
    assert "/_faults" in result.output


def test_run_provider_refuses_an_out_of_range_rate() -> None:
    result = CliRunner().invoke(app, ["run", "provider", "--timeout-rate", "1.5"], env={"COLUMNS": "200"})
    assert result.exit_code == 2
