"""The front door, measured: the same load through the OpenAI-compatible HTTP gateway and
published straight to Kafka with the producer SDK, in one run, on one pipeline.

One broker, one simulated provider (no added latency), one decider, one worker, one gateway. Three
phases of N requests each, at most C in flight: SDK, gateway, SDK again (the two SDK phases bracket
the gateway's, so drift of a shared machine shows as their difference). Each request is the same
low-risk public chat question under its own request id, all answered. Per phase: requests per
second from the first send to the last answer, latency send -> answer (p50, p99), and CPU per
request of every process (the gateway's own is what HTTP adds; the bench process is the load
generator). The ratios gateway / SDK use the mean of the two SDK phases.

``python -m bench.gateway [--requests N] [--concurrency C]``; results in bench/results/gateway.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from bench._harness import CpuMeter, broker, git_commit, loadavg, own_cpu_s, run_main, table
from nexuscore._demo import decider_args
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore.client import NexusClient, RequestSpec
from nexuscore.gateway import KeyDefaults, add_key
from nexuscore.kernel.errors import NexusError
from nexuscore.policy import DEFAULT_POLICY_PATH
from nexuscore.transport import Topics, ensure_topics

PROMPT = "What is the balance on my account, and when was the last transfer made?"
SPEC = RequestSpec(
    tenant_id="acme-bank", feature="support-chat", task_type="chat", risk_class="low",
    data_classification="public", prompt=PROMPT, max_output_tokens=64,
)  # fmt: skip
TIMEOUT_S = 120.0


class Stack:
    """The pipeline and the gateway as child processes, and how to reach them."""

    def __init__(self, services: Services, bootstrap: str, topics: Topics, workdir: Path) -> None:
        keys = dev_keys(workdir / "keys", DEFAULT_POLICY_PATH)
        key_file = workdir / "gateway-keys.json"
        _, self.secret = add_key(
            key_file, "acme-bank", KeyDefaults(feature="support-chat"), datetime.now(UTC)
        )
        provider = services.start("provider", "run", "provider", "--port", "0")
        url = provider.wait_for_line("simulated provider listening on", 30)
        common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
        services.start("decider", *decider_args(common, keys))
        services.start("worker", "run", "worker", *common, "--simulated-url", url)
        gateway = services.start(
            "gateway",
            "run",
            "gateway",
            *common,
            "--keys",
            str(key_file),
            "--port",
            "0",
            "--timeout",
            str(TIMEOUT_S),
        )
        self.url = gateway.wait_for_line("gateway listening on", 60)
        self.pids = {s.name: s.proc.pid for s in services.started}


async def load(n: int, concurrency: int, one: Callable[[int], Awaitable[str]]) -> dict[str, Any]:
    """``n`` calls of ``one``, at most ``concurrency`` at a time: latencies and statuses."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    statuses: dict[str, int] = {}

    async def call(i: int) -> None:
        async with gate:
            t0 = time.perf_counter()
            status = await one(i)
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(call(i) for i in range(n)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "throughput_rps": round(n / wall, 1),
        "latency_ms": {"p50": round(q[49] * 1000, 1), "p99": round(q[98] * 1000, 1)},
        "statuses": statuses,
    }


async def measured(
    stack: Stack, n: int, concurrency: int, one: Callable[[int], Awaitable[str]]
) -> dict[str, Any]:
    meter = CpuMeter(stack.pids)
    own0 = own_cpu_s()
    meter.start()
    out = await load(n, concurrency, one)
    meter.stop()
    cpu = meter.result()["processes"]
    per = {name: (round(v["cpu_s"] * 1000 / n, 3) if v else None) for name, v in cpu.items()}
    per["load generator (bench)"] = round((own_cpu_s() - own0) * 1000 / n, 3)
    return {**out, "cpu_ms_per_request": per}


async def phases(stack: Stack, bootstrap: str, topics: Topics, n: int, concurrency: int) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    async with (
        NexusClient(bootstrap, namespace=topics.namespace, lookback_s=0) as nexus,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {stack.secret}"}) as http,
    ):

        def sdk(tag: str) -> Callable[[int], Awaitable[str]]:
            async def one(i: int) -> str:
                r = await nexus.submit(SPEC, request_id=f"{run}-{tag}-{i}", timeout_s=TIMEOUT_S)
                return r.status

            return one

        def gateway(tag: str) -> Callable[[int], Awaitable[str]]:
            body = {"model": "nexuscore", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 64,
                    "metadata": {"risk_class": "low", "data_classification": "public"}}  # fmt: skip

            async def one(i: int) -> str:
                headers = {"X-Nexus-Request-Id": f"{run}-{tag}-{i}"}
                async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as resp:
                    await resp.read()
                    return str(resp.status)

            return one

        # Warm both paths (connections, the decider's first batches, caches) before measuring.
        await load(min(50, n), concurrency, sdk("warm"))
        await load(min(50, n), concurrency, gateway("warm"))
        return {
            "sdk": await measured(stack, n, concurrency, sdk("a")),
            "gateway": await measured(stack, n, concurrency, gateway("b")),
            "sdk_again": await measured(stack, n, concurrency, sdk("c")),
        }


def ratios(r: dict[str, Any]) -> dict[str, Any]:
    sdk = [r["sdk"], r["sdk_again"]]
    gw = r["gateway"]
    rps = statistics.mean(p["throughput_rps"] for p in sdk)
    p50 = statistics.mean(p["latency_ms"]["p50"] for p in sdk)
    p99 = statistics.mean(p["latency_ms"]["p99"] for p in sdk)
    return {
        "throughput_gateway_over_sdk": round(gw["throughput_rps"] / rps, 3),
        "added_latency_p50_ms": round(gw["latency_ms"]["p50"] - p50, 1),
        "added_latency_p99_ms": round(gw["latency_ms"]["p99"] - p99, 1),
        "gateway_cpu_ms_per_request": gw["cpu_ms_per_request"]["gateway"],
        "sdk_phases_throughput_spread": round(
            abs(sdk[0]["throughput_rps"] - sdk[1]["throughput_rps"]) / rps, 3
        ),
    }


def measure(n: int, concurrency: int) -> dict[str, Any]:
    topics = Topics(f"bench-gw-{uuid.uuid4().hex[:8]}.")
    with broker(topics.namespace) as (bootstrap, _), tempfile.TemporaryDirectory() as tmp:
        asyncio.run(ensure_topics(bootstrap, topics))
        with Services(Path(tmp) / "logs") as services:
            stack = Stack(services, bootstrap, topics, Path(tmp))
            try:
                results = asyncio.run(phases(stack, bootstrap, topics, n, concurrency))
            except NexusError:
                services.check()  # a stage that died says so first
                raise
    return {
        "benchmark": "gateway",
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "loadavg": loadavg(),
        "params": {"requests": n, "concurrency": concurrency},
        "phases": results,
        "ratios": ratios(results),
    }


def render(r: dict[str, Any]) -> str:
    names = ("sdk", "gateway", "sdk_again")
    ph = r["phases"]
    procs = list(ph["sdk"]["cpu_ms_per_request"])
    lines = [
        "# Gateway benchmark: HTTP (OpenAI-compatible) beside the SDK straight to Kafka",
        "",
        f"`python -m bench.gateway --requests {r['params']['requests']} --concurrency {r['params']['concurrency']}`"
        f" at {r['at']}, commit `{r['commit']}`, load average {r['loadavg']}.",
        "",
        *table(
            ["phase", "requests/s", "p50 ms", "p99 ms", "statuses"],
            [
                [
                    n,
                    ph[n]["throughput_rps"],
                    ph[n]["latency_ms"]["p50"],
                    ph[n]["latency_ms"]["p99"],
                    ph[n]["statuses"],
                ]
                for n in names
            ],
        ),
        "",
        "CPU per request (ms), by process:",
        "",
        *table(["process", *names], [[p, *(ph[n]["cpu_ms_per_request"][p] for n in names)] for p in procs]),
        "",
        "Ratios (gateway against the mean of the two SDK phases):",
        "",
        *table(["figure", "value"], [[k, v] for k, v in r["ratios"].items()]),
        "",
    ]
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> None:
    print(render(r))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="requests per phase")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight at most")
    args = parser.parse_args()
    return run_main("gateway", lambda: measure(args.requests, args.concurrency), render, summary)


if __name__ == "__main__":
    raise SystemExit(main())
