"""The OpenAI-compatible HTTP gateway: ``POST /v1/chat/completions``, ``GET /v1/models`` and
``GET /v1/nexus/requests/{id}`` over the producer SDK; tenants from hashed API keys."""

from nexuscore.gateway._app import MAX_BODY, GatewaySettings, make_app, run_gateway, serve
from nexuscore.gateway._keys import (
    ApiKey,
    KeyDefaults,
    KeyFile,
    KeyRing,
    add_key,
    read_keys,
    revoke_key,
    secret_hash,
)
from nexuscore.gateway._openai import (
    ApiError,
    ChatCall,
    chat_call,
    chunks,
    completion,
    error_for,
    render_messages,
)

__all__ = [
    "MAX_BODY",
    "ApiError",
    "ApiKey",
    "ChatCall",
    "GatewaySettings",
    "KeyDefaults",
    "KeyFile",
    "KeyRing",
    "add_key",
    "chat_call",
    "chunks",
    "completion",
    "error_for",
    "make_app",
    "read_keys",
    "render_messages",
    "revoke_key",
    "run_gateway",
    "secret_hash",
    "serve",
]
