"""Replay as an operator runs it: recorded history (from the evidence, or from the topics afresh)
under a candidate or under the recorded policies whose signatures hold; the report, the file that
promotion takes, and the rule that fails a replay."""

from __future__ import annotations

import asyncio
import json
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa

from nexuscore.kernel.errors import NexusError
from nexuscore.policy import (
    DEFAULT_POLICY_PATH,
    PolicySignature,
    RoutingPolicy,
    TrustStore,
    check_signatures,
    load_policy,
    parse_policy,
    replay_report_digest,
)
from nexuscore.projections import EvidenceStore
from nexuscore.replay import ReplayReport, project_log, render_replay_html, replay
from nexuscore.transport import Topics

Progress = Callable[[int, int], None]
CHANGE_COLUMNS = ("request_id", "tenant_id", "fields", "recorded", "candidate")
# How many changed decisions a report keeps when no one asked for all of them, and how many the
# HTML page lists.
KEPT_CHANGES = 1000
HTML_CHANGES = 500


def recorded_policies(evidence_dir: Path, trust: TrustStore) -> tuple[dict[str, RoutingPolicy], list[str]]:
    """Every policy the governance events in the evidence carry whose signatures hold (digest ->
    policy), and why each of the others was skipped."""
    with EvidenceStore(evidence_dir) as store:
        # Checked as of their promotion: a signature that has expired since still proves who approved.
        rows = store.query(
            "SELECT policy_digest, document, signatures, min(occurred_at) AS at FROM policy_events GROUP BY ALL"
        ).to_pylist()
    found: dict[str, RoutingPolicy] = {}
    skipped: list[str] = []
    for r in rows:
        try:
            p = parse_policy(r["document"], f"policy {r['policy_digest'][:19]}…")
            sigs = msgspec.json.decode(r["signatures"] or "{}", type=dict[str, list[PolicySignature]])
            check_signatures(p, r["document"].encode(), sigs.get("signatures", []), trust, r["at"])
        except NexusError as exc:
            skipped.append(str(exc))
            continue
        found[p.digest] = p
    return found, skipped


@contextmanager
def log_snapshot(
    bootstrap: str,
    namespace: str,
    trust: TrustStore,
    policy: RoutingPolicy | None = None,
    progress: Progress | None = None,
) -> Iterator[Path]:
    """What the topics hold now, projected afresh from offset 0 into a scratch evidence folder (gone
    on exit); tenants' regions from ``policy`` (default: the bundled one)."""
    regions = {t.id: t.home_region for t in (policy or load_policy(DEFAULT_POLICY_PATH)).tenants}
    with tempfile.TemporaryDirectory(prefix="nexuscore-replay-") as scratch:
        root = Path(scratch)
        asyncio.run(project_log(bootstrap, Topics(namespace), root, regions, progress, trust))
        yield root


def replay_history(
    evidence_dir: Path,
    candidate: RoutingPolicy | None,
    recorded: Mapping[str, RoutingPolicy] | None = None,
    *,
    tenant: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    keep_all_changes: bool = False,
    progress: Progress | None = None,
) -> ReplayReport:
    """Re-decide the recorded requests under ``candidate``, or under ``recorded`` (verify mode)."""
    if (candidate is None) == (recorded is None):
        raise NexusError("pass --policy CANDIDATE, or --recorded to verify against the recorded policies")
    with EvidenceStore(evidence_dir) as store:
        return replay(
            store,
            candidate,
            recorded_policies=recorded,
            tenant=tenant,
            since=since,
            until=until,
            progress=progress,
            keep_changes=10**9 if keep_all_changes else KEPT_CHANGES,
        )


def summary_lines(r: ReplayReport) -> list[str]:
    """The replay's findings, one line each: what the CLI prints and the HTML page opens with."""
    return [
        f"policy {r.policy_version} ({r.policy_digest})",
        f"requests replayed:     {r.requests}",
        f"decisions changed:     {r.changed}  (verdict {r.verdict_changes}, deployment {r.deployment_changes}, tier {r.tier_changes}, decode {r.decode_changes})",
        f"same decision, other context: {r.context_differences}",
        f"budget denials:        {r.recorded_budget_denials} -> {r.candidate_budget_denials}",
        f"escalations:           {r.recorded_escalations} -> {r.candidate_escalations}",
        f"residency changes:     {r.residency_changes} (allowed regions differ); breaches {r.residency_breaches}",
        f"estimated cost delta:  {r.estimated_delta_micros / 1e6:+.6f} USD  ({r.recorded_estimated_micros / 1e6:.6f} -> {r.candidate_estimated_micros / 1e6:.6f})",
        f"actual cost delta:     {r.actual_delta_micros / 1e6:+.6f} USD  (recorded usage repriced)",
    ]


def change_rows(report: ReplayReport, limit: int | None = None) -> list[dict[str, str]]:
    """The first ``limit`` (default: every kept) changed decisions, one row each, values as JSON."""
    return [
        {
            "request_id": c.request_id,
            "tenant_id": c.tenant_id,
            "fields": ", ".join(c.fields),
            "recorded": json.dumps(c.recorded),
            "candidate": json.dumps(c.candidate),
        }
        for c in report.changes[:limit]
    ]


def changes_table(report: ReplayReport, limit: int | None = None) -> pa.Table:
    """``change_rows`` as a table (what ``--diff-out`` writes as Parquet)."""
    schema = pa.schema([(n, pa.string()) for n in CHANGE_COLUMNS])
    return pa.Table.from_pylist(change_rows(report, limit), schema=schema)


def report_document(report: ReplayReport, scope: Mapping[str, Any]) -> bytes:
    """The replay report file (JSON) that ``policy promote --replay-report`` takes: the summary and
    the ``scope`` replayed (evidence, tenant, since, until)."""
    return json.dumps({**report.summary(), **scope}, indent=2, sort_keys=True).encode()


def write_replay_report(path: Path, report: ReplayReport, scope: Mapping[str, Any]) -> str:
    """Write the report file to ``path``; return its digest (what a promotion step records)."""
    data = report_document(report, scope)
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}") from exc
    return replay_report_digest(data)


def write_replay_html(path: Path, report: ReplayReport) -> None:
    """A self-contained HTML page of the replay: the summary and the first changed decisions."""
    page = render_replay_html(report, summary_lines(report), change_rows(report, HTML_CHANGES))
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as exc:
        raise NexusError(f"cannot write {path}: {exc.strerror}") from exc


def replay_failure(report: ReplayReport, *, verify_mode: bool) -> str | None:
    """Why this replay fails (exit 1), or None: a candidate that sends any request outside its allowed
    regions; in verify mode, any recorded decision not reproduced exactly."""
    if report.residency_breaches:
        return f"the candidate sends {report.residency_breaches} request(s) outside their allowed regions"
    mismatches = report.changed + report.context_differences
    if verify_mode and mismatches:
        return (
            f"{mismatches} recorded decision(s) not reproduced "
            f"({report.unknown_policies} under a policy not in the evidence)"
        )
    return None
