"""The replay report as one self-contained HTML page (no scripts, no network)."""

from __future__ import annotations

import html
from typing import Any

from nexuscore.replay._replay import ReplayReport


def render_replay_html(report: ReplayReport, lines: list[str], rows: list[dict[str, Any]]) -> str:
    def esc(v: object) -> str:
        return html.escape(str(v))

    counts = [
        ("verdict", report.verdict_changes),
        ("deployment", report.deployment_changes),
        ("tier", report.tier_changes),
        ("decode", report.decode_changes),
        ("residency", report.residency_changes),
    ]
    top = max([c for _, c in counts] + [1])
    bars = "".join(
        f'<rect x="110" y="{i * 26}" width="{500 * c / top:.1f}" height="20" fill="#2563eb"/>'
        f'<text x="0" y="{i * 26 + 15}" font-size="12">{esc(name)}</text>'
        f'<text x="{115 + 500 * c / top:.1f}" y="{i * 26 + 15}" font-size="12">{c:,}</text>'
        for i, (name, c) in enumerate(counts)
    )
    verdict = (
        '<p style="color:#b91c1c"><b>FAILS: sends requests outside their allowed regions.</b></p>'
        if report.residency_breaches
        else '<p style="color:#15803d">No request would leave its allowed regions.</p>'
    )
    head = "".join(f"<th>{esc(k)}</th>" for k in (rows[0] if rows else {}))
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Replay of {esc(report.policy_version)}</title>
<style>body {{ font-family: system-ui, sans-serif; margin: 2rem; max-width: 1100px; }}
table {{ border-collapse: collapse; font-size: 12px; }} td, th {{ border: 1px solid #ddd; padding: 3px 6px; }}
pre {{ background: #f6f6f6; padding: 1rem; }}</style></head><body>
<h1>Replay of policy {esc(report.policy_version)}</h1>
<p>{esc(report.policy_digest)}</p>{verdict}
<pre>{esc(chr(10).join(lines))}</pre>
<h2>Changed decisions by kind</h2>
<svg viewBox="0 0 720 {len(counts) * 26}" width="720" height="{len(counts) * 26}" role="img">{bars}</svg>
<h2>Changed decisions (first {len(rows)})</h2>
<table><tr>{head}</tr>{body}</table>
</body></html>
"""
