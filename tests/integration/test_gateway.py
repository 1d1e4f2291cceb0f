"""The OpenAI-compatible gateway on the real broker, driven by the official ``openai`` client, with
the real decider, worker and simulated provider behind it."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore.client import Result
from nexuscore.policy import DEFAULT_POLICY_PATH
from nexuscore.transport import Topics, ensure_topics
from tests.integration.test_client import Live, approve, start_pipeline

pytestmark = pytest.mark.integration
TRACE = "5bf92f3577b34da6a3ce929d0e0e4736"
PUBLIC_CHAT = {"feature": "support-chat", "risk_class": "low", "data_classification": "public"}


@dataclass
class Gateway:
    url: str
    secret: str
    key_file: Path
    live: Live

    clients: list[openai.OpenAI] = field(default_factory=list)

    def openai(self, api_key: str | None = None) -> openai.OpenAI:
        """A client kept open until the module ends (one left to the garbage collector leaves its
        socket to a ResourceWarning, which this suite treats as an error)."""
        client = openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or self.secret, max_retries=0, timeout=90
        )
        self.clients.append(client)
        return client


def add_key(keys: Path, *options: str) -> str:
    """A key made by the CLI, as an operator would: the secret is the last line printed."""
    done = subprocess.run(
        [sys.executable, "-m", "nexuscore", "gateway", "key", "add", "--keys", str(keys), *options],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def gateway(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    topics = Topics(f"gw-{uuid.uuid4().hex[:8]}.")
    keys = dev_keys(tmp_path_factory.mktemp("keys"), DEFAULT_POLICY_PATH)
    key_file = tmp_path_factory.mktemp("gateway") / "keys.json"
    secret = add_key(key_file, "--tenant", "acme-bank", "--feature", "support-chat", "--task-type", "chat")
    asyncio.run(ensure_topics(bootstrap, topics))
    with Services(tmp_path_factory.mktemp("logs")) as services:
        start_pipeline(services, bootstrap, topics, keys)
        # No --policy: admission is left to the decider, so its rejections come back over HTTP.
        gw = services.start(
            "gateway", "run", "gateway", "--bootstrap", bootstrap, "--keys", str(key_file),
            "--port", "0", "--namespace", topics.namespace, "--timeout", "90",
        )  # fmt: skip
        url = gw.wait_for_line("gateway listening on", 60)
        gateway = Gateway(url, secret, key_file, Live(bootstrap, topics, keys, services))
        yield gateway
        for client in gateway.clients:
            client.close()


def test_models_are_listed(gateway: Gateway) -> None:
    assert [m.id for m in gateway.openai().models.list()] == ["nexuscore"]


def test_a_plain_completion_is_answered_in_openais_shape(gateway: Gateway) -> None:
    caller = f"00-{TRACE}-00f067aa0ba902b7-01"
    done = gateway.openai().chat.completions.create(
        model="nexuscore",
        messages=[{"role": "user", "content": "What is the balance on my account?"}],
        max_tokens=64,
        metadata=PUBLIC_CHAT,
        extra_headers={"traceparent": caller},
    )
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    assert done.choices[0].message.content and done.choices[0].finish_reason
    assert done.usage is not None and done.usage.completion_tokens > 0
    nexus = (done.model_extra or {})["nexus"]
    assert nexus["trace_id"] == TRACE and nexus["status"] == "answered"


def test_streaming_sends_chunks_ending_in_done(gateway: Gateway) -> None:
    stream = gateway.openai().chat.completions.create(
        model="nexuscore",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Explain a chargeback."},
        ],
        max_tokens=128,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={f"X-Nexus-{k.replace('_', '-').title()}": v for k, v in PUBLIC_CHAT.items()},
    )
    parts = list(stream)  # the SDK stops at `data: [DONE]`
    assert all(p.object == "chat.completion.chunk" for p in parts)
    text = "".join(c.delta.content or "" for p in parts for c in p.choices)
    assert text
    finishes = [c.finish_reason for p in parts for c in p.choices if c.finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert parts[-1].usage is not None and parts[-1].usage.completion_tokens > 0


def test_a_bad_or_missing_key_is_401(gateway: Gateway) -> None:
    for secret in ("nxk_not-a-key", "sk-something-else"):
        with pytest.raises(openai.AuthenticationError) as caught:
            gateway.openai(secret).models.list()
        assert caught.value.status_code == 401
        assert caught.value.code == "invalid_api_key"


def test_a_rejection_is_400_with_the_deciders_reason(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.openai().chat.completions.create(
            model="nexuscore", messages=[{"role": "user", "content": "hi"}], max_tokens=16,
            metadata={**PUBLIC_CHAT, "task_type": "poetry"},
        )  # fmt: skip
    assert caught.value.code == "unknown_task_type"
    assert "task type 'poetry'" in caught.value.message


def test_an_invalid_request_is_400_before_it_is_sent(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        gateway.openai().chat.completions.create(
            model="nexuscore",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=0,
            metadata=PUBLIC_CHAT,
        )
    assert caught.value.code == "invalid_request" and "max_output_tokens" in caught.value.message


def test_an_escalation_is_202_with_a_url_to_poll_for_its_resolution(gateway: Gateway) -> None:
    raw = gateway.openai().chat.completions.with_raw_response.create(
        model="nexuscore", messages=[{"role": "user", "content": "Approve this wire transfer?"}],
        max_tokens=64, metadata={**PUBLIC_CHAT, "risk_class": "critical"},
    )  # fmt: skip
    assert raw.status_code == 202
    body = raw.http_response.json()
    assert body["status"] == "escalated" and body["review_deadline"]
    assert raw.headers["Location"] == body["poll_url"] == f"/v1/nexus/requests/{body['request_id']}"
    assert raw.headers["X-Nexus-Request-Id"] == body["request_id"]
    auth = {"Authorization": f"Bearer {gateway.secret}"}
    polled = httpx.get(gateway.url + body["poll_url"], headers=auth, timeout=30).json()
    assert polled["status"] == "escalated" and not polled["terminal"]
    asyncio.run(approve(gateway.live, Result(
        tenant_id="acme-bank", request_id=body["request_id"], status="escalated",
        decision_id=polled["decision_id"],
    )))  # fmt: skip
    final = httpx.get(gateway.url + body["poll_url"] + "?wait=60", headers=auth, timeout=90).json()
    assert final["status"] == "answered" and final["terminal"]
    assert final["completion"]["choices"][0]["message"]["content"]
    # Another tenant's key (added while the gateway runs: it re-reads the file) cannot see it.
    other = add_key(gateway.key_file, "--tenant", "globex-insurance", "--feature", "support-chat")
    peer = httpx.get(gateway.url + body["poll_url"], headers={"Authorization": f"Bearer {other}"}, timeout=30)
    assert peer.status_code == 404 and peer.json()["error"]["code"] == "unknown_request"


def test_an_exhausted_budget_is_429_with_the_budgets_reason(gateway: Gateway) -> None:
    # initech-payments' support-chat has 5 cents a day: no deployment fits 20,000 output tokens.
    secret = add_key(gateway.key_file, "--tenant", "initech-payments", "--feature", "support-chat")
    with pytest.raises(openai.RateLimitError) as caught:
        gateway.openai(secret).chat.completions.create(
            model="nexuscore",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20_000,
            metadata=PUBLIC_CHAT,
        )
    assert caught.value.status_code == 429 and caught.value.code == "budget_exhausted"
    assert "budget" in caught.value.message


def test_a_retry_with_the_same_idempotency_key_returns_the_same_answer(gateway: Gateway) -> None:
    def ask() -> openai.types.chat.ChatCompletion:
        return gateway.openai().chat.completions.create(
            model="nexuscore", messages=[{"role": "user", "content": "How do I reset my PIN?"}], max_tokens=64,
            metadata=PUBLIC_CHAT, extra_headers={"Idempotency-Key": idem},
        )  # fmt: skip

    idem = f"idem-{uuid.uuid4().hex}"
    first, again = ask(), ask()
    assert first.choices[0].message.content and again.model_dump() == first.model_dump()
    assert (first.model_extra or {})["nexus"]["request_id"] == idem


def test_a_key_revoked_while_the_gateway_runs_is_refused_at_its_next_request(gateway: Gateway) -> None:
    secret = add_key(gateway.key_file, "--tenant", "acme-bank", "--feature", "support-chat")
    assert [m.id for m in gateway.openai(secret).models.list()] == ["nexuscore"]
    key_id = next(k["key_id"] for k in json.loads(gateway.key_file.read_text())["keys"] if k["created_at"] and
                  k["sha256"] == hashlib.sha256(secret.encode()).hexdigest())  # fmt: skip
    subprocess.run(
        [sys.executable, "-m", "nexuscore", "gateway", "key", "revoke", key_id, "--keys", str(gateway.key_file)],
        check=True, capture_output=True,
    )  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        gateway.openai(secret).models.list()
