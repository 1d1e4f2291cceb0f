"""OpenAI's chat-completions wire format, mapped to NexusCore and back. Pure.

In: the body (``messages``, ``max_completion_tokens``/``max_tokens``, ``stream``, ``metadata``), the
``X-Nexus-*`` headers and the key's defaults, in that order of precedence, become a ``RequestSpec``.
Out: a ``Result`` becomes a status and an OpenAI-shaped body; every error is
``{"error": {"message", "type", "code", "param"}}`` with NexusCore's reason code and reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from nexuscore.client import RequestSpec, Result
from nexuscore.gateway._keys import ApiKey

MODEL = "nexuscore"  # one model name: NexusCore picks the deployment (GET /v1/models lists it)
DEFAULT_MAX_TOKENS = 1024
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# metadata key (and header suffix) -> RequestSpec field
FIELDS = {
    "feature": "Feature",
    "task_type": "Task-Type",
    "risk_class": "Risk-Class",
    "data_classification": "Data-Classification",
    "latency_slo_ms": "Latency-Slo-Ms",
    "data_subject": "Data-Subject",
}


class ApiError(msgspec.Struct, frozen=True):
    status: int
    message: str
    type: str
    code: str
    param: str | None = None

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def invalid(message: str, code: str = "invalid_request", param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)


class ChatCall(msgspec.Struct, frozen=True):
    spec: RequestSpec
    request_id: str | None
    stream: bool
    include_usage: bool
    model: str


def chat_call(body: object, headers: Mapping[str, str], key: ApiKey) -> ChatCall | ApiError:
    """The request a chat-completions call asks for, or why it cannot be one."""
    if not isinstance(body, dict):
        return invalid("the body must be a JSON object")
    prompt = render_messages(body.get("messages"))
    if isinstance(prompt, ApiError):
        return prompt
    tokens = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
    if type(tokens) is not int:
        return invalid("max_tokens must be an integer", param="max_tokens")
    meta = body.get("metadata") or {}
    if not isinstance(meta, dict):
        return invalid("metadata must be an object", param="metadata")
    fields = _fields(meta, headers, key)
    if isinstance(fields, ApiError):
        return fields
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    model = body.get("model", MODEL)
    if not isinstance(stream, bool) or not isinstance(options, dict) or not isinstance(model, str):
        return invalid("stream must be a boolean, stream_options an object and model a string")
    spec = RequestSpec(tenant_id=key.tenant_id, prompt=prompt, max_output_tokens=tokens, **fields)
    rid = _first(meta.get("request_id"), headers.get("X-Nexus-Request-Id"), headers.get("Idempotency-Key"))
    return ChatCall(spec, rid, stream, options.get("include_usage") is True, model[:200] or MODEL)


def render_messages(messages: object) -> str | ApiError:
    """The conversation as one prompt: a lone message is its text; several, one paragraph each,
    prefixed by the role."""
    if not isinstance(messages, list) or not messages:
        return invalid("messages must be a non-empty list", param="messages")
    parts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            return invalid(f"messages[{i}] needs a role of {sorted(ROLES)}", param=f"messages[{i}]")
        text = _text(m.get("content"))
        if text is None:
            return invalid(f"messages[{i}].content must be text", param=f"messages[{i}].content")
        parts.append((m["role"], text))
    if len(parts) == 1:
        return parts[0][1]
    return "\n\n".join(f"{role}: {text}" for role, text in parts)


def _text(content: object) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    return None


def _fields(meta: dict[str, Any], headers: Mapping[str, str], key: ApiKey) -> dict[str, Any] | ApiError:
    defaults = msgspec.structs.asdict(key.defaults)
    out: dict[str, Any] = {}
    for name, header in FIELDS.items():
        value = _first(meta.get(name), headers.get(f"X-Nexus-{header}"), defaults.get(name, ""))
        if name == "latency_slo_ms" and value is not None:
            try:
                value = int(value)
            except (TypeError, ValueError):
                return invalid("latency_slo_ms must be an integer", param="latency_slo_ms")
        out[name] = value if name == "latency_slo_ms" else str(value or "")
    if not out["feature"]:
        return invalid(
            "no feature: set metadata.feature, the X-Nexus-Feature header or the key's default",
            code="missing_feature", param="feature",
        )  # fmt: skip
    return out


def _first(*values: object) -> Any:
    return next((v for v in values if v is not None and v != ""), None)


# --- results --------------------------------------------------------------------------------------


def completion(result: Result, model: str) -> dict[str, Any]:
    """An answered request as a ``chat.completion``; NexusCore's own facts under ``nexus``."""
    return {
        "id": f"chatcmpl-{result.request_id}",
        "object": "chat.completion",
        "created": _created(result),
        "model": result.model or model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.response},
                "finish_reason": result.finish_reason or "stop",
            }
        ],
        "usage": _usage(result),
        "nexus": nexus_facts(result),
    }


def nexus_facts(result: Result) -> dict[str, Any]:
    return {
        "request_id": result.request_id,
        "trace_id": result.trace_id,
        "status": result.status,
        "decision_id": result.decision_id,
        "deployment_id": result.deployment_id,
        "region": result.region,
        "cost_micros": result.cost_micros,
        "policy_version": result.policy_version,
        "escalated": result.escalated,
        "cached": result.cached,
    }


def error_for(result: Result) -> ApiError:
    """A terminal state other than answered, as an HTTP error carrying NexusCore's reason."""
    code, why = result.reason_code or result.status, result.reason or result.status
    if result.status == "rejected":
        return ApiError(400, why, "invalid_request_error", code)
    if result.status == "denied" and code == "budget_exhausted":
        return ApiError(429, why, "rate_limit_error", code)
    if result.status == "denied":
        return ApiError(403, why, "permission_error", code)
    return ApiError(502, why, "server_error", code)


def escalated(result: Result, poll_url: str) -> dict[str, Any]:
    """202: a person decides; poll ``poll_url`` for the resolution."""
    deadline = result.review_deadline.isoformat() if result.review_deadline else None
    return {
        "id": result.request_id,
        "object": "nexus.escalation",
        "status": "escalated",
        "request_id": result.request_id,
        "reason": result.reason,
        "review_deadline": deadline,
        "poll_url": poll_url,
    }


def status_body(result: Result, model: str) -> dict[str, Any]:
    """What the poll endpoint says of a request: its state, and the completion once answered."""
    body: dict[str, Any] = {
        **nexus_facts(result),
        "terminal": result.terminal,
        "reason_code": result.reason_code,
        "reason": result.reason,
        "resolution": result.resolution,
        "review_deadline": result.review_deadline.isoformat() if result.review_deadline else None,
    }
    if result.status == "answered":
        body["completion"] = completion(result, model)
    elif result.terminal:
        body["error"] = error_for(result).body()["error"]
    return body


def chunks(result: Result, model: str, include_usage: bool, size: int = 64) -> list[dict[str, Any]]:
    """An answer as ``chat.completion.chunk`` events: the role, the content in pieces, the finish
    reason (and the usage, when asked). The pipeline answers whole, so the pieces come at once."""
    base = {"id": f"chatcmpl-{result.request_id}", "object": "chat.completion.chunk",
            "created": _created(result), "model": result.model or model}  # fmt: skip
    text = result.response

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": text[i : i + size]}) for i in range(0, len(text), size)]
    out.append(chunk({}, result.finish_reason or "stop"))
    if include_usage:
        out.append({**base, "choices": [], "usage": _usage(result)})
    return out


def _usage(result: Result) -> dict[str, int]:
    return {
        "prompt_tokens": result.input_tokens,
        "completion_tokens": result.output_tokens,
        "total_tokens": result.input_tokens + result.output_tokens,
    }


def _created(result: Result) -> int:
    return int(result.occurred_at.timestamp()) if result.occurred_at else 0


def models() -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": MODEL, "object": "model", "created": 0, "owned_by": "nexuscore"}],
    }
