"""A simulated model provider speaking the OpenAI chat-completions API, for demos and tests.

Answers are deterministic functions of the prompt; latency and injected failures (503s, 429s, hangs,
latency spikes) come from random generators seeded by the config, so a run can be reproduced.
``POST /_faults`` changes the faults of a running provider (fault-injection tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from typing import Annotated

import msgspec
from aiohttp import web

MODEL_SUFFIX = "-sim-2026.11"

# In-flight calls get this long to finish on stop before aiohttp cancels them; the default 60s
# would make a test or a Ctrl-C wait on a slow simulated call.
_SHUTDOWN_TIMEOUT_S = 2.0


class SimulatedProviderConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the simulated provider behaves. Every fault defaults to off.

    ``latency_ms`` is the mean added latency per call and ``latency_jitter_ms`` the half-width of the
    uniform spread around it. ``output_tokens`` fixes the completion size (still capped by the
    request's ``max_tokens``); ``None`` derives it from the prompt.

    Faults, each drawn per call from its own generator (so turning one on or off never changes which
    calls get another): ``error_rate`` is the share of calls answered with HTTP 503;
    ``rate_limit_rate`` the share answered with HTTP 429 and ``Retry-After: 0``; ``timeout_rate``
    the share that hang for ``hang_s`` seconds before answering normally (longer than the client's
    timeout, which must fire); ``spike_rate`` the share that take ``spike_ms`` longer than the usual
    latency. When several fall on one call, a hang wins over a 503, and a 503 over a 429; a spike
    adds to whatever the call does. ``seed`` makes all these sequences reproducible.
    """

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    output_tokens: int | None = None
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 60.0
    spike_rate: float = 0.0
    spike_ms: float = 0.0
    seed: int = 0


class _InMessage(msgspec.Struct, frozen=True):
    content: str
    role: str = "user"


class _ChatBody(msgspec.Struct, frozen=True):
    model: str
    messages: list[_InMessage]
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Newer OpenAI clients send this name instead of max_tokens.
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None


_body_decoder = msgspec.json.Decoder(_ChatBody)
_encoder = msgspec.json.Encoder()


_RATES = ("error_rate", "rate_limit_rate", "timeout_rate", "spike_rate")


def _validate(config: SimulatedProviderConfig) -> None:
    if config.latency_ms < 0 or config.latency_jitter_ms < 0:
        raise ValueError("latency_ms and latency_jitter_ms must not be negative")
    if config.output_tokens is not None and config.output_tokens < 0:
        raise ValueError("output_tokens must not be negative")
    for name in _RATES:
        rate = getattr(config, name)
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {rate}")
    if config.hang_s < 0 or config.spike_ms < 0:
        raise ValueError("hang_s and spike_ms must not be negative")


def updated_config(config: SimulatedProviderConfig, changes: object) -> SimulatedProviderConfig:
    """``config`` with the fields named in ``changes`` (a JSON object) replaced, validated.

    Raises ``ValueError`` naming the problem: not an object, an unknown field, a value of the wrong
    type, or one ``_validate`` refuses.
    """
    if not isinstance(changes, dict):
        raise ValueError("expected a JSON object of configuration fields")
    unknown = sorted(set(changes) - set(SimulatedProviderConfig.__struct_fields__))
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(map(str, unknown))}")
    try:
        new = msgspec.convert({**msgspec.structs.asdict(config), **changes}, SimulatedProviderConfig)
    except msgspec.ValidationError as exc:
        raise ValueError(str(exc)) from exc
    _validate(new)
    return new


def _error(status: int, message: str, kind: str) -> web.Response:
    body = _encoder.encode({"error": {"message": message, "type": kind}})
    return web.Response(status=status, body=body, content_type="application/json")


class SimulatedProvider:
    """An aiohttp server answering ``POST /v1/chat/completions`` like an OpenAI-compatible provider.

    ``calls`` counts requests to the endpoint; ``errors`` counts the ones answered with an injected
    503 (malformed requests get a 400 and are not counted as errors), ``rate_limited`` the injected
    429s, ``hangs`` the calls made to hang and ``spikes`` those given a latency spike.

    ``GET /_faults`` returns the configuration as JSON; ``POST /_faults`` with a JSON object of
    configuration fields replaces those fields (the others keep their values), validated as at
    start (HTTP 400 naming the problem otherwise), and returns the new configuration. The random
    sequences go on where they were, unless the body changes ``seed``: then they restart from it.
    """

    def __init__(self, config: SimulatedProviderConfig | None = None, *, host: str = "127.0.0.1") -> None:
        self.config = config if config is not None else SimulatedProviderConfig()
        _validate(self.config)
        self.host = host
        self.calls = 0
        self.errors = 0
        self.rate_limited = 0
        self.hangs = 0
        self.spikes = 0
        self._seed_generators(self.config.seed)
        self._runner: web.AppRunner | None = None
        self._base_url: str | None = None

    def _seed_generators(self, seed: int) -> None:
        # Separate generators so turning jitter or one fault on or off does not change which calls
        # get another fault. The 503 and latency generators are seeded as they always were, so
        # sequences recorded before the other faults existed still reproduce.
        # Reproducible simulation, not security: a seeded PRNG is exactly what is wanted.
        self._error_rng = random.Random(seed)  # noqa: S311
        self._latency_rng = random.Random(f"{seed}-latency")  # noqa: S311
        self._rate_limit_rng = random.Random(f"{seed}-rate-limit")  # noqa: S311
        self._hang_rng = random.Random(f"{seed}-hang")  # noqa: S311
        self._spike_rng = random.Random(f"{seed}-spike")  # noqa: S311

    def reconfigure(self, config: SimulatedProviderConfig) -> None:
        """Use ``config`` from the next call on (``ValueError`` if invalid)."""
        _validate(config)
        if config.seed != self.config.seed:
            self._seed_generators(config.seed)
        self.config = config

    @property
    def base_url(self) -> str:
        """The URL clients use as ``base_url``; only valid while started."""
        if self._base_url is None:
            raise RuntimeError("simulated provider is not started")
        return self._base_url

    async def start(self, port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL ending in ``/v1``.

        Raises ``OSError`` when the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("simulated provider is already started")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/_faults", self._get_faults)
        app.router.add_post("/_faults", self._post_faults)
        # access_log=None: a log line per call would dominate the cost of a load test.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound_port = int(runner.addresses[0][1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        self._base_url = f"http://{host}:{bound_port}/v1"
        return self._base_url

    async def stop(self) -> None:
        """Stop listening and release the socket; safe to call when not started."""
        runner, self._runner, self._base_url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    def _delay_s(self) -> float:
        cfg = self.config
        if cfg.latency_jitter_ms > 0:
            low, high = cfg.latency_ms - cfg.latency_jitter_ms, cfg.latency_ms + cfg.latency_jitter_ms
            ms = self._latency_rng.uniform(low, high)
        else:
            ms = cfg.latency_ms
        return max(0.0, ms) / 1000.0

    def _config_response(self) -> web.Response:
        return web.Response(body=_encoder.encode(self.config), content_type="application/json")

    async def _get_faults(self, request: web.Request) -> web.Response:
        return self._config_response()

    async def _post_faults(self, request: web.Request) -> web.Response:
        try:
            changes = msgspec.json.decode(await request.read())
            self.reconfigure(updated_config(self.config, changes))
        except (msgspec.DecodeError, ValueError) as exc:
            return _error(400, f"invalid fault configuration: {exc}", "invalid_request_error")
        return self._config_response()

    async def _chat_completions(self, request: web.Request) -> web.Response:
        self.calls += 1
        call_number = self.calls
        try:
            body = _body_decoder.decode(await request.read())
        except msgspec.DecodeError as exc:
            return _error(400, f"invalid request body: {exc}", "invalid_request_error")

        # Draw before the first await so the sequence of decisions follows arrival order. Every
        # generator is drawn on every call, whatever the rates, so each sequence depends on the
        # seed and the call's position only.
        cfg = self.config
        fail = self._error_rng.random() < cfg.error_rate
        limited = self._rate_limit_rng.random() < cfg.rate_limit_rate
        hang = self._hang_rng.random() < cfg.timeout_rate
        spike = self._spike_rng.random() < cfg.spike_rate
        delay_s = self._delay_s()
        if spike and cfg.spike_ms > 0:
            self.spikes += 1
            delay_s += cfg.spike_ms / 1000.0
        if hang:
            self.hangs += 1
            delay_s += cfg.hang_s
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        # A hung call answers normally, too late for a client that keeps to its timeout.
        if fail and not hang:
            self.errors += 1
            return _error(503, "simulated provider overloaded", "server_error")
        if limited and not hang:
            self.rate_limited += 1
            response = _error(429, "simulated rate limit reached", "rate_limit_error")
            response.headers["Retry-After"] = "0"
            return response

        prompt = "\n".join(message.content for message in body.messages)
        max_tokens = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
        wanted = cfg.output_tokens if cfg.output_tokens is not None else 16 + len(prompt) % 48
        output_tokens = wanted if max_tokens is None else min(wanted, max_tokens)
        input_tokens = max(1, len(prompt) // 4)
        payload = {
            "id": f"chatcmpl-sim-{call_number}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model + MODEL_SUFFIX,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"simulated answer to {prompt[:40]}"},
                    "finish_reason": "length" if output_tokens < wanted else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
        }
        return web.Response(body=_encoder.encode(payload), content_type="application/json")


async def _serve(config: SimulatedProviderConfig, host: str, port: int) -> None:
    provider = SimulatedProvider(config, host=host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Not available on every platform; there Ctrl-C still ends asyncio.run.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        url = await provider.start(port)
        print(f"simulated provider listening on {url}", flush=True)
        await stop.wait()
    finally:
        await provider.stop()
        for sig in handled:
            loop.remove_signal_handler(sig)


def serve_forever(config: SimulatedProviderConfig, host: str = "127.0.0.1", port: int = 0) -> None:
    """Run a simulated provider until SIGTERM or SIGINT, announcing its URL on stdout."""
    asyncio.run(_serve(config, host, port))
