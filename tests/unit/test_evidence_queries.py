"""The canned reports give the same answers on a compacted store, and the residency summary is the
residency audit counted."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from nexuscore import services
from nexuscore.projections import EvidenceStore, compact
from nexuscore.schemas import InferenceRequested
from tests.factories import POLICY, T0, project, run_history, signing_key


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    base = tmp_path_factory.mktemp("queries")
    history = run_history(POLICY, 60, seed=17)
    plain = base / "plain"
    project(plain, history, flush_every=30)
    compacted = base / "compacted"
    shutil.copytree(plain, compacted)
    assert compact(compacted, signing_key(), T0, file_rows=1_000).replaced > 0
    requests = [e.request_id for e in history if isinstance(e, InferenceRequested)]
    return plain, compacted, requests[:: max(len(requests) // 8, 1)]


def _rows(table: pa.Table) -> list[str]:
    """A report's rows as a multiset: its ORDER BY leaves ties (equal counts, equal times) in any
    order, so the comparison is of which rows, each how often."""
    return sorted(repr(sorted(r.items())) for r in table.to_pylist())


def _answers(root: Path, requests: list[str]) -> dict[str, object]:
    with EvidenceStore(root) as store:
        return {
            "who_routed_what": _rows(store.who_routed_what()),
            "who_acme": _rows(store.who_routed_what("acme-bank")),
            "spend": store.spend().to_pylist(),
            "residency": _rows(store.residency()),
            "residency_summary": store.residency_summary().to_pylist(),
            "escalations": _rows(store.escalations()),
            "terminal_summary": store.terminal_summary(),
            "lineage": [store.lineage(r).to_pylist() for r in requests],
        }


def test_every_report_answers_the_same_after_compaction(stores: tuple[Path, Path, list[str]]) -> None:
    plain, compacted, requests = stores
    before, after = _answers(plain, requests), _answers(compacted, requests)
    assert before["lineage"] and all(before["lineage"])
    assert before == after


def test_the_residency_summary_counts_the_residency_audit(stores: tuple[Path, Path, list[str]]) -> None:
    plain, _, _ = stores
    with EvidenceStore(plain) as store:
        calls = store.residency().to_pylist()
        summary = store.residency_summary().to_pylist()
    assert calls, "the history has cross-border calls to count"
    counted = Counter(
        (c["finding"], c["tenant_id"], c["event"], c["region"], c["transfer_basis"]) for c in calls
    )
    assert {
        (s["finding"], s["tenant_id"], s["event"], s["region"], s["transfer_basis"]): s["calls"]
        for s in summary
    } == dict(counted)
    per_call = services.residency_breaches(pa.Table.from_pylist(calls))
    assert services.residency_breaches(pa.Table.from_pylist(summary)) == per_call


def test_the_direct_lineage_is_the_stores_lineage_on_both_stores(
    stores: tuple[Path, Path, list[str]],
) -> None:
    from nexuscore.kernel.errors import NexusError
    from nexuscore.projections import lineage_at

    for root in stores[:2]:
        with EvidenceStore(root) as store:
            for request_id in stores[2]:
                direct = lineage_at(root, request_id).to_pylist()
                assert direct and direct == store.lineage(request_id).to_pylist()
                assert direct[0]["event"] == "requests"
                assert services.lineage_of(root, request_id).to_pylist() == direct
        with pytest.raises(NexusError, match="no events of request"):
            services.lineage_of(root, "no-such-request")
