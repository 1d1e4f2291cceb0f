"""The gateway's HTTP shell (aiohttp.web) over one ``NexusClient``.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/nexus/requests/{id}`` (poll an
escalated request; ``?wait=S`` waits up to S seconds, at most 60, for its terminal state). The
tenant is the API key's, never the body's. Statuses: 200 answered, 202 escalated, 400 invalid or
rejected, 401 bad key, 403 denied, 429 budget exhausted, 502 failed, 504 no result in time.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
from aiohttp import web
from aiokafka.errors import KafkaError

from nexuscore.client import InvalidRequest, NexusClient, Result, ResultTimeout
from nexuscore.gateway._keys import ApiKey, KeyRing
from nexuscore.gateway._openai import (
    ApiError,
    ChatCall,
    chat_call,
    chunks,
    completion,
    error_for,
    escalated,
    invalid,
    models,
    status_body,
)
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import RoutingPolicy

log = logging.getLogger(__name__)
MAX_BODY = 4 * 1024 * 1024  # a prompt may be 512 KiB of UTF-8; JSON escapes can quadruple it
MAX_POLL_WAIT_S = 60.0
_CLIENT = web.AppKey("client", NexusClient)
_KEYS = web.AppKey("keys", KeyRing)
_TIMEOUT = web.AppKey("timeout", float)
REQUEST_ID_HEADER = "X-Nexus-Request-Id"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatewaySettings(msgspec.Struct, frozen=True, kw_only=True):
    bootstrap: str
    keys: Path
    namespace: str = ""
    host: str = "127.0.0.1"
    port: int = 8080
    policy: RoutingPolicy | None = None
    timeout_s: float = 60.0
    lookback_s: float = 300.0


def error(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(e.body(), status=e.status, headers=headers)


def authenticated(request: web.Request) -> ApiKey | web.Response:
    key = request.app[_KEYS].authenticate(request.headers.get("Authorization"))
    if key is None:
        return error(ApiError(401, "invalid or revoked API key", "authentication_error", "invalid_api_key"))
    return key


def poll_url(request_id: str) -> str:
    return f"/v1/nexus/requests/{request_id}"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    key = authenticated(request)
    if isinstance(key, web.Response):
        return key
    try:
        body = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        return error(invalid("the body is not JSON"))
    except RecursionError:  # msgspec's own limit on nesting: hostile input, not a gateway fault
        return error(invalid("the body is nested too deeply"))
    call = chat_call(body, request.headers, key)
    if isinstance(call, ApiError):
        return error(call)
    client = request.app[_CLIENT]
    try:
        sent = await client.send(
            call.spec, request_id=call.request_id, traceparent=request.headers.get("traceparent")
        )
    except InvalidRequest as exc:
        return error(invalid(exc.reason, code=exc.code))
    # Every answer names the request id: the one to retry under, or to poll.
    named = {REQUEST_ID_HEADER: sent.request_id}
    try:
        result = await client.result(
            sent.tenant_id, sent.request_id, request.app[_TIMEOUT], through_escalation=False
        )
    except ResultTimeout as exc:
        return error(ApiError(504, f"{exc}; poll {poll_url(sent.request_id)}", "timeout", "timeout"), named)
    return await answer(request, call, result, named)


async def answer(
    request: web.Request, call: ChatCall, result: Result, named: dict[str, str]
) -> web.StreamResponse:
    if result.status == "escalated":
        url = poll_url(result.request_id)
        return web.json_response(escalated(result, url), status=202, headers={"Location": url, **named})
    if result.status != "answered":
        return error(error_for(result), named)
    if not call.stream:
        return web.json_response(completion(result, call.model), headers=named)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **named}
    )
    await response.prepare(request)
    for chunk in chunks(result, call.model, call.include_usage):
        await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def request_status(request: web.Request) -> web.Response:
    key = authenticated(request)
    if isinstance(key, web.Response):
        return key
    rid = request.match_info["request_id"]
    client = request.app[_CLIENT]
    try:
        wait = min(float(request.query.get("wait", "0")), MAX_POLL_WAIT_S)
    except ValueError:
        return error(invalid("wait must be a number of seconds", param="wait"))
    result = client.peek(key.tenant_id, rid)  # the key's tenant only: ids are unique per tenant
    if wait > 0 and not (result and result.terminal):
        try:
            result = await client.result(key.tenant_id, rid, wait)
        except ResultTimeout as exc:
            result = exc.last
    if result is None:
        return error(
            ApiError(404, f"no request {rid!r} known to this gateway", "not_found_error", "unknown_request")
        )
    return web.json_response(status_body(result, "nexuscore"))


async def list_models(request: web.Request) -> web.Response:
    key = authenticated(request)
    if isinstance(key, web.Response):
        return key
    return web.json_response(models())


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Whatever goes wrong answers in OpenAI's error shape: aiohttp's own HTTP errors (404, 405,
    413 for a body over the limit) keep their status; the broker away is 503; anything else is
    logged and 500. The gateway itself never stops for a request."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(ApiError(exc.status, exc.reason, "invalid_request_error", f"http_{exc.status}"))
    except (NexusError, KafkaError) as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return error(ApiError(503, f"NexusCore is unavailable: {exc}", "server_error", "unavailable"))
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error(
            ApiError(500, "internal error (logged by the gateway)", "server_error", "internal_error")
        )


def make_app(client: NexusClient, keys: KeyRing, timeout_s: float) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[openai_errors])
    app[_CLIENT] = client
    app[_KEYS] = keys
    app[_TIMEOUT] = timeout_s
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/nexus/requests/{request_id}", request_status)
    return app


async def serve(settings: GatewaySettings, ready: Callable[[str], None], stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; ``ready`` gets the URL once it listens."""
    keys = KeyRing(settings.keys)
    client = NexusClient(
        settings.bootstrap, namespace=settings.namespace, policy=settings.policy,
        lookback_s=settings.lookback_s, producer="nexuscore.gateway",
    )  # fmt: skip
    async with client:
        runner = web.AppRunner(make_app(client, keys, settings.timeout_s), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            try:
                await site.start()
            except OSError as exc:
                raise NexusError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from exc
            host, port = runner.addresses[0][:2]
            ready(f"http://{host}:{port}")
            await stop.wait()
        finally:
            await runner.cleanup()


def run_gateway(settings: GatewaySettings, ready: Callable[[str], None]) -> None:
    """Serve in the foreground until SIGTERM or SIGINT."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, ready, stop)

    asyncio.run(main())
