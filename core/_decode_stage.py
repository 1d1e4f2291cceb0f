"""The decode stage: the latency SLO sets the budget; the Latency Controller predicts.

Depends on state: what the Latency Controller has observed of each (deployment, decode strategy).
For each deployment of the failover chain, in order, and each of its strategies, the prediction is
the observed p95 once the window holds ``MIN_SAMPLES`` calls, the policy's prior before that. The
first deployment with a strategy that fits the SLO is picked, its first strategy that fits; when
none fits, the chain's first deployment with its fastest strategy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import msgspec

from nexuscore.core._latency import MIN_SAMPLES
from nexuscore.policy import DecodeStrategy, Deployment
from nexuscore.schemas import DecodeDecision, LatencyObservation, Reason

# What the Latency Controller observed of (deployment id, decode strategy), if anything.
LatencyView = Callable[[str, str], LatencyObservation | None]

# A strategy, its predicted latency (ms) and the prediction's basis ("observed" or "policy").
Prediction = tuple[DecodeStrategy, int, str]


class Decoded(msgspec.Struct, frozen=True, kw_only=True):
    """The deployment picked from the chain, its decode decision and where to fail over to."""

    picked: Deployment
    decode: DecodeDecision
    # The rest of the chain, in order, each with the strategy chosen for it.
    fallbacks: tuple[tuple[Deployment, str], ...]
    reasons: tuple[Reason, ...]


def _predictions(
    chain: Sequence[Deployment], max_output_tokens: int, latency: LatencyView | None
) -> tuple[dict[str, list[Prediction]], list[LatencyObservation]]:
    """Each strategy's predicted latency per deployment, and the observations used, in order."""
    observations: list[LatencyObservation] = []

    def predict(d: Deployment, s: DecodeStrategy) -> Prediction:
        seen = latency(d.id, s.name) if latency else None
        if seen is not None:
            observations.append(seen)
            if seen.samples >= MIN_SAMPLES:
                return s, seen.p95_ms, "observed"
        return s, math.ceil(s.ttft_ms + s.ms_per_output_token * max_output_tokens), "policy"

    predictions = {d.id: [predict(d, s) for s in d.decode] for d in chain}
    return predictions, observations


def _best(predictions: list[Prediction], slo: int) -> tuple[DecodeStrategy, int, str, bool]:
    """The first strategy that fits the SLO, or else the fastest (and whether it fits)."""
    fit = next(((s, p, b) for s, p, b in predictions if p <= slo), None)
    if fit is not None:
        return fit[0], fit[1], fit[2], True
    s, p, b = min(predictions, key=lambda spb: spb[1])
    return s, p, b, False


def decode_stage(
    chain: Sequence[Deployment], slo: int, max_output_tokens: int, latency: LatencyView | None
) -> Decoded:
    """Pick the deployment of ``chain`` (never empty) and its strategy that fit ``slo`` (ms)."""
    predictions, observations = _predictions(chain, max_output_tokens, latency)
    # Each deployment's best strategy, worked out once (decide is replay's hot path too).
    bests = {d.id: _best(predictions[d.id], slo) for d in chain}
    picked = next((d for d in chain if bests[d.id][3]), chain[0])
    strategy, predicted, basis, fits = bests[picked.id]
    reasons: list[Reason] = []
    for d in chain:
        if d is picked:
            break
        detail = f"predicts {bests[d.id][1]} ms ({bests[d.id][2]}), over the {slo} ms SLO"
        reasons.append(Reason(stage="decode", kind="rejected_alternative", subject=d.id, detail=detail))
    if not fits:
        detail = f"no strategy fits {slo} ms; fastest predicts {predicted} ms"
        reasons.append(Reason(stage="decode", kind="note", subject=strategy.name, detail=detail))
    reasons.extend(
        Reason(stage="decode", kind="rejected_alternative", subject=s.name, detail=f"predicts {p} ms ({b})")
        for s, p, b in predictions[picked.id]
        if s is not strategy
    )
    decode = DecodeDecision(
        strategy=strategy.name,
        latency_slo_ms=slo,
        predicted_latency_ms=predicted,
        fits_slo=fits,
        basis=basis,
        observations=observations,
    )
    fallbacks = tuple((d, bests[d.id][0].name) for d in chain if d is not picked)
    return Decoded(picked=picked, decode=decode, fallbacks=fallbacks, reasons=tuple(reasons))
