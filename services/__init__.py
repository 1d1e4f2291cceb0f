"""What the operators' commands do, callable without the CLI: the services layer.

Each function is one thing a person does to the pipeline or its evidence — run a stage, verify or
prove the evidence, replay history, sign, promote, review, throw a kill switch — with its rules
(which policies count as recorded, what a residency breach is, when a review is refused, ...).
The CLI (``nexuscore.cli``) parses options, calls one of these and prints what it returns; the
demo uses them too. Below: the stages (streams, replay, projections, providers) and the library.

This ``__init__`` is the whole public surface; the modules inside are private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nexuscore.kernel.lazy import lazy_exports

if TYPE_CHECKING:
    from nexuscore.services._acts import (
        kill_switch_event,
        load_signer,
        promotion_event,
        publish,
        review_event,
        signer_name,
    )
    from nexuscore.services._control import throw_switch
    from nexuscore.services._evidence import (
        compact_evidence,
        erase_content,
        erasure_scope,
        known_policy_digests,
        lineage_of,
        open_store,
        prove_growth,
        prove_request,
        request_lineage,
        residency_breaches,
        routing_summary,
        verification_note,
        verify_evidence,
        write_evidence_report,
    )
    from nexuscore.services._governance import (
        create_signer_key,
        differences_table,
        policy_history,
        promote,
        read_limited,
        revoke_key,
        sign_policy,
        trust_key,
        trusted_keys,
    )
    from nexuscore.services._keys import content_keys
    from nexuscore.services._operate import init_topics
    from nexuscore.services._replay import (
        change_rows,
        changes_table,
        log_snapshot,
        recorded_policies,
        replay_failure,
        replay_history,
        report_document,
        summary_lines,
        write_replay_html,
        write_replay_report,
    )
    from nexuscore.services._review import (
        escalation_event_id,
        find_escalation,
        pending_escalation,
        review_queue,
        submit_review,
        wait_for_resolution,
    )
    from nexuscore.services._stages import (
        Decider,
        WorkerSettings,
        bootstrap_policy,
        prepare_decider,
        run_decider,
        run_local_broker,
        run_projector,
        run_worker,
        serve_provider,
    )

# Loaded on first use: the stages, acts and replay bring faust, aiokafka and the policy model, about
# a second of CPU that an evidence command (a fresh process each) does not need; the evidence
# commands bring DuckDB, about 15 MB that a running stage does not need resident.
_LAZY = {
    "compact_evidence": "_evidence",
    "content_keys": "_keys",
    "erase_content": "_evidence",
    "erasure_scope": "_evidence",
    "known_policy_digests": "_evidence",
    "lineage_of": "_evidence",
    "open_store": "_evidence",
    "prove_growth": "_evidence",
    "prove_request": "_evidence",
    "request_lineage": "_evidence",
    "residency_breaches": "_evidence",
    "routing_summary": "_evidence",
    "verification_note": "_evidence",
    "verify_evidence": "_evidence",
    "write_evidence_report": "_evidence",
    "kill_switch_event": "_acts",
    "load_signer": "_acts",
    "promotion_event": "_acts",
    "publish": "_acts",
    "review_event": "_acts",
    "signer_name": "_acts",
    "throw_switch": "_control",
    "create_signer_key": "_governance",
    "differences_table": "_governance",
    "policy_history": "_governance",
    "promote": "_governance",
    "read_limited": "_governance",
    "revoke_key": "_governance",
    "sign_policy": "_governance",
    "trust_key": "_governance",
    "trusted_keys": "_governance",
    "init_topics": "_operate",
    "change_rows": "_replay",
    "changes_table": "_replay",
    "log_snapshot": "_replay",
    "recorded_policies": "_replay",
    "replay_failure": "_replay",
    "replay_history": "_replay",
    "report_document": "_replay",
    "summary_lines": "_replay",
    "write_replay_html": "_replay",
    "write_replay_report": "_replay",
    "escalation_event_id": "_review",
    "find_escalation": "_review",
    "pending_escalation": "_review",
    "review_queue": "_review",
    "submit_review": "_review",
    "wait_for_resolution": "_review",
    "Decider": "_stages",
    "WorkerSettings": "_stages",
    "bootstrap_policy": "_stages",
    "prepare_decider": "_stages",
    "run_decider": "_stages",
    "run_local_broker": "_stages",
    "run_projector": "_stages",
    "run_worker": "_stages",
    "serve_provider": "_stages",
}


__getattr__ = lazy_exports(__name__, globals(), _LAZY)

__all__ = [
    "Decider",
    "WorkerSettings",
    "bootstrap_policy",
    "change_rows",
    "changes_table",
    "content_keys",
    "create_signer_key",
    "differences_table",
    "erase_content",
    "erasure_scope",
    "init_topics",
    "escalation_event_id",
    "find_escalation",
    "kill_switch_event",
    "known_policy_digests",
    "lineage_of",
    "load_signer",
    "log_snapshot",
    "open_store",
    "pending_escalation",
    "policy_history",
    "prepare_decider",
    "promote",
    "promotion_event",
    "prove_growth",
    "prove_request",
    "publish",
    "read_limited",
    "recorded_policies",
    "replay_failure",
    "replay_history",
    "report_document",
    "request_lineage",
    "residency_breaches",
    "review_event",
    "review_queue",
    "revoke_key",
    "routing_summary",
    "run_decider",
    "run_local_broker",
    "run_projector",
    "run_worker",
    "serve_provider",
    "sign_policy",
    "signer_name",
    "submit_review",
    "summary_lines",
    "throw_switch",
    "trust_key",
    "trusted_keys",
    "verification_note",
    "verify_evidence",
    "compact_evidence",
    "wait_for_resolution",
    "write_evidence_report",
    "write_replay_html",
    "write_replay_report",
]
