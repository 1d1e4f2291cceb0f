"""Every event NexusCore writes, in one place.

Rules (msgspec's schema-evolution rules, enforced by the Avro contract test):
- an event's wire name is its ``tag`` (``<name>.v<version>``), never a Python class path;
- events are frozen; a new field gets a default; a field's type never changes;
- a breaking change is a new wire name (``.v2``) with an upcaster, never an edit in place.

Money is integer micro-dollars (``*_micros``) so that decisions and replays compare exactly.
Times are tz-aware UTC (Avro ``timestamp-micros``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypedDict

import msgspec

Tier = Literal["small", "mid", "frontier"]
RiskClass = Literal["low", "medium", "high", "critical"]
DataClassification = Literal["public", "internal", "confidential", "restricted"]
Verdict = Literal["dispatch", "denied", "escalated"]
OutcomeStatus = Literal["answered", "failed"]
# Where an operator's kill switch applies, and what it does (the one definition: the policy's
# governance rules and the CLI take their values from these).
SwitchScope = Literal["global", "tenant", "feature"]
SwitchMode = Literal["on", "off", "offline"]
CircuitState = Literal["closed", "open", "half_open"]

TIERS: tuple[Tier, ...] = ("small", "mid", "frontier")

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
# Free text a person or client supplies (reasons, names): bounded so no event outgrows the broker.
Text = Annotated[str, msgspec.Meta(max_length=4000)]
# A request id is the client's: unique per tenant, printable, short.
RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$")]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="event_type"):
    """The envelope every event carries.

    ``event_id`` is derived from the event's cause (see ``nexuscore.core.derive_id``), so a
    redelivered input produces the same id and consumers can drop duplicates.
    """

    event_id: Identifier
    request_id: str
    # Bounded as every policy's tenant ids are: an unknown tenant's id is repeated in its rejection
    # (key, field and reason), and a 400,000-character one made a rejection the broker refused,
    # which stopped the decider. A longer one is now an invalid request, dead-lettered.
    tenant_id: Annotated[str, msgspec.Meta(max_length=200)]
    occurred_at: datetime
    producer: str
    causation_id: str = ""
    trace_id: str = ""
    policy_digest: str = ""


class Envelope(TypedDict):
    """The envelope's fields, for building events of several types from one cause."""

    event_id: str
    request_id: str
    tenant_id: str
    occurred_at: datetime
    producer: str
    causation_id: str
    trace_id: str
    policy_digest: str


# --- nexus.requests -------------------------------------------------------------------------


class InferenceRequested(Event, frozen=True, kw_only=True, tag="inference_requested.v1"):
    """An application asks for a model call; the gateway decides whether and where it runs."""

    request_id: RequestId
    feature: Identifier
    task_type: Identifier
    risk_class: RiskClass
    data_classification: DataClassification
    prompt: Annotated[str, msgspec.Meta(min_length=1)]
    max_output_tokens: Annotated[int, msgspec.Meta(ge=1, le=32768)]
    required_capabilities: Annotated[list[Identifier], msgspec.Meta(max_length=32)] = msgspec.field(
        default_factory=list
    )
    # The caller's own estimate of task complexity in [0, 1]; None lets the gateway estimate it.
    complexity: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] | None = None
    latency_slo_ms: Annotated[int, msgspec.Meta(ge=1, le=3_600_000)] | None = None
    # The person the content is about, when the caller names one: their content gets its own key,
    # so it can be erased on its own (right to erasure).
    data_subject: Annotated[str, msgspec.Meta(max_length=200)] = ""


# --- nexus.decisions ------------------------------------------------------------------------


class Reason(msgspec.Struct, frozen=True, kw_only=True, tag="reason.v1"):
    """One line of a decision's justification: a rule that fired or an alternative rejected."""

    stage: Literal["admission", "escalation", "residency", "routing", "budget", "decode"]
    kind: Literal["rule_fired", "rejected_alternative", "note"]
    subject: str
    detail: str


class ResidencyDecision(msgspec.Struct, frozen=True, kw_only=True, tag="residency_decision.v1"):
    """Where the request's data may be processed, and why."""

    home_region: str
    allowed_regions: list[str]
    rule_id: str
    transfer_basis: str


class RoutingDecision(msgspec.Struct, frozen=True, kw_only=True, tag="routing_decision.v1"):
    """The smallest tier the request can trust and the deployment chosen in it."""

    complexity: float
    floor_tier: Tier
    preferred_tier: Tier
    tier: Tier | None
    deployment_id: str | None
    eligible: list[str]
    # How sure the router is of the tier: 1.0 when a rule or the caller fixed the complexity, less
    # the closer an estimated complexity lies to the small/mid boundary.
    confidence: float = 1.0
    # Where a worker may fail over to, in order, if the chosen deployment fails: same tier, inside
    # the allowed regions, and inside the budget reserved.
    fallbacks: list[str] = msgspec.field(default_factory=list)


class BudgetDecision(msgspec.Struct, frozen=True, kw_only=True, tag="budget_decision.v1"):
    """The reservation made against the tenant's and feature's daily budgets."""

    action: Literal["reserved", "downgraded", "denied", "not_applicable"]
    window: str
    estimated_cost_micros: NonNegative
    tenant_budget_micros: NonNegative
    tenant_committed_micros: NonNegative
    feature_budget_micros: NonNegative
    feature_committed_micros: NonNegative
    deployment_id: str | None
    tier: Tier | None


class LatencyObservation(msgspec.Struct, frozen=True, kw_only=True, tag="latency_observation.v1"):
    """What the Latency Controller had observed of one (deployment, strategy) when it decided."""

    deployment_id: str
    strategy: str
    p50_ms: int
    p95_ms: int
    samples: NonNegative


class DecodeDecision(msgspec.Struct, frozen=True, kw_only=True, tag="decode_decision.v1"):
    """The deployment's decode strategy whose predicted latency fits the request's SLO."""

    strategy: str
    latency_slo_ms: int
    predicted_latency_ms: int
    fits_slo: bool
    # "policy" (the policy's prior: ttft + per-token time) or "observed" (windowed p95).
    basis: str = "policy"
    # The observations the prediction was made from: recorded, so replay uses the same inputs.
    observations: list[LatencyObservation] = msgspec.field(default_factory=list)


class RequestRejected(Event, frozen=True, kw_only=True, tag="request_rejected.v1"):
    """Admission refused the request before any decision (unknown tenant, too long, ...)."""

    reason_code: str
    reason: str
    policy_version: str = ""
    policy_stage: str = "active"  # active, or canary for a tenant in a canary's share


class RequestDecided(Event, frozen=True, kw_only=True, tag="request_decided.v1"):
    """The one decision made for an admitted request, with every reason behind it.

    One event, not four: residency, routing, budget and decode are stages of a single decision and
    an auditor must never see half of one.
    """

    verdict: Verdict
    verdict_reason: str
    policy_version: str
    feature: str
    residency: ResidencyDecision
    routing: RoutingDecision
    budget: BudgetDecision
    decode: DecodeDecision | None
    reasons: list[Reason]
    # The tenant's budget-state version the decision was made against: replay orders by it.
    state_version: NonNegative
    policy_stage: str = "active"  # active, or canary for a tenant in a canary's share
    # For an escalated request: when it ends with a recorded timeout unless a person decides first.
    review_deadline: datetime | None = None
    # The operator's kill switch that shaped this decision ("off" or "offline"), "" when none did.
    control_mode: str = ""


class BudgetSettled(Event, frozen=True, kw_only=True, tag="budget_settled.v1"):
    """A reservation replaced by the actual cost, once the outcome is known."""

    feature: str
    window: str
    reserved_micros: NonNegative
    actual_micros: NonNegative
    tenant_spent_micros: NonNegative
    feature_spent_micros: NonNegative
    state_version: NonNegative


class EscalationResolved(Event, frozen=True, kw_only=True, tag="escalation_resolved.v1"):
    """How an escalated request ended: a person approved it (it resumes) or denied it, or its
    review deadline passed. ``resolution`` is dispatched, denied, timed_out or refused (approved,
    but the budget or a kill switch no longer allows the call)."""

    resolution: str
    review_event_id: str
    reviewer: str
    review_reason: str
    verdict_reason: str
    policy_version: str
    feature: str
    budget: BudgetDecision | None = None
    decode: DecodeDecision | None = None
    deployment_id: str | None = None
    reasons: list[Reason] = msgspec.field(default_factory=list)
    state_version: NonNegative = 0


# --- nexus.dispatch -------------------------------------------------------------------------


class FallbackTarget(msgspec.Struct, frozen=True, kw_only=True, tag="fallback_target.v1"):
    """A deployment the worker may fail over to, already checked against residency and budget."""

    deployment_id: str
    provider: str
    endpoint: str
    model: str
    region: str
    decode_strategy: str
    input_price_micros_per_1k: NonNegative
    output_price_micros_per_1k: NonNegative


class DispatchRequested(Event, frozen=True, kw_only=True, tag="dispatch_requested.v1"):
    """An order to a worker: call this deployment, in this region, for this request."""

    feature: str
    deployment_id: str
    provider: str
    endpoint: str
    model: str
    region: str
    allowed_regions: list[str]
    decode_strategy: str
    prompt: str
    max_output_tokens: Positive
    input_price_micros_per_1k: NonNegative
    output_price_micros_per_1k: NonNegative
    estimated_cost_micros: NonNegative
    idempotency_key: str
    # When the request was produced, so the data plane can report the gateway's added latency.
    requested_at: datetime
    data_subject: str = ""
    fallbacks: list[FallbackTarget] = msgspec.field(default_factory=list)
    latency_slo_ms: NonNegative = 0
    predicted_latency_ms: NonNegative = 0


# --- nexus.attempts / nexus.outcomes --------------------------------------------------------


class ModelCallAttempted(Event, frozen=True, kw_only=True, tag="model_call_attempted.v1"):
    """One call to a provider: every retry is its own attempt."""

    attempt: Positive
    deployment_id: str
    region: str
    status: Literal["ok", "error"]
    http_status: int | None = None
    latency_ms: float
    retryable: bool = False
    error: str = ""


class OutcomeRecorded(Event, frozen=True, kw_only=True, tag="outcome_recorded.v1"):
    """How the request ended on the data plane."""

    status: OutcomeStatus
    feature: str
    deployment_id: str
    model: str
    model_version: str
    region: str
    attempts: Positive
    input_tokens: NonNegative
    output_tokens: NonNegative
    cost_micros: NonNegative
    latency_ms: float
    response: str
    finish_reason: str
    error: str = ""
    data_subject: str = ""
    # The Latency Controller's prediction, recorded beside the actual latency.
    decode_strategy: str = ""
    latency_slo_ms: NonNegative = 0
    predicted_latency_ms: NonNegative = 0
    # Answered from the offline cache (no model was called), and from which request's answer.
    cached: bool = False
    cached_from: str = ""
    # Deployments passed over without a call (for example "eu-small-1: circuit open").
    skipped: list[str] = msgspec.field(default_factory=list)


# --- nexus.circuits -------------------------------------------------------------------------


class CircuitStateChanged(Event, frozen=True, kw_only=True, tag="circuit_state_changed.v1"):
    """A worker's circuit breaker for one deployment changed state (closed, open, half_open).

    Keyed by deployment: every worker follows the topic and takes up the others' openings, so a
    failing deployment is avoided by all of them. ``request_id`` is the call that tipped it.
    """

    deployment_id: str
    region: str
    from_state: CircuitState
    to_state: CircuitState
    reason: str
    consecutive_failures: NonNegative
    open_until: datetime | None = None


# --- nexus.deadletter -----------------------------------------------------------------------


class DeadLettered(Event, frozen=True, kw_only=True, tag="dead_lettered.v1"):
    """Input that could not be processed: its reason and position, and a bounded prefix of its
    bytes with the size and sha256 of the whole (the original stays on its source topic at the
    recorded offset), so that a dead letter never outgrows the broker's limit."""

    source_topic: str
    source_partition: NonNegative
    source_offset: NonNegative
    reason: str
    raw_key: bytes | None
    raw_value: bytes
    raw_size: NonNegative = 0
    raw_sha256: str = ""


# --- nexus.governance ------------------------------------------------------------------------


# --- nexus.reviews (keyed by tenant, like the requests, so a review reaches their decider) ------


class ReviewRecorded(Event, frozen=True, kw_only=True, tag="review_recorded.v1"):
    """A person's decision on an escalated request, or the deadline passing without one."""

    action: Literal["approved", "denied", "timed_out"]
    reviewer: Text
    reason: Text
    deadline: datetime | None = None
    # A person's review is signed by a reviewer key of the deciders' trust store, over the request,
    # tenant, the escalation it answers (``causation_id``), the action and when (see
    # ``nexuscore.policy.review_message``); ``reviewer`` must be that key's name. A deadline's
    # timeout is the decider's own and unsigned: it is taken only once the deadline has passed.
    key_id: str = ""
    signature: str = ""


class KillSwitchChanged(Event, frozen=True, kw_only=True, tag="kill_switch_changed.v1"):
    """An operator turned inference off, to offline (cached answers only) or back on.

    ``scope`` is global, tenant or feature; ``target`` the tenant or feature id ("" for global).
    Signed by an operator key of the deciders' trust store.
    """

    scope: SwitchScope
    target: str
    mode: SwitchMode
    actor: Text
    reason: Text
    key_id: str = ""
    signature: str = ""


class PolicyStageChanged(Event, frozen=True, kw_only=True, tag="policy_stage_changed.v1"):
    """A policy moved through draft, shadow, canary and active (or was withdrawn).

    ``request_id`` and ``tenant_id`` are empty unless the change concerns one tenant.
    """

    policy_version: str
    from_stage: str
    to_stage: str
    actor: str
    signers: list[str] = msgspec.field(default_factory=list)
    replay_report_digest: str = ""
    reason: str = ""
    # The policy file as signed, its signatures file, and the replay report relied on: every
    # decider checks them against its own trust store before taking the step up.
    document: str = ""
    signatures: str = ""
    replay_report: str = ""
    canary_share: float = 0.0
    # The operator's key and signature over the step (digest, version, stages, share, the replay
    # report's digest, when): see ``nexuscore.policy.promotion_message``.
    key_id: str = ""
    signature: str = ""


class ShadowDecisionRecorded(Event, frozen=True, kw_only=True, tag="shadow_decision_recorded.v1"):
    """What a policy in shadow would have decided for a live request: recorded, never enforced.

    ``policy_digest`` is the shadow policy's; ``active_digest`` the one that really decided.
    """

    active_digest: str
    policy_version: str
    verdict: str
    verdict_reason: str
    tier: str | None
    deployment_id: str | None
    estimated_cost_micros: NonNegative
    decode_strategy: str | None
    allowed_regions: list[str]
    differs: bool


class ActRefused(Event, frozen=True, kw_only=True, tag="act_refused.v1"):
    """A human act (review, promotion step, kill switch) that was not applied, and why.

    ``act_event_id`` is the refused event's own id, ``source_*`` where it was read. The event id is
    derived from that position, so a replayed copy of an act is its own refusal, never a duplicate.
    """

    act: str
    act_event_id: str
    source_topic: str
    source_partition: NonNegative
    source_offset: NonNegative
    key_id: str
    claimed_actor: str
    code: str
    reason: str


EVENT_TYPES: tuple[type[Event], ...] = (
    InferenceRequested,
    RequestRejected,
    RequestDecided,
    BudgetSettled,
    DispatchRequested,
    ModelCallAttempted,
    OutcomeRecorded,
    DeadLettered,
    ReviewRecorded,
    PolicyStageChanged,
    ShadowDecisionRecorded,
    EscalationResolved,
    CircuitStateChanged,
    KillSwitchChanged,
    ActRefused,
)


def wire_name(cls: type[msgspec.Struct]) -> str:
    """The explicit, versioned wire name of an event or record type."""
    tag = cls.__struct_config__.tag
    if not isinstance(tag, str):
        raise TypeError(f"{cls.__name__} has no explicit wire name")
    return tag
