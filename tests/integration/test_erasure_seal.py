"""An erasure made while the projector runs (and holds the ledger's lock) is sealed by the
projector, even with no traffic to flush: until sealed, deleting its record would go unseen."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nexuscore._demo import _publish_all, projector_args
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore.kernel.signing import load_public_key
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore, verify
from nexuscore.projections._manifest import signed_entries
from nexuscore.services import erase_content
from nexuscore.transport import Topics, ensure_topics
from tests.waiting import eventually

pytestmark = pytest.mark.integration
REQUESTS = 6


def _sealed(evidence: Path) -> int:
    """How many erasure records the last commit sealed."""
    entries = signed_entries(evidence)
    return int(entries[-1].get("erasures", {}).get("lines", 0)) if entries else 0


def test_an_erasure_while_the_projector_runs_idle_is_sealed_by_it(bootstrap: str, tmp_path: Path) -> None:
    topics = Topics(f"erase-{uuid.uuid4().hex[:8]}.")
    evidence = tmp_path / "evidence"
    asyncio.run(ensure_topics(bootstrap, topics))
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    common = ["--bootstrap", bootstrap, "--namespace", topics.namespace]
    with Services(tmp_path / "logs") as services:
        projector = services.start("projector", *projector_args(common, keys, evidence))
        projector.wait_for_line("projector ready", 60)
        asyncio.run(_publish_all(bootstrap, topics, default_policy(), REQUESTS, topics.namespace))

        def stored() -> str | None:
            if not (evidence / "manifest.head.json").exists():
                return None
            with EvidenceStore(evidence) as store:
                rows = store.query("SELECT tenant_id FROM requests").column(0).to_pylist()
            return rows[0] if len(rows) == REQUESTS else None

        tenant = eventually(stored, "the requests sealed", services=services)
        erased = erase_content(evidence, keys.evidence_private, tenant, None, "art. 17", datetime.now(UTC))
        assert erased and _sealed(evidence) == 0  # the projector holds the lock: erase cannot seal
        eventually(lambda: _sealed(evidence) == 1, "the idle projector sealed the erasure", services=services)
    report = verify(evidence, load_public_key(keys.evidence_public), {default_policy().digest}, workers=1)
    # (No decider ran: the requests have no decision, which verify names; the keys and the erasure
    # ledger are whole.)
    assert {f.kind for f in report.findings if f.fatal} == {"no_terminal_state"}, report.findings
    (evidence / "erasures.jsonl").unlink()
    report = verify(evidence, load_public_key(keys.evidence_public), {default_policy().digest}, workers=1)
    assert "erasures_altered" in {f.kind for f in report.findings}
