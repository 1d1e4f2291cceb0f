"""The governance log as a pure fold: which promotion steps and kill switches are taken, and why not.

``judge(state, event, trust, appended_at)`` is the one rule every reader of ``nexus.governance``
applies — each decider, to know which policy decides and which switches hold; the projector, to
record accepted acts in ``policy_events``/``kill_switches`` and refused ones in ``refusals``. It
depends only on the log (in order), the trust store and the broker's append time of each message,
so every reader reaches the same verdicts, on a restart too.

Rules, beyond a valid signature of the right role (``nexuscore.policy._acts``):
- a kill switch is applied only if it was signed after the last switch applied to the same scope
  and target: a re-published older switch (an old ``on`` replayed over a newer ``off``) is refused;
- a promotion step is signed by an operator, names the policy version its document has, moves the
  policy from the stage it holds to the next one (``check_promotion``: replay report of that exact
  digest, no residency breach, two reviewers for active), and is newer than the last step applied;
- the decider's bootstrap step (its ``--policy`` file, two reviewers' signatures, no operator) is
  taken only while no policy is active.
"""

from __future__ import annotations

from datetime import datetime

import msgspec

from nexuscore.kernel.errors import PolicyError, PolicyRefused
from nexuscore.policy._acts import Refusal, check_act, kill_switch_message, promotion_message
from nexuscore.policy._controls import MODES, NO_CONTROLS, SCOPES, Controls
from nexuscore.policy._model import parse_policy
from nexuscore.policy._promotion import REVIEWERS_FOR_ACTIVE, STAGES, Registry, check_promotion
from nexuscore.policy._signatures import PolicySignature, SignedPolicy, TrustStore, check_signatures
from nexuscore.schemas import KillSwitchChanged, PolicyStageChanged

BOOTSTRAP = "bootstrap"
GovernanceAct = PolicyStageChanged | KillSwitchChanged


class GovernanceState(msgspec.Struct, frozen=True):
    """What the governance log has established so far."""

    registry: Registry = msgspec.field(default_factory=Registry)
    controls: Controls = NO_CONTROLS
    # The last switch applied to each "scope/target": when it was signed, and its id.
    switched: dict[str, tuple[datetime, str]] = msgspec.field(default_factory=dict)
    # When the last promotion step applied was signed, and every step's id applied so far.
    promoted_at: datetime | None = None
    applied: frozenset[str] = frozenset()


def judge(
    state: GovernanceState, event: GovernanceAct, trust: TrustStore, appended_at: datetime
) -> tuple[GovernanceState, Refusal | None]:
    """Fold one governance act in if it holds; otherwise keep the state and say why not."""
    try:
        if isinstance(event, KillSwitchChanged):
            return _switch(state, event, trust, appended_at)
        if event.reason == BOOTSTRAP and event.from_stage == "" and not event.key_id:
            return _bootstrap(state, event, trust, appended_at)
        return _promotion(state, event, trust, appended_at)
    except Exception as exc:  # noqa: BLE001  # hostile input must never stop a reader of the log
        return state, Refusal("internal_error", f"could not be judged: {type(exc).__name__}: {exc}"[:500])


def _switch(
    state: GovernanceState, event: KillSwitchChanged, trust: TrustStore, appended_at: datetime
) -> tuple[GovernanceState, Refusal | None]:
    if (
        event.scope not in SCOPES
        or event.mode not in MODES
        or (event.scope == "global") != (not event.target)
    ):
        return state, Refusal(
            "invalid",
            f"not a kill switch: scope {event.scope!r}, target {event.target!r}, mode {event.mode!r}",
        )
    signer = check_act(
        event.key_id, event.signature, kill_switch_message(event), "operator", event.actor, trust,
        event.occurred_at, appended_at,
    )  # fmt: skip
    if isinstance(signer, Refusal):
        return state, signer
    target = f"{event.scope}/{event.target}"
    last = state.switched.get(target)
    if last is not None and last[1] == event.event_id:
        return state, Refusal("replayed", f"kill switch {event.event_id} was applied already")
    if last is not None and event.occurred_at <= last[0]:
        return state, Refusal(
            "not_newer",
            f"signed {event.occurred_at.isoformat()}, not after the switch in force for {target} ({last[0].isoformat()})",
        )
    switched = {**state.switched, target: (event.occurred_at, event.event_id)}
    return msgspec.structs.replace(state, controls=state.controls.apply(event), switched=switched), None


def _bootstrap(
    state: GovernanceState, event: PolicyStageChanged, trust: TrustStore, appended_at: datetime
) -> tuple[GovernanceState, Refusal | None]:
    active = state.registry.active
    if active is not None:
        if event.event_id in state.applied:
            return state, Refusal("replayed", f"bootstrap {event.event_id} was applied already")
        return state, Refusal("refused_step", "a bootstrap policy is taken only while none is active")
    signed = signed_from_event(event, trust, appended_at)
    if isinstance(signed, Refusal):
        return state, signed
    reviewers = {s.key_id for s in signed.signatures if s.role == "reviewer"}
    if len(reviewers) < REVIEWERS_FOR_ACTIVE:
        return state, Refusal(
            "refused_step",
            f"the bootstrap policy needs {REVIEWERS_FOR_ACTIVE} reviewers' signatures, it has {len(reviewers)}",
        )
    registry = state.registry.apply(signed, "active")
    return msgspec.structs.replace(state, registry=registry, applied=state.applied | {event.event_id}), None


def _promotion(
    state: GovernanceState, event: PolicyStageChanged, trust: TrustStore, appended_at: datetime
) -> tuple[GovernanceState, Refusal | None]:
    signer = check_act(
        event.key_id, event.signature, promotion_message(event), "operator", event.actor, trust,
        event.occurred_at, appended_at,
    )  # fmt: skip
    if isinstance(signer, Refusal):
        return state, signer
    if event.event_id in state.applied:
        return state, Refusal("replayed", f"promotion step {event.event_id} was applied already")
    if state.promoted_at is not None and event.occurred_at <= state.promoted_at:
        return state, Refusal(
            "not_newer",
            f"signed {event.occurred_at.isoformat()}, not after the last step applied ({state.promoted_at.isoformat()})",
        )
    signed = signed_from_event(event, trust, appended_at)
    if isinstance(signed, Refusal):
        return state, signed
    refused = _step_refusal(state.registry, signed, event)
    if refused is not None:
        return state, refused
    registry = state.registry.apply(signed, event.to_stage, event.canary_share)
    applied = state.applied | {event.event_id}
    return msgspec.structs.replace(
        state, registry=registry, promoted_at=event.occurred_at, applied=applied
    ), None


def _step_refusal(registry: Registry, signed: SignedPolicy, event: PolicyStageChanged) -> Refusal | None:
    if signed.policy.version != event.policy_version:
        return Refusal(
            "invalid",
            f"the event names version {event.policy_version!r}, the document is version {signed.policy.version!r}",
        )
    held = registry.stages.get(signed.policy.digest, "")
    if event.to_stage in STAGES and event.from_stage != held:
        return Refusal(
            "refused_step",
            f"the step is from {event.from_stage or '(none)'!r}, the policy holds {held or '(none)'!r}",
        )
    reason = check_promotion(
        registry,
        signed,
        event.to_stage,
        replay_report=event.replay_report.encode(),
        replay_report_digest_claimed=event.replay_report_digest,
        canary_share=event.canary_share,
    )
    return None if reason is None else Refusal("refused_step", reason)


def signed_from_event(event: PolicyStageChanged, trust: TrustStore, now: datetime) -> SignedPolicy | Refusal:
    """The event's policy, if its signatures hold against ``trust`` as of ``now``."""
    try:
        policy = parse_policy(event.document, f"promotion {event.event_id}")
    except PolicyError as exc:
        return Refusal("invalid", f"{exc}")
    if policy.digest != event.policy_digest:
        return Refusal(
            "invalid", f"the document has digest {policy.digest}, the event names {event.policy_digest}"
        )
    try:
        signatures = msgspec.json.decode(event.signatures or "{}", type=dict[str, list[PolicySignature]])
    except msgspec.DecodeError as exc:
        return Refusal("bad_signature", f"unreadable policy signatures: {exc}")
    found = signatures.get("signatures", [])
    if not found:
        return Refusal("unsigned", f"policy {policy.digest[:19]}… has no signatures")
    try:
        return check_signatures(
            policy, event.document.encode(), found, trust, now, source=f"policy {policy.digest[:19]}…"
        )
    except PolicyRefused as exc:
        return Refusal("bad_signature", str(exc))
