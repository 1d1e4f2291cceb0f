"""The worker's calling logic (retries, attempts, outcome, cost) and its offset bookkeeping."""

from __future__ import annotations

import random

import pytest
from aiokafka import TopicPartition

from nexuscore._clock import FixedClock
from nexuscore.core import EMPTY_STATE, on_request
from nexuscore.errors import ProviderError
from nexuscore.providers import ChatRequest, ChatResult
from nexuscore.schemas import DispatchRequested
from nexuscore.streams import Caller, RetryPolicy
from nexuscore.streams._worker import _Offsets
from tests.factories import POLICY, T0, request


class ScriptedProvider:
    """A provider adapter that answers from a script: an exception to raise or a result to return."""

    def __init__(self, *script: ProviderError | ChatResult) -> None:
        self.script = list(script)
        self.calls: list[tuple[str, ChatRequest]] = []

    async def complete(self, base_url: str, request: ChatRequest) -> ChatResult:
        self.calls.append((base_url, request))
        step = self.script.pop(0)
        if isinstance(step, ProviderError):
            raise step
        return step

    async def aclose(self) -> None:
        return None


def dispatch() -> DispatchRequested:
    _, _, events = on_request(EMPTY_STATE, request(max_output_tokens=100), POLICY, "tests", T0)
    d = events[1]
    assert isinstance(d, DispatchRequested)
    return d


def caller(provider: ScriptedProvider, override: str | None = None) -> tuple[Caller, list[float]]:
    slept: list[float] = []
    c = Caller(
        {"openai": provider, "anthropic": provider},
        FixedClock(T0),
        retry=RetryPolicy(max_attempts=3, base_s=0.1, cap_s=1.0),
        rng=random.Random(1),
        endpoint_override=override,
        sleep=slept.append,
    )
    return c, slept


OK = ChatResult(text="fine", input_tokens=8, output_tokens=500, finish_reason="stop", model_version="m-2026")
BUSY = ProviderError("HTTP 503", retryable=True, status_code=503)


@pytest.mark.asyncio
async def test_retryable_errors_are_retried_with_jitter_and_every_attempt_is_recorded() -> None:
    provider = ScriptedProvider(BUSY, BUSY, OK)
    c, slept = caller(provider)
    d = dispatch()
    attempts, outcome = await c.call(d)
    assert [a.status for a in attempts] == ["error", "error", "ok"]
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert attempts[0].http_status == 503 and attempts[0].retryable
    assert len(slept) == 2 and 0 <= slept[0] <= 0.1 and 0 <= slept[1] <= 0.2
    assert outcome.status == "answered" and outcome.attempts == 3
    assert outcome.causation_id == d.event_id and outcome.request_id == d.request_id
    # The idempotency key travels with every retry, so the provider can deduplicate.
    assert {r.idempotency_key for _, r in provider.calls} == {d.idempotency_key}
    assert {a.region for a in attempts} == {d.region}


@pytest.mark.asyncio
async def test_usage_is_billed_at_the_dispatch_prices_and_capped_at_max_output_tokens() -> None:
    c, _ = caller(ScriptedProvider(OK))
    d = dispatch()
    _, outcome = await c.call(d)
    assert outcome.output_tokens == d.max_output_tokens == 100
    expected = -(-(8 * d.input_price_micros_per_1k + 100 * d.output_price_micros_per_1k) // 1000)
    assert outcome.cost_micros == expected <= d.estimated_cost_micros
    assert outcome.model_version == "m-2026"


@pytest.mark.asyncio
async def test_a_non_retryable_error_fails_at_once_and_costs_nothing() -> None:
    c, slept = caller(ScriptedProvider(ProviderError("HTTP 400", retryable=False, status_code=400)))
    attempts, outcome = await c.call(dispatch())
    assert len(attempts) == 1 and not slept
    assert (outcome.status, outcome.cost_micros, outcome.error) == ("failed", 0, "HTTP 400")


@pytest.mark.asyncio
async def test_retries_stop_after_the_last_attempt() -> None:
    c, slept = caller(ScriptedProvider(BUSY, BUSY, BUSY))
    attempts, outcome = await c.call(dispatch())
    assert len(attempts) == 3 and len(slept) == 2 and outcome.status == "failed"


@pytest.mark.asyncio
async def test_the_endpoint_override_sends_every_call_to_the_simulated_provider() -> None:
    provider = ScriptedProvider(OK)
    c, _ = caller(provider, override="http://127.0.0.1:9/v1")
    await c.call(dispatch())
    assert provider.calls[0][0] == "http://127.0.0.1:9/v1"


def test_only_a_contiguous_prefix_of_finished_offsets_is_committable() -> None:
    tp = TopicPartition("t", 0)
    o = _Offsets()
    for offset in (10, 11, 12):
        o.started(tp, offset)
    o.finished(tp, 11)
    o.finished(tp, 12)
    assert o.committable() == {tp: 10}  # 10 is still running: nothing past it
    o.committed.update(o.committable())
    assert o.committable() == {}
    o.finished(tp, 10)
    assert o.committable() == {tp: 13}
