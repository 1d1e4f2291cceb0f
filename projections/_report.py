"""One self-contained HTML report (inline SVG, no scripts, no network) for people who would rather
look than read: spend over time, tier mix, decisions per policy version, and the headline checks."""

from __future__ import annotations

import html
from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from nexuscore.projections._store import EvidenceStore

_COLOURS = ("#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#4d7c0f", "#be185d")
_W, _H, _PAD = 720, 260, 48


def _esc(value: object) -> str:
    return html.escape(str(value))


def _line_chart(series: dict[str, list[tuple[str, float]]], unit: str) -> str:
    xs = sorted({x for points in series.values() for x, _ in points})
    if not xs:
        return "<p>No data.</p>"
    top = max((y for points in series.values() for _, y in points), default=0) or 1
    step = (_W - 2 * _PAD) / max(len(xs) - 1, 1)
    out = [f'<svg viewBox="0 0 {_W} {_H}" width="{_W}" height="{_H}" role="img">']
    out.append(f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#999"/>')
    out.append(f'<text x="4" y="{_PAD - 8}" font-size="11">{top:,.4f} {unit}</text>')
    for i, x in enumerate(xs):
        if len(xs) <= 12 or i % max(len(xs) // 12, 1) == 0:
            out.append(
                f'<text x="{_PAD + i * step:.1f}" y="{_H - _PAD + 16}" font-size="10">{_esc(x)}</text>'
            )
    for n, (name, points) in enumerate(sorted(series.items())):
        colour = _COLOURS[n % len(_COLOURS)]
        coords = " ".join(
            f"{_PAD + xs.index(x) * step:.1f},{_H - _PAD - (y / top) * (_H - 2 * _PAD):.1f}"
            for x, y in sorted(points)
        )
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>')
        out.append(
            f'<text x="{_W - _PAD + 4}" y="{_PAD + 14 * n}" font-size="11" fill="{colour}">{_esc(name)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _stacked_bars(groups: dict[str, dict[str, int]], order: list[str]) -> str:
    if not groups:
        return "<p>No data.</p>"
    bar_h, gap = 22, 10
    height = len(groups) * (bar_h + gap) + 40
    width = _W - 200
    out = [f'<svg viewBox="0 0 {_W} {height}" width="{_W}" height="{height}" role="img">']
    for i, (name, counts) in enumerate(sorted(groups.items())):
        total = sum(counts.values()) or 1
        y, x = i * (bar_h + gap), 160.0
        out.append(f'<text x="0" y="{y + 15}" font-size="12">{_esc(name)}</text>')
        for n, key in enumerate(order):
            share = counts.get(key, 0) / total
            if share:
                w = share * width
                colour = _COLOURS[n % len(_COLOURS)]
                out.append(
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                    f"<title>{_esc(key)}: {counts[key]:,} ({share:.0%})</title></rect>"
                )
                x += w
    for n, key in enumerate(order):
        colour = _COLOURS[n % len(_COLOURS)]
        out.append(
            f'<text x="{160 + n * 110}" y="{height - 8}" font-size="11" fill="{colour}">&#9632; {_esc(key)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{_esc(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(store: EvidenceStore, generated_at: datetime, verified: str) -> str:
    spend: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for r in store.query(
        "SELECT tenant_id, CAST(CAST(occurred_at AS DATE) AS VARCHAR) AS day, sum(cost_micros) / 1e6 AS usd "
        "FROM outcomes GROUP BY ALL ORDER BY day"
    ).to_pylist():
        spend[r["tenant_id"]].append((r["day"], float(r["usd"])))
    tiers: dict[str, dict[str, int]] = defaultdict(dict)
    for r in store.query(
        "SELECT tenant_id, CASE WHEN verdict = 'dispatch' THEN tier ELSE verdict END AS tier, count(*) AS n "
        "FROM decisions GROUP BY ALL"
    ).to_pylist():
        tiers[r["tenant_id"]][r["tier"]] = r["n"]
    per_policy: dict[str, dict[str, int]] = defaultdict(dict)
    for r in store.query(
        "SELECT policy_version || ' ' || left(policy_digest, 19) AS policy, verdict, count(*) AS n "
        "FROM decisions GROUP BY ALL"
    ).to_pylist():
        per_policy[r["policy"]][r["verdict"]] = r["n"]
    summary = store.terminal_summary()
    findings = Counter(store.residency().column("finding").to_pylist())
    residency = [{"finding": k, "calls": v} for k, v in sorted(findings.items())]
    escalations = store.query(
        "SELECT review_state, count(*) AS requests FROM escalations GROUP BY 1 ORDER BY 1"
    ).to_pylist()
    who = store.who_routed_what().to_pylist()
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>NexusCore evidence report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #111; max-width: 1000px; }}
table {{ border-collapse: collapse; font-size: 12px; margin-bottom: 1rem; }}
td, th {{ border: 1px solid #ddd; padding: 3px 6px; text-align: left; }}
h2 {{ margin-top: 2rem; }} .ok {{ color: #15803d; }} .bad {{ color: #b91c1c; }}
</style></head><body>
<h1>NexusCore evidence report</h1>
<p>Evidence at {_esc(store.root)}; generated {_esc(generated_at.isoformat(timespec="seconds"))}.</p>
<p>{_esc(verified)}</p>
<p>{summary["requests"]:,} requests; {summary["terminal"]:,} with a terminal state;
{summary["multiple_terminal"]:,} with more than one; {summary["deadletters"]:,} dead letters.</p>
<h2>Spend over time (USD per day, by tenant)</h2>{_line_chart(spend, "USD")}
<h2>Tier mix (decisions by tenant)</h2>{_stacked_bars(tiers, ["small", "mid", "frontier", "escalated", "denied"])}
<h2>Decisions per policy version</h2>{_stacked_bars(per_policy, ["dispatch", "escalated", "denied"])}
<h2>Residency</h2>
<p>Calls outside their allowed regions must be none; cross-border calls are listed with their basis.</p>
{_table(residency)}
<h2>Escalations</h2>{_table(escalations)}
<h2>Who routed what</h2>{_table(who)}
</body></html>
"""
