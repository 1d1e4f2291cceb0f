"""Replay's per-row planning over columns (replay/_rows.py) against the planner row by row: the same
shape, tokens and complexity for every request, and the prices ``decide`` would compare, on requests
around every threshold the policy names."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from nexuscore.core import Planner
from nexuscore.policy import RoutingPolicy, cost_micros
from nexuscore.replay._load import SEP, Columns
from nexuscore.replay._rows import BUDGETED, ESCALATED, plan_rows
from nexuscore.schemas import InferenceRequested
from tests.factories import POLICY
from tests.unit.test_plan import TIGHT, requests


def _columns(reqs: list[InferenceRequested], digests: list[str | None]) -> Columns:
    return Columns(
        pa.table(
            {
                "request_id": [r.request_id for r in reqs],
                "tenant_id": [r.tenant_id for r in reqs],
                "feature": [r.feature for r in reqs],
                "task_type": [r.task_type for r in reqs],
                "risk_class": [r.risk_class for r in reqs],
                "data_classification": [r.data_classification for r in reqs],
                "capabilities": [SEP.join(r.required_capabilities) for r in reqs],
                "complexity": pa.array([r.complexity for r in reqs], pa.float64()),
                "prompt_chars": [len(r.prompt) for r in reqs],
                "max_output_tokens": [r.max_output_tokens for r in reqs],
                "rec_digest": digests,
            }
        )
    )


def _expected(planner: Planner, req: InferenceRequested) -> tuple[object, int, float]:
    attributes = (
        req.tenant_id, req.feature, req.task_type, req.risk_class, req.data_classification,
        tuple(req.required_capabilities),
    )  # fmt: skip
    key, tokens, c = planner.key(attributes, req.complexity, len(req.prompt), req.max_output_tokens)
    return planner.shape(key) or planner.learn(key, req), tokens, c


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(requests, st.sampled_from([POLICY, TIGHT, None])), min_size=1, max_size=40))
def test_every_row_gets_the_planners_shape_tokens_complexity_and_prices(
    rows: list[tuple[InferenceRequested, RoutingPolicy | None]],
) -> None:
    """Under the recorded policies (one per row, some unknown): each row's shape is the one the
    planner's own key gives it, and the chosen deployment, its estimate and the cheapest option
    are ``cost_micros`` of the shape's prices, ties to the first by id."""
    reqs = [r for r, _ in rows]
    digests = [p.digest if p else "unknown" for _, p in rows]
    known = {p.digest: p for p in (POLICY, TIGHT)}
    planned = plan_rows(_columns(reqs, digests), None, known)
    reference = {d: Planner(p) for d, p in known.items()}
    shapes, tokens, complexity = (
        planned.shape.to_pylist(),
        planned.tokens.to_pylist(),
        planned.complexity.to_pylist(),
    )
    for n, (req, policy) in enumerate(rows):
        if policy is None:
            assert shapes[n] == -1
            continue
        shape, t, c = _expected(reference[policy.digest], req)
        planner, got, got_policy = planned.shapes[shapes[n]]
        assert (got, got_policy, tokens[n], complexity[n]) == (shape, policy, t, c)
        if planned.kinds[shapes[n]] not in (BUDGETED, ESCALATED):
            continue
        out = req.max_output_tokens
        priced = sorted((cost_micros(t, out, i, o), d_id) for i, o, d_id, _ in shape.prices)
        cheapest = min([p for p, _ in priced] + [d.cost_micros(t, out) for d in shape.lower])
        chosen = planned.by_id[shapes[n]][planned.chosen[n].as_py()][2]
        assert (planned.cost[n].as_py(), chosen) == priced[0]
        assert planned.cheapest[n].as_py() == cheapest


@settings(max_examples=20, deadline=None)
@given(st.lists(requests, min_size=1, max_size=30))
def test_a_replay_under_one_policy_plans_every_row_with_it(reqs: list[InferenceRequested]) -> None:
    planned = plan_rows(_columns(reqs, [None] * len(reqs)), TIGHT, None)
    assert all(planned.shapes[s][2] is TIGHT for s in planned.shape.to_pylist())
