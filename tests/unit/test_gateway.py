"""The gateway's pure parts and its key file: OpenAI's format in and out, and keys stored hashed."""

from __future__ import annotations

import asyncio
import io
import json
import stat
from pathlib import Path

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from nexuscore.cli import app
from nexuscore.client import NexusClient, Result
from nexuscore.gateway import (
    MAX_BODY,
    ApiError,
    ApiKey,
    ChatCall,
    KeyDefaults,
    KeyRing,
    add_key,
    chat_call,
    chunks,
    completion,
    error_for,
    make_app,
    read_keys,
    revoke_key,
    secret_hash,
)
from nexuscore.kernel.errors import NexusError
from tests.factories import T0

KEY = ApiKey(
    key_id="key_1",
    tenant_id="acme-bank",
    sha256="0" * 64,
    created_at=T0,
    defaults=KeyDefaults(feature="support-chat", latency_slo_ms=3000),
)
HELLO = [{"role": "user", "content": "hello"}]


def call(body: object, headers: dict[str, str] | None = None) -> ChatCall:
    out = chat_call(body, headers or {}, KEY)
    assert isinstance(out, ChatCall), out
    return out


def refused(body: object, headers: dict[str, str] | None = None) -> ApiError:
    out = chat_call(body, headers or {}, KEY)
    assert isinstance(out, ApiError), out
    return out


def test_the_tenant_is_the_keys_and_the_keys_defaults_fill_what_the_request_leaves_out() -> None:
    c = call({"model": "gpt-4o", "messages": HELLO, "tenant_id": "someone-else"})
    assert c.spec.tenant_id == "acme-bank"
    assert (c.spec.feature, c.spec.task_type, c.spec.risk_class) == ("support-chat", "chat", "medium")
    assert (c.spec.data_classification, c.spec.latency_slo_ms) == ("confidential", 3000)
    assert c.spec.prompt == "hello" and c.spec.max_output_tokens == 1024 and c.model == "gpt-4o"


def test_metadata_wins_over_headers_which_win_over_the_keys_defaults() -> None:
    headers = {"X-Nexus-Risk-Class": "high", "X-Nexus-Feature": "kyc-screening", "X-Nexus-Request-Id": "r-9"}
    c = call({"messages": HELLO, "max_tokens": 50, "metadata": {"feature": "credit-memo"}}, headers)
    assert (c.spec.feature, c.spec.risk_class, c.request_id) == ("credit-memo", "high", "r-9")
    assert c.spec.max_output_tokens == 50
    assert call({"messages": HELLO}, {"Idempotency-Key": "idem-1"}).request_id == "idem-1"
    assert call({"messages": HELLO}).request_id is None  # the client draws one


def test_a_conversation_becomes_one_prompt_with_its_roles() -> None:
    c = call(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
            ]
        }
    )
    assert c.spec.prompt == "system: Be brief.\n\nuser: Hi there"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": HELLO, "max_tokens": "many"}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": True}, "max_tokens"),
        ({"messages": HELLO, "metadata": ["x"]}, "metadata"),
        ({"messages": HELLO, "metadata": {"latency_slo_ms": "soon"}}, "latency_slo_ms"),
        ({"messages": HELLO, "stream": "yes"}, None),
    ],
)
def test_hostile_bodies_are_400_naming_the_field(body: object, param: str | None) -> None:
    e = refused(body)
    assert e.status == 400 and e.type == "invalid_request_error" and e.param == param


def test_without_any_feature_the_request_is_400() -> None:
    bare = msgspec.structs.replace(KEY, defaults=KeyDefaults())
    e = chat_call({"messages": HELLO}, {}, bare)
    assert isinstance(e, ApiError) and e.code == "missing_feature"


def result(status: str, **fields: object) -> Result:
    return Result(tenant_id="acme-bank", request_id="r-1", status=status, occurred_at=T0, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "code", "http", "kind"),
    [
        ("rejected", "unknown_feature", 400, "invalid_request_error"),
        ("denied", "budget_exhausted", 429, "rate_limit_error"),
        ("denied", "denied", 403, "permission_error"),
        ("denied", "escalation_denied", 403, "permission_error"),
        ("failed", "provider_failed", 502, "server_error"),
    ],
)
def test_terminal_states_map_to_statuses_with_nexuscores_reason(
    status: str, code: str, http: int, kind: str
) -> None:
    e = error_for(result(status, reason_code=code, reason="because"))
    assert (e.status, e.type, e.code, e.message) == (http, kind, code, "because")
    assert e.body() == {"error": {"message": "because", "type": kind, "code": code, "param": None}}


def test_an_answer_is_a_completion_and_its_chunks_reassemble_it() -> None:
    text = "word " * 40
    r = result("answered", response=text, finish_reason="stop", model="m-1", input_tokens=3, output_tokens=40)
    body = completion(r, "nexuscore")
    assert body["choices"][0]["message"]["content"] == text and body["model"] == "m-1"
    assert body["usage"]["total_tokens"] == 43 and body["created"] == int(T0.timestamp())
    parts = chunks(r, "nexuscore", include_usage=True)
    assert parts[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(p["choices"][0]["delta"].get("content", "") for p in parts if p["choices"]) == text
    assert [p["choices"][0]["finish_reason"] for p in parts if p["choices"]][-1] == "stop"
    assert parts[-1]["choices"] == [] and parts[-1]["usage"]["completion_tokens"] == 40


def test_keys_are_stored_hashed_in_a_file_only_its_owner_reads(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, secret = add_key(path, "acme-bank", KeyDefaults(feature="support-chat"), T0)
    assert secret.startswith("nxk_") and len(secret) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert secret not in path.read_text() and secret_hash(secret) in path.read_text()
    ring = KeyRing(path)
    assert ring.authenticate(f"Bearer {secret}") == key
    for bad in (None, secret, f"Bearer {secret}x", "Bearer nxk_", f"Basic {secret}"):
        assert ring.authenticate(bad) is None
    revoke_key(path, key.key_id, T0)
    assert ring.authenticate(f"Bearer {secret}") is None  # the running ring sees the change
    assert read_keys(path).keys[0].revoked_at == T0


def test_the_key_commands_print_a_secret_once_and_list_none(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    runner = CliRunner()
    added = runner.invoke(app, ["gateway", "key", "add", "--keys", str(path), "--tenant", "acme-bank"])
    assert added.exit_code == 0, added.output
    secret = added.output.strip().splitlines()[-1]
    listed = runner.invoke(app, ["gateway", "key", "list", "--keys", str(path)])
    assert listed.exit_code == 0 and "acme-bank" in listed.output and secret not in listed.output
    assert secret not in path.read_text()
    key_id = json.loads(path.read_text())["keys"][0]["key_id"]
    assert runner.invoke(app, ["gateway", "key", "revoke", key_id, "--keys", str(path)]).exit_code == 0


def test_bad_key_input_is_a_deliberate_error(tmp_path: Path) -> None:
    # main() prints a NexusError as one line and exits 2; the runner shows the error itself.
    path = tmp_path / "keys.json"
    for args in (
        ["add", "--tenant", "acme-bank", "--risk-class", "extreme"],
        ["add", "--tenant", ""],
        ["add", "--tenant", "acme-bank", "--latency-slo-ms", "0"],
        ["revoke", "key_nope"],
    ):
        done = CliRunner().invoke(app, ["gateway", "key", *args, "--keys", str(path)])
        assert isinstance(done.exception, NexusError), (args, done.output)
    path.write_text("{not json")
    done = CliRunner().invoke(app, ["gateway", "key", "list", "--keys", str(path)])
    assert isinstance(done.exception, NexusError) and "not a gateway key file" in str(done.exception)


def test_over_http_without_a_broker_every_failure_is_an_openai_error(tmp_path: Path) -> None:
    """The HTTP shell alone (its client never started): bad keys, hostile bodies, unknown routes
    and an unreachable pipeline all answer in OpenAI's error shape, and the gateway goes on."""
    path = tmp_path / "keys.json"
    _, secret = add_key(path, "acme-bank", KeyDefaults(feature="support-chat"), T0)
    auth = {"Authorization": f"Bearer {secret}"}

    async def go() -> None:
        app = make_app(NexusClient("127.0.0.1:1"), KeyRing(path), timeout_s=1.0)
        async with TestClient(TestServer(app)) as http:
            cases = [
                (await http.get("/v1/models"), 401, "invalid_api_key"),
                (
                    await http.post("/v1/chat/completions", data=b"\xff{", headers=auth),
                    400,
                    "invalid_request",
                ),
                (
                    await http.post("/v1/chat/completions", json={"messages": HELLO}, headers=auth),
                    503,
                    "unavailable",
                ),
                (
                    await http.post(
                        "/v1/chat/completions", data=io.BytesIO(b" " * (MAX_BODY + 1)), headers=auth
                    ),
                    413,
                    "http_413",
                ),
                (await http.get("/v1/nope", headers=auth), 404, "http_404"),
                (await http.get("/v1/nexus/requests/r-1?wait=x", headers=auth), 400, "invalid_request"),
                (await http.get("/v1/nexus/requests/r-1", headers=auth), 404, "unknown_request"),
            ]
            for response, status, code in cases:
                body = await response.json()
                assert (response.status, body["error"]["code"]) == (status, code), body
                assert set(body["error"]) == {"message", "type", "code", "param"}
            assert (await http.get("/v1/models", headers=auth)).status == 200

    asyncio.run(go())
