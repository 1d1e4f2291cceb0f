"""One request is one trace: with OpenTelemetry on (an in-memory exporter), the decider, the worker
and the projector each record spans of the request's trace, linked by the ``traceparent`` headers
they put on their records; the provider call carries it too, and the evidence rows' ``trace_id`` is
the trace's id. A request with no trace id (and no header) gets a valid one, used the same way."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nexuscore.kernel.clock import SystemClock
from nexuscore.kernel.signing import generate_keypair, load_private_key
from nexuscore.observe import configure_tracing, parse_traceparent, stop_tracing, valid_trace_id
from nexuscore.policy import Registry, SignedPolicy, TrustStore, default_policy
from nexuscore.projections import EvidenceStore, Projector
from nexuscore.schemas import AvroCodec
from nexuscore.streams import Caller, DeciderLoop, PolicyHolder, Worker, default_adapters
from nexuscore.transport import Topics, ensure_topics, new_producer, start_client
from tests.factories import request
from tests.waiting import eventually_async

pytestmark = pytest.mark.integration
TRACE, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


async def provider(seen: list[str]) -> tuple[web.AppRunner, str]:
    """An OpenAI-compatible provider that keeps the traceparent of every call."""

    async def chat(req: web.Request) -> web.Response:
        seen.append(req.headers.get("traceparent", ""))
        body = {
            "model": "m", "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }  # fmt: skip
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}/v1"


def rows(evidence: Path, sql: str) -> list[dict[str, Any]]:
    if not (evidence / "manifest.jsonl").exists():
        return []
    with EvidenceStore(evidence) as store:
        return store.query(sql).to_pylist()  # type: ignore[no-any-return]


async def pipeline(
    bootstrap: str, topics: Topics, evidence: Path, key: Path, seen: list[str]
) -> list[dict[str, Any]]:
    runner, url = await provider(seen)
    clock = SystemClock()
    holder = PolicyHolder(Registry().apply(SignedPolicy(default_policy(), ()), "active"))
    decider = DeciderLoop(bootstrap, holder, clock, topics=topics, reviewers=TrustStore())
    adapters = default_adapters()
    worker = Worker(bootstrap, Caller(adapters, clock, endpoint_override=url), clock, topics=topics)
    regions = {t.id: t.home_region for t in default_policy().tenants}
    projector = Projector(
        bootstrap,
        evidence,
        load_private_key(key),
        clock,
        regions=regions,
        topics=topics,
        flush_interval_s=0.2,
    )
    stages = [asyncio.create_task(s.run()) for s in (decider, worker, projector)]
    now = datetime.now(UTC)
    traced = request(request_id="traced", trace_id=TRACE, occurred_at=now)
    bare = request(request_id="bare", trace_id="", occurred_at=now)
    producer = new_producer(bootstrap)
    await start_client(producer, bootstrap)
    codec = AvroCodec()
    header = [("traceparent", f"00-{TRACE}-{PARENT}-01".encode())]
    await producer.send_and_wait(topics.requests, codec.encode(traced), key=b"acme-bank", headers=header)
    await producer.send_and_wait(topics.requests, codec.encode(bare), key=b"acme-bank")
    await producer.stop()
    sql = "SELECT request_id, trace_id FROM outcomes"
    try:
        await eventually_async(
            lambda: len(rows(evidence, sql)) >= 2, "both requests' outcomes in the evidence", 120
        )
    finally:
        for s in (decider, worker, projector):
            s.stopping.set()
        await asyncio.gather(*stages)
        for a in adapters.values():
            await a.aclose()
        await runner.cleanup()
    return rows(evidence, "SELECT 'requests' AS t, request_id, trace_id FROM requests UNION ALL "
                "SELECT 'decisions', request_id, trace_id FROM decisions UNION ALL "
                "SELECT 'dispatches', request_id, trace_id FROM dispatches UNION ALL "
                "SELECT 'attempts', request_id, trace_id FROM attempts UNION ALL "
                "SELECT 'outcomes', request_id, trace_id FROM outcomes")  # fmt: skip


def by_stage(spans: list[ReadableSpan], trace_id: str) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        if s.context is not None and f"{s.context.trace_id:032x}" == trace_id:
            out.setdefault(str((s.attributes or {})["nexuscore.stage"]), []).append(s)
    return out


def test_one_request_is_one_trace_across_the_stages_and_in_the_evidence(
    bootstrap: str, tmp_path: Path
) -> None:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    configure_tracing("tests", tracer_provider)
    topics = Topics(f"trace-{uuid.uuid4().hex[:8]}")
    asyncio.run(ensure_topics(bootstrap, topics))
    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub.pem")
    seen: list[str] = []
    try:
        evidence_rows = asyncio.run(
            pipeline(bootstrap, topics, tmp_path / "evidence", tmp_path / "key.pem", seen)
        )
    finally:
        stop_tracing()
    traces = {r["request_id"]: set() for r in evidence_rows}
    for r in evidence_rows:
        traces[r["request_id"]].add(r["trace_id"])
    assert {t for r in evidence_rows if r["request_id"] == "traced" for t in [r["t"]]} >= {
        "requests", "decisions", "dispatches", "attempts", "outcomes"
    }  # fmt: skip
    assert traces["traced"] == {TRACE}, "every row of the request carries the traceparent's trace id"
    (bare_trace,) = traces["bare"]
    assert valid_trace_id(bare_trace) and bare_trace != TRACE

    spans = exporter.get_finished_spans()
    for trace_id in (TRACE, bare_trace):
        stages = by_stage(list(spans), trace_id)
        assert {"decider", "worker", "projector"} <= set(stages), (trace_id, sorted(stages))
    stages = by_stage(list(spans), TRACE)
    decides = [s for s in stages["decider"] if s.name == "nexuscore.decide"]
    (decide,) = decides
    (call,) = [s for s in stages["worker"] if s.name == "nexuscore.call"]
    receive = [s for s in stages["decider"] if s.name == "nexuscore.decider.receive"]
    assert receive and receive[0].parent is not None and receive[0].parent.span_id == int(PARENT, 16)
    assert call.parent is not None and decide.context is not None
    assert call.parent.span_id == decide.context.span_id, "the worker's span is the decider's child"
    # The provider was called with the worker's span as its parent, in the same trace.
    called = [parse_traceparent(h) for h in seen]
    assert call.context is not None and (TRACE, f"{call.context.span_id:016x}") in called
