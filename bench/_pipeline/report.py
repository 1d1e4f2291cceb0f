"""The pipeline benchmark's results as markdown (``bench/results/pipeline.md``) and on the console."""

from __future__ import annotations

from typing import Any

from bench._harness import fmt, met, table
from bench._pipeline.params import (
    GOAL_P50_MS,
    GOAL_P99_MS,
    GOAL_RPS,
    LATE_MS,
    TARGET_P50_MS,
    TARGET_P99_MS,
    TARGET_RPS,
    TARGET_RSS_MB,
)
from bench._profile import profile_lines


def headline(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(metric, target, measured, met) rows shared by the console summary and the markdown."""
    tp, lat = results.get("throughput"), results.get("latency")
    rows: list[tuple[str, str, str, str]] = []
    rps = tp["requests_per_s"] if tp else None
    rows.append(
        (
            "End-to-end throughput (requests/s)",
            f"≥ {TARGET_RPS:,.0f} (goal {GOAL_RPS:,.0f})",
            fmt(rps),
            met(None if rps is None else rps >= TARGET_RPS),
        )
    )
    ev = lat["added_ms"] if lat else {}
    rate = f"{results['parameters']['rate']:g}"
    for name, target, goal in (("p50", TARGET_P50_MS, GOAL_P50_MS), ("p99", TARGET_P99_MS, GOAL_P99_MS)):
        value = ev.get(f"{name}_ms")
        rows.append(
            (
                f"Added latency {name} at {rate} req/s offered, sent -> dispatch produced (ms)",
                f"≤ {target:g} (goal {goal:g})",
                fmt(value, ".2f"),
                met(None if value is None else value <= target),
            )
        )
    if lat:
        kept = lat.get("decider_kept_up")
        rows.append(
            (
                "Decider kept up with the offered rate",
                "≥ 99 %",
                f"{lat['decider_dispatches_per_s']} / {lat['offered_dispatches_per_s']} dispatches/s",
                met(kept),
            )
        )
    rows += _observed_and_sustained(results)
    peaks = results.get("memory", {}).get("pipeline_peak_rss_mb", {})
    worst = max(((v, k) for k, v in peaks.items() if v is not None), default=None)
    rows.append(
        (
            "Peak RSS per pipeline process (MB)",
            f"< {TARGET_RSS_MB:g}",
            "n/a" if worst is None else f"{worst[0]:.0f} ({worst[1]})",
            met(None if worst is None else worst[0] < TARGET_RSS_MB),
        )
    )
    return rows


def _observed_and_sustained(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    obs, sus = results.get("observed"), results.get("sustained")
    if obs:
        o = obs["published_to_terminal_state_ms"]
        rows.append(
            (
                f"Producer-observed latency at {obs['offered_per_s']:g} req/s, sent -> answer read (ms)",
                "p50 / p99 reported",
                f"{fmt(o.get('p50_ms'), '.1f')} / {fmt(o.get('p99_ms'), '.1f')}",
                "n/a",
            )
        )
    if sus:
        end = sus["backlog_at_end"] or {}
        rows.append(
            (
                f"Sustained {sus['offered_per_s']:g} req/s for {sus['seconds']:g} s: backlog at the end "
                "(decider / workers)",
                "flat",
                f"{end.get('decider_backlog')} / {end.get('worker_backlog')}",
                met(sus["flat"]),
            )
        )
    return rows


def _latency_context(lat: dict[str, Any]) -> list[tuple[str, Any]]:
    ev, rec, first = (lat["added_ms"], lat["decider_ms"], lat["added_ms_first_second"])
    return [
        ("Latency run: achieved send rate (requests/s)", lat["pacing"]["achieved_per_s"]),
        ("Added latency p90 / max (ms)", f"{ev.get('p90_ms')} / {ev.get('max_ms')}"),
        (
            "Decider's part (request appended -> dispatch produced) p50 / p99 (ms)",
            f"{rec.get('p50_ms')} / {rec.get('p99_ms')}",
        ),
        ("Dispatches measured", ev.get("count")),
        (
            "Dispatched after a person's review (not measured: the wait is the review's), count; wait p50 / p99 (ms)",
            _review_wait(lat),
        ),
        (
            "Decider dispatches/s vs offered dispatches/s",
            f"{lat['decider_dispatches_per_s']} / {lat['offered_dispatches_per_s']}",
        ),
        (
            "Added latency, requests of the first second only, p50 / p99 (ms)",
            f"{first.get('p50_ms')} / {first.get('p99_ms')}",
        ),
    ]


def _review_wait(lat: dict[str, Any]) -> str:
    wait = lat.get("review_wait_ms")
    if wait is None:
        return "not separated in this run"
    return f"{lat.get('dispatched_after_review', 0)}; {wait.get('p50_ms')} / {wait.get('p99_ms')}"


def _context_lines(results: dict[str, Any]) -> list[str]:
    """The baseline beside the pipeline, the latency run's details, the broker's memory."""
    b, tp, lat = results["baseline"], results["throughput"], results.get("latency")
    rows: list[tuple[str, Any]] = [
        ("Baseline (plain aiokafka, same messages) produced msgs/s", f"{b['produced_msgs_per_s']:,.0f}"),
        ("Baseline end-to-end msgs/s", f"{b['end_to_end_msgs_per_s']:,.0f}"),
        ("Pipeline / baseline end to end", f"{results['ratio_to_baseline']:.3f}"),
        ("Pipeline end to end, as polled (requests/s)", f"{tp['requests_per_s_polled']:,.0f}"),
    ]
    if lat:
        rows += _latency_context(lat)
    broker_rss = results.get("memory", {}).get("broker_peak_rss_mb")
    if broker_rss is not None:
        rows.append(("Broker JVM peak RSS (MB)", f"{broker_rss:.0f}"))
    lines = [*table(("Context", "Value"), rows), ""]
    if lat and lat.get("decider_kept_up") is False:
        lines += [
            "The decider fell behind the offered load in the latency run, so its latency figures are "
            "mostly queueing delay, not the gateway's own cost.",
            "",
        ]
    return lines


def _topic_lines(topics: dict[str, Any]) -> list[str]:
    return [
        "Written during the throughput run (messages, MB in the broker's log segments):",
        "",
        *table(
            ("Topic", "Messages", "MB", "Bytes/message"),
            (
                (name, f"{t['messages']:,}", fmt(t["mb"], ".1f"), fmt(t["bytes_per_message"], ",.0f"))
                for name, t in topics.items()
            ),
        ),
        "",
    ]


def _cpu_lines(title: str, per_request: dict[str, Any]) -> list[str]:
    rows = [(name, fmt(v, ".3f")) for name, v in per_request.items()]
    return [title, "", *table(("Process", "CPU ms per request"), rows), ""]


def _latency_cpu_lines(lat: dict[str, Any] | None) -> list[str]:
    """Where the latency run's time went: each process's CPU per request and share of a core, and
    how long its threads were runnable but waiting for a CPU (a starved stage queues its input)."""
    if not lat or "cpu_during_sends" not in lat:
        return []
    cpu = lat["cpu_during_sends"]
    rows = [
        (
            name,
            fmt(lat.get("cpu_ms_per_request_during_sends", {}).get(name), ".3f"),
            fmt(v and v["cpu_pct"], ".1f"),
            fmt(v and v.get("waited_for_cpu_pct"), ".1f"),
        )
        for name, v in cpu["processes"].items()
    ]
    return [
        f"CPU during the latency run's {cpu['wall_s']:g} s of sends, by process (own counters; "
        f"{cpu['total_cpu_s']:g} CPU s in all, {100 * cpu['total_cpu_s'] / max(cpu['wall_s'], 1e-9):.0f} % "
        "of one core):",
        "",
        *table(("Process", "CPU ms per request", "% of a core", "waited for a CPU, % of wall"), rows),
        "",
    ]


def _sustained_lines(sus: dict[str, Any] | None) -> list[str]:
    if not sus:
        return []
    samples = [
        (f"{s['at_s']:g}", f"{s['decider_backlog']:,}", f"{s['worker_backlog']:,}") for s in sus["backlog"]
    ]
    return [
        f"Sustained run: {sus['offered_per_s']:g} requests/s offered for {sus['seconds']:g} s "
        f"(achieved {sus['pacing']['achieved_per_s']}/s); backlog = messages not yet committed by the "
        f"stage's consumer group:",
        "",
        *table(("s", "decider backlog", "workers backlog"), samples),
        "",
        *_cpu_lines(
            "CPU per request during the sustained run, by process (its own counters):",
            sus["cpu_ms_per_request"],
        ),
    ]


def _gateway_lines(gw: dict[str, Any] | None) -> list[str]:
    if not gw:
        return []
    rows = [
        (
            name,
            fmt(p["throughput_rps"], ",.1f"),
            fmt(p["latency_ms"]["p50"], ".1f"),
            fmt(p["latency_ms"]["p99"], ".1f"),
        )
        for name, p in gw["phases"].items()
    ]
    ratios = gw["ratios"]
    return [
        f"Gateway phase (`bench.gateway`, {gw['params']['requests']} requests per phase, "
        f"{gw['params']['concurrency']} in flight, its own broker): the OpenAI-compatible HTTP gateway beside "
        "the SDK straight to Kafka:",
        "",
        *table(("phase", "requests/s", "p50 ms", "p99 ms"), rows),
        "",
        f"Gateway / SDK throughput {ratios['throughput_gateway_over_sdk']}; added p50 {ratios['added_latency_p50_ms']} ms, "
        f"p99 {ratios['added_latency_p99_ms']} ms; gateway CPU {ratios['gateway_cpu_ms_per_request']} ms per request.",
        "",
    ]


def render_markdown(results: dict[str, Any]) -> str:
    p, m = results["parameters"], results["machine"]
    lines = [
        "# Pipeline benchmark",
        "",
        f"`{results['command']}` at {results['timestamp_utc']}, commit `{results['git_commit']}`; "
        f"{m['nproc']} cores, Python {m['python']}, Kafka {m['kafka_version']} ({m['broker']}); "
        f"N={p['requests']}, R={p['rate']:g}/s, S={p['duration']:g} s, warm-up {p['warmup']}, "
        f"{p.get('workers', 1)} worker process(es). "
        f"Load average at start {m['loadavg_start']}, at end {m.get('loadavg_end')}.",
        "",
        *table(("Metric", "Target", "Measured", "Met"), headline(results)),
        "",
    ]
    tp = results.get("throughput")
    if results.get("baseline") and tp:
        lines += _context_lines(results)
    if tp and tp.get("cpu_ms_per_request"):
        lines += _cpu_lines(
            "CPU per request during the throughput run, by process (its own counters; the stages are "
            "where the next gain is):",
            tp["cpu_ms_per_request"],
        )
    if tp and tp.get("topics"):
        lines += _topic_lines(tp["topics"])
        lines += [
            f"Per request: {tp['messages_per_request']} Kafka messages, {tp['kb_per_request']} KB on the broker "
            "(every topic of the namespace, warm-up included in the count).",
            "",
        ]
    prof = (tp or {}).get("profile", {})
    if prof.get("top_own"):
        title = (
            f"The {prof['stage']}'s profile during the throughput run (py-spy, {prof['samples']} samples at "
            f"{prof['rate_hz']} Hz), top functions by own time:"
        )
        lines += profile_lines(prof, title)
    elif prof.get("skipped"):
        lines += [f"Profile skipped: {prof['skipped']}", ""]
    lines += _latency_cpu_lines(results.get("latency"))
    lines += _sustained_lines(results.get("sustained"))
    lines += _gateway_lines(results.get("gateway"))
    lines += ["All figures: `bench/results/pipeline.json`.", ""]
    return "\n".join(lines)


def _print_throughput(results: dict[str, Any]) -> None:
    tp = results["throughput"]
    print(
        f"  pipeline: {tp['requests']} requests in {tp['end_to_end_s']:.2f} s = {tp['requests_per_s']:,.0f}/s "
        f"(polled {tp['requests_per_s_polled']:,.0f}/s); {fmt(results.get('ratio_to_baseline'), '.3f')} of the baseline; "
        f"evidence {tp['evidence_summary']}, {tp['evidence_files']} Parquet files "
        f"(one terminal_summary() over them: {tp['evidence_check_s']} s)"
    )
    print("  topics of the throughput namespace (messages, MB on the broker, bytes/message):")
    for name, t in tp["topics"].items():
        print(
            f"    {name:<44} {t['messages']:>8} {fmt(t['mb'], '>9.1f')} MB {fmt(t['bytes_per_message'], '>8,.0f')} B"
        )
    print("  CPU during the throughput run (s, % of one core):")
    for name, v in tp["cpu"]["processes"].items():
        shown = "gone" if v is None else f"{v['cpu_s']:>7.1f} s {v['cpu_pct']:>6.1f} %"
        print(f"    {name:<34} {shown}")


def _print_latency(lat: dict[str, Any]) -> None:
    ev, rec, pace = lat["added_ms"], lat["decider_ms"], lat["pacing"]
    print(
        f"  latency: offered {pace['offered_per_s']:g}/s, achieved {pace['achieved_per_s']}/s "
        f"({pace['late_sends']} sends > {LATE_MS:g} ms late, worst {pace['worst_lag_ms']} ms); "
        f"{lat['dispatched']} dispatches"
    )
    if lat.get("decider_kept_up") is False:
        print(
            f"    the decider fell behind: {lat['decider_dispatches_per_s']} dispatches/s against "
            f"{lat['offered_dispatches_per_s']}/s offered, so these figures are mostly queueing delay"
        )
    cpu = lat.get("cpu_during_sends", {}).get("processes", {})
    print(
        "    CPU during the sends (% of a core / waited for a CPU, % of wall): "
        + ", ".join(
            f"{name} {v['cpu_pct']}/{v.get('waited_for_cpu_pct')}" for name, v in cpu.items() if v is not None
        )
    )
    for label, s in (
        ("sent -> dispatched", ev),
        ("decider alone", rec),
        ("first second", lat["added_ms_first_second"]),
    ):
        print(
            f"    added ({label}): p50 {s.get('p50_ms')} p90 {s.get('p90_ms')} p99 {s.get('p99_ms')} "
            f"max {s.get('max_ms')} ms (n={s.get('count')})"
        )


def _print_profile(prof: dict[str, Any]) -> None:
    if prof.get("top_own"):
        print(f"  {prof['stage']} profile ({prof['samples']} samples), top by own time:")
        for f in prof["top_own"]:
            print(
                f"    {f['own_pct']:>5.1f}% own {f['inclusive_pct']:>5.1f}% incl  {f['function']}  ({f['where']})"
            )
        print(
            "    by package: " + ", ".join(f"{x['package']} {x['own_pct']}%" for x in prof["own_by_package"])
        )
    elif prof.get("skipped"):
        print(f"  profile skipped: {prof['skipped']}")


def print_summary(results: dict[str, Any]) -> None:
    print("\n=== NexusCore pipeline benchmark ===")
    for metric, target, measured, ok in headline(results):
        print(f"  {metric:<48} {measured:>18}   target {target:<8} met: {ok.strip('*')}")
    b, tp, lat = results.get("baseline"), results.get("throughput"), results.get("latency")
    if b:
        print(
            f"\n  baseline: {b['messages']} msgs of {b['message_bytes_mean']:.0f} B mean: produced {b['produced_msgs_per_s']:,.0f}/s, "
            f"end to end {b['end_to_end_msgs_per_s']:,.0f}/s ({b['end_to_end_mb_per_s']} MB/s)"
        )
    if tp:
        _print_throughput(results)
    if lat:
        _print_latency(lat)
    mem = results.get("memory", {})
    if mem:
        print(
            "  peak RSS (MB): "
            + ", ".join(f"{k} {fmt(v, '.0f')}" for k, v in mem.get("pipeline_peak_rss_mb", {}).items())
            + f"; broker {fmt(mem.get('broker_peak_rss_mb'), '.0f')}; bench {fmt(mem.get('bench_peak_rss_mb'), '.0f')}"
        )
    _print_profile((tp or {}).get("profile", {}))
