"""Synthetic evidence of N decisions, one chunk (one flush) at a time, every column vectorised.

``StoreGenerator`` yields ``Chunk``s: every table's columns but the encrypted content (prompts and
responses, left to ``EncryptJob``s that ``bench._evidence.store`` runs in a worker process), and where
each row goes (topic partition, offset, region). ``_ChunkBuilder`` makes one chunk, table by table:
requests, rejections, decisions (routing, budget, decode strategy, reasons), dispatches, attempts,
outcomes, settlements, then the placement of every row in the topics.

The store is deterministic per seed: every random draw comes from one generator, in a fixed order,
so the steps of ``_ChunkBuilder.build`` must not be reordered. Budgets are not enforced (at this
volume the default policy's daily budgets would deny most requests); the verdict mix is fixed.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bench._evidence.escalations import escalation_tables
from bench._evidence.policy_tables import PolicyTables
from bench._evidence.synthetic import (
    CLASS_W,
    MAX_OUT,
    MS,
    REJECT_SHARE,
    RISK_W,
    SUBJECT_SHARE,
    SUBJECTS_PER_TENANT,
    TENANT_W,
    TIERS,
    TOPIC_OF_TABLE,
    UNKNOWN_FEATURES,
    WRITTEN_TABLES,
    choice,
    const,
    corpus,
    grouped_cumsum,
    hex_ids,
    take,
    ts,
)
from nexuscore._synthetic import CLASSES, RISKS, TASKS
from nexuscore.policy import RoutingPolicy
from nexuscore.projections import SCHEMAS
from nexuscore.transport import DEFAULT_PARTITIONS, Topics


@dataclass
class EncryptJob:
    """What a worker needs to encrypt one content column of one chunk with ``FieldCipher``."""

    keys_dir: str
    column: str
    tenants: list[str]
    tenant_idx: np.ndarray
    subjects: list[str]
    event_ids: pa.Array
    starts: np.ndarray
    lengths: np.ndarray
    corpus_seed: int
    now: datetime


@dataclass
class Chunk:
    """One flush of generated evidence: every column but the encrypted ones, and where rows go."""

    columns: dict[str, dict[str, pa.Array]]
    partition: dict[str, np.ndarray]
    region: dict[str, np.ndarray]
    offset: dict[str, np.ndarray]
    checkpoint: list[dict[str, Any]]
    ranges: dict[tuple[str, int], tuple[int, int]]
    jobs: dict[str, EncryptJob]
    rows: dict[str, int]
    sample_requests: list[str] = field(default_factory=list)


class StoreGenerator:
    """Deterministic (per seed) evidence of ``total`` decisions, one chunk at a time."""

    def __init__(
        self, policy: RoutingPolicy, total: int, chunk: int, seed: int, days: int, start: datetime, keys: Path
    ) -> None:
        self.p = PolicyTables(policy)
        self.digest = policy.digest
        self.version = policy.version
        self.total = total
        self.chunk = chunk
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.start_us = int(start.timestamp() * 1_000_000)
        self.days = days
        span = days * 86_400 * 1_000_000
        self.step_us = span / (total * (1 + REJECT_SHARE))
        self.keys = keys
        self.done = 0  # decisions so far
        self.requests = 0  # requests so far (decisions + rejections)
        self.next_offset: dict[tuple[str, int], int] = defaultdict(int)
        self.carry: dict[str, dict[int, int]] = defaultdict(dict)
        self.day_names = [(start + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(days + 2)]
        self.subjects = [
            [f"{t}:customer-{k:05d}" for k in range(SUBJECTS_PER_TENANT)] for t in self.p.tenants
        ]
        self.now = datetime.now(UTC)

    def __iter__(self) -> Iterator[Chunk]:
        while self.done < self.total:
            n = min(self.chunk, self.total - self.done)
            yield _ChunkBuilder(self, n).build()
            self.done += n


class _ChunkBuilder:
    """One chunk's columns. Each step reads the arrays earlier steps left on ``self`` (named as in
    the tables: ``t_req`` request times, ``d`` the requests that were decided, ``x`` the decisions
    that dispatched, ``xr`` their requests, ...) and adds its table to ``cols``, ``times`` and
    ``tenant_of``."""

    def __init__(self, gen: StoreGenerator, n_dec: int) -> None:
        self.gen, self.rng, self.p = gen, gen.rng, gen.p
        self.n_dec = n_dec
        self.n_rej = int(round(n_dec * REJECT_SHARE))
        self.m = n_dec + self.n_rej
        self.corpus_len = len(corpus(gen.seed))
        self.cols: dict[str, dict[str, pa.Array]] = {}
        self.times: dict[str, np.ndarray] = {}  # event time of every row, per table
        self.tenant_of: dict[str, np.ndarray] = {}  # tenant index of every row, per table
        self.jobs: dict[str, EncryptJob] = {}

    def build(self) -> Chunk:
        self.draw_requests()
        self.requests()
        self.rejections()
        self.route()
        self.budget_and_decode()
        self.decisions(self.reasons())
        self.dispatches()
        self.attempts()
        self.outcomes()
        self.settlements()
        escalation_tables(self)
        return self.place()

    # --- requests --------------------------------------------------------------------------------

    def draw_requests(self) -> None:
        """Every request's attributes: tenant, feature, task, risk, classification, sizes, subject."""
        rng, p, m, gen = self.rng, self.p, self.m, self.gen
        g = gen.requests + np.arange(m)
        self.t_req = gen.start_us + ((g + rng.random(m)) * gen.step_us).astype(np.int64)
        gen.requests += m
        self.tenant = choice(rng, m, TENANT_W)
        self.rejected = np.zeros(m, dtype=bool)
        self.rejected[rng.choice(m, size=self.n_rej, replace=False)] = True
        local_f = (rng.random(m) * p.feature_count[self.tenant]).astype(np.int64)
        self.feat = p.feature_base[self.tenant] + local_f
        self.task = rng.integers(0, len(TASKS), m)
        self.risk = choice(rng, m, RISK_W)
        self.cls = choice(rng, m, CLASS_W)
        self.prompt_chars = np.clip(rng.lognormal(math.log(300), 0.8, m), 20, 12_000).astype(np.int64)
        self.max_out = np.array(MAX_OUT)[rng.integers(0, len(MAX_OUT), m)]
        self.tools = rng.random(m) < 0.1
        self.has_complexity = rng.random(m) < 0.5
        self.complexity = np.round(rng.random(m), 3)
        slo_choice = rng.integers(0, 4, m)  # None, None, 3000, 8000
        self.req_slo = np.where(slo_choice == 2, 3000, 8000)
        self.req_slo_null = slo_choice < 2
        subj = rng.random(m) < SUBJECT_SHARE
        subj_k = rng.integers(0, SUBJECTS_PER_TENANT, m)
        self.subjects = [
            gen.subjects[t][k] if s else ""
            for t, k, s in zip(self.tenant.tolist(), subj_k.tolist(), subj.tolist(), strict=True)
        ]
        self.subject_arr = pa.array(self.subjects, type=pa.string())
        self.req_id = hex_ids(rng, m)
        self.trace = hex_ids(rng, m)
        self.tenant_arr = take(p.tenants, self.tenant)
        self.feature_arr = take(p.feature_names, self.feat)
        self.unknown = rng.integers(0, len(UNKNOWN_FEATURES), m)

    def requests(self) -> None:
        m, tools = self.m, self.tools
        # A rejected request names a feature its tenant does not have.
        feature_req = pc.if_else(
            pa.array(self.rejected), take(UNKNOWN_FEATURES, self.unknown), self.feature_arr
        )
        self.cols["requests"] = {
            "event_id": self.req_id,
            "request_id": self.req_id,
            "tenant_id": self.tenant_arr,
            "occurred_at": ts(self.t_req),
            "producer": const("api-gateway", m),
            "causation_id": const("", m),
            "trace_id": self.trace,
            "policy_digest": const("", m),
            "feature": feature_req,
            "task_type": take(TASKS, self.task),
            "risk_class": take(RISKS, self.risk),
            "data_classification": take(CLASSES, self.cls),
            "prompt_chars": pa.array(self.prompt_chars),
            "max_output_tokens": pa.array(self.max_out.astype(np.int64)),
            "required_capabilities": pa.ListArray.from_arrays(
                pa.array(np.r_[0, np.cumsum(tools)].astype(np.int32)), const("tools", int(tools.sum()))
            ),
            "complexity": pa.array(self.complexity, mask=~self.has_complexity),
            "latency_slo_ms": pa.array(self.req_slo.astype(np.int64), mask=self.req_slo_null),
            "data_subject": self.subject_arr,
        }
        self.times["requests"], self.tenant_of["requests"] = self.t_req, self.tenant
        self.jobs["requests"] = EncryptJob(
            str(self.gen.keys),
            "prompt",
            self.p.tenants,
            self.tenant,
            self.subjects,
            self.req_id,
            self.rng.integers(0, self.corpus_len - 12_001, m),
            self.prompt_chars,
            self.gen.seed,
            self.gen.now,
        )

    def rejections(self) -> None:
        r, n_rej, gen = np.flatnonzero(self.rejected), self.n_rej, self.gen
        t_rej = self.t_req[r] + 1 * MS
        rej_feature = take(UNKNOWN_FEATURES, self.unknown[r])
        self.cols["rejections"] = {
            "event_id": hex_ids(self.rng, n_rej),
            "request_id": take(self.req_id, r),
            "tenant_id": take(self.tenant_arr, r),
            "occurred_at": ts(t_rej),
            "producer": const("nexuscore.decider", n_rej),
            "causation_id": take(self.req_id, r),
            "trace_id": take(self.trace, r),
            "policy_digest": const(gen.digest, n_rej),
            "reason_code": const("unknown_feature", n_rej),
            "reason": pc.binary_join_element_wise(
                "feature '",
                rej_feature,
                "' is not configured for tenant '",
                take(self.tenant_arr, r),
                "'",
                "",
            ),
            "policy_version": const(gen.version, n_rej),
        }
        self.times["rejections"], self.tenant_of["rejections"] = t_rej, self.tenant[r]

    # --- decisions -------------------------------------------------------------------------------

    def _rule_hits(self, when: Any, d: np.ndarray, capabilities: bool) -> np.ndarray:
        """Which decided requests a rule's (or an escalation's) ``when`` matches."""
        hit = np.ones(self.n_dec, dtype=bool)
        if when.task_types:
            hit &= np.isin(self.task[d], [TASKS.index(x) for x in when.task_types])
        if when.risk_classes:
            hit &= np.isin(self.risk[d], [RISKS.index(x) for x in when.risk_classes])
        if capabilities and when.capabilities:
            hit &= self.tools[d] if "tools" in when.capabilities else False
        if when.min_complexity is not None:
            hit &= self.d_complexity >= when.min_complexity
        return hit

    def route(self) -> None:
        """Floor tier from the routing rules, escalations, the chosen deployment, the verdict."""
        p, n_dec = self.p, self.n_dec
        d = self.d = np.flatnonzero(~self.rejected)
        self.dt = self.tenant[d]
        self.combo = self.cls[d] * 4 + self.dt
        self.d_complexity = np.where(
            self.has_complexity[d], self.complexity[d], np.round(self.rng.random(n_dec), 3)
        )
        floor = self.floor = np.zeros(n_dec, dtype=np.int64)
        fired = self.fired = np.full(n_dec, -1)
        for i, rule in enumerate(p.rules):
            hit = self._rule_hits(rule.when, d, capabilities=True)
            rank = TIERS.index(rule.min_tier)
            better = hit & (rank > floor)
            floor[better], fired[better] = rank, i
        self.mid = (self.d_complexity >= p.policy.routing.mid_complexity).astype(np.int64)
        self.preferred = np.maximum(floor, self.mid)
        chosen = p.chosen[self.combo, self.preferred, self.tools[d].astype(np.int64)]
        escalated = np.zeros(n_dec, dtype=bool)
        esc_rule = self.esc_rule = np.full(n_dec, -1)
        for i, e in enumerate(p.escalation.values()):
            hit = self._rule_hits(e.when, d, capabilities=False)
            new = hit & ~escalated
            escalated |= hit
            esc_rule[new] = i
        self.denied = chosen < 0
        self.escalated = escalated & ~self.denied
        self.dispatch = ~self.denied & ~self.escalated
        self.verdict = np.where(self.dispatch, 0, np.where(self.denied, 1, 2))
        self.dep = np.where(self.denied, 0, chosen)

    def budget_and_decode(self) -> None:
        """Cost estimate, committed budget before each decision, state version; decode strategy."""
        p, d, dep, dispatch, carry = self.p, self.d, self.dep, self.dispatch, self.gen.carry
        self.tokens_in = np.maximum(1, self.prompt_chars[d] // 4)
        estimate = -(-(self.tokens_in * p.dep_in[dep] + self.max_out[d] * p.dep_out[dep]) // 1000)
        self.estimate = np.where(self.denied, 0, estimate)
        self.t_dec = self.t_req[d] + 1 * MS
        self.day = (self.t_dec - self.gen.start_us) // (86_400 * 1_000_000)
        tday = self.dt.astype(np.int64) * 1000 + self.day
        fday = self.feat[d].astype(np.int64) * 1000 + self.day
        reserved = self.estimate * dispatch
        self.committed_t = grouped_cumsum(tday, reserved, carry["tenant_committed"]) - reserved
        self.committed_f = grouped_cumsum(fday, reserved, carry["feature_committed"]) - reserved
        self.version = (
            grouped_cumsum(self.dt.astype(np.int64), dispatch.astype(np.int64), carry["version"]) * 2
        )
        # Decode: the first strategy whose prediction fits the SLO, else the fastest.
        slo = self.slo = np.where(self.req_slo_null[d], p.feature_slo[self.feat[d]], self.req_slo[d])
        pred = np.ceil(p.dep_ttft[dep] + p.dep_mspt[dep] * self.max_out[d][:, None]).astype(np.int64)
        two = p.dep_nstrat[dep] > 1
        fit0 = pred[:, 0] <= slo
        fit1 = two & (pred[:, 1] <= slo)
        self.fits = fit0 | fit1
        pick = np.where(fit0, 0, np.where(fit1, 1, np.where(two & (pred[:, 1] < pred[:, 0]), 1, 0)))
        self.predicted = pred[np.arange(self.n_dec), pick]
        self.strategy = p.dep_strat[dep, pick]

    def _escalation_or_rule(self) -> list[pa.Array]:
        """Reason slot 1: an escalation rule, else the routing rule that set the floor, else a note
        on the complexity."""
        p, n_dec = self.p, self.n_dec
        mid = p.policy.routing.mid_complexity
        cstr = pc.cast(pa.array(self.d_complexity), pa.string())
        suggests = take([f" < {mid} suggests small", f" >= {mid} suggests mid"], self.mid)
        note = pc.binary_join_element_wise("complexity ", cstr, suggests, "")
        rule_ids = [r_.id for r_ in p.rules] or ["-"]
        rule_reason = [r_.reason or r_.min_tier for r_ in p.rules] or ["-"]
        esc_ids = list(p.escalation) or ["-"]
        esc_reason = [e.reason for e in p.escalation.values()] or ["-"]
        esc_at, rule_at = np.maximum(self.esc_rule, 0), np.maximum(self.fired, 0)
        is_esc, is_rule = self.esc_rule >= 0, self.fired >= 0
        kind1 = np.where(self.escalated, 0, np.where(is_rule, 1, 2))
        return [
            take(["escalation", "routing", "routing"], kind1),
            take(["rule_fired", "rule_fired", "note"], kind1),
            pc.if_else(
                pa.array(self.escalated),
                take(esc_ids, esc_at),
                pc.if_else(pa.array(is_rule), take(rule_ids, rule_at), const("complexity", n_dec)),
            ),
            pc.if_else(
                pa.array(self.escalated & is_esc),
                take(esc_reason, esc_at),
                pc.if_else(pa.array(is_rule), take(rule_reason, rule_at), note),
            ),
        ]

    def reasons(self) -> pa.Array:
        """2 to 4 reasons per decision: residency, escalation or rule, a rejected alternative, decode."""
        p, n_dec = self.p, self.n_dec
        k = np.where(self.dispatch, self.rng.integers(2, 5, n_dec), self.rng.integers(2, 4, n_dec))
        offsets = np.r_[0, np.cumsum(k)].astype(np.int32)
        rows0 = np.arange(n_dec)
        residency = [
            const("residency", n_dec),
            const("rule_fired", n_dec),
            take(p.res_rule, self.combo),
            take(p.res_detail, self.combo),
        ]
        slots: list[tuple[np.ndarray, list[pa.Array]]] = [
            (rows0, residency),
            (rows0, self._escalation_or_rule()),
        ]
        rows2 = np.flatnonzero(k >= 3)
        alt = np.array(self.combo * len(TIERS) + self.preferred)[rows2]
        slots.append((rows2, [take([a[i] for a in p.alt], alt) for i in range(4)]))
        rows3 = np.flatnonzero(k >= 4)
        predicts = pc.binary_join_element_wise(
            "predicts ",
            pc.cast(pa.array(self.predicted[rows3]), pa.string()),
            " ms against an SLO of ",
            pc.cast(pa.array(self.slo[rows3]), pa.string()),
            " ms",
            "",
        )
        decode = [
            const("decode", len(rows3)),
            const("note", len(rows3)),
            take(p.strategy_names, self.strategy[rows3]),
            predicts,
        ]
        slots.append((rows3, decode))
        return _list_of_reasons(slots, offsets)

    def _verdict_reason(self) -> pa.Array:
        p = self.p
        esc_ids = list(p.escalation) or ["-"]
        esc_reason = [e.reason for e in p.escalation.values()] or ["-"]
        esc_at = np.maximum(self.esc_rule, 0)
        none_eligible = pc.binary_join_element_wise(
            "no_eligible_deployment: no deployment in ",
            take([", ".join(a) for a in p.res_allowed], self.combo),
            " meets tier ",
            take(TIERS, self.preferred),
            " and the request's needs",
            "",
        )
        return pc.if_else(
            pa.array(self.dispatch),
            take(p.verdict_reason_dispatch, self.dep),
            pc.if_else(
                pa.array(self.escalated),
                pc.binary_join_element_wise(take(esc_ids, esc_at), take(esc_reason, esc_at), ": "),
                none_eligible,
            ),
        )

    def decisions(self, reasons: pa.Array) -> None:
        p, gen, d, dt, n_dec, combo = self.p, self.gen, self.d, self.dt, self.n_dec, self.combo
        self.dec_id = hex_ids(self.rng, n_dec)
        d_req = take(self.req_id, d)
        verdict_reason = self._verdict_reason()
        null_str = pa.nulls(n_dec, pa.string())
        denied, nd = pa.array(self.denied), ~self.dispatch
        self.cols["decisions"] = {
            "event_id": self.dec_id,
            "request_id": d_req,
            "tenant_id": take(self.tenant_arr, d),
            "occurred_at": ts(self.t_dec),
            "producer": const("nexuscore.decider", n_dec),
            "causation_id": d_req,
            "trace_id": take(self.trace, d),
            "policy_digest": const(gen.digest, n_dec),
            "feature": take(self.feature_arr, d),
            "verdict": take(["dispatch", "denied", "escalated"], self.verdict),
            "verdict_reason": verdict_reason,
            "policy_version": const(gen.version, n_dec),
            "home_region": take(p.regions, p.home[dt]),
            "allowed_regions": take(pa.array(p.res_allowed, type=pa.list_(pa.string())), combo),
            "residency_rule": take(p.res_rule, combo),
            "transfer_basis": take(p.res_basis, combo),
            "complexity": pa.array(self.d_complexity),
            "floor_tier": take(TIERS, self.floor),
            "preferred_tier": take(TIERS, self.preferred),
            "tier": pc.if_else(denied, null_str, take(TIERS, p.dep_tier[self.dep])),
            "deployment_id": pc.if_else(denied, null_str, take(p.dep_ids, self.dep)),
            "eligible": take(
                pa.array(p.eligible, type=pa.list_(pa.string())), combo + 16 * self.tools[d].astype(np.int64)
            ),
            "budget_action": take(["reserved", "not_applicable"], nd.astype(np.int64)),
            "budget_window": take(gen.day_names, self.day),
            "estimated_cost_micros": pa.array(self.estimate.astype(np.int64)),
            "tenant_budget_micros": pa.array(p.tenant_budget[dt].astype(np.int64)),
            "tenant_committed_micros": pa.array(self.committed_t),
            "feature_budget_micros": pa.array(p.feature_budget[self.feat[d]].astype(np.int64)),
            "feature_committed_micros": pa.array(self.committed_f),
            "decode_strategy": pa.array(
                np.array(p.strategy_names, dtype=object)[self.strategy], mask=nd, type=pa.string()
            ),
            "latency_slo_ms": pa.array(self.slo.astype(np.int64), mask=nd),
            "predicted_latency_ms": pa.array(self.predicted, mask=nd),
            "fits_slo": pa.array(self.fits, mask=nd),
            "state_version": pa.array(self.version),
            "reasons": reasons,
        }
        self.times["decisions"], self.tenant_of["decisions"] = self.t_dec, dt

    # --- what happens to a dispatched request ----------------------------------------------------

    def dispatches(self) -> None:
        p, gen = self.p, self.gen
        x = self.x = np.flatnonzero(self.dispatch)  # index into decisions
        n_x = self.n_x = len(x)
        xr = self.xr = self.d[x]  # index into requests
        xdep = self.xdep = self.dep[x]
        self.t_disp = self.t_dec[x] + 200  # 0.2 ms after the decision
        self.disp_id = hex_ids(self.rng, n_x)
        self.cols["dispatches"] = {
            "event_id": self.disp_id,
            "request_id": take(self.req_id, xr),
            "tenant_id": take(self.tenant_arr, xr),
            "occurred_at": ts(self.t_disp),
            "producer": const("nexuscore.decider", n_x),
            "causation_id": take(self.dec_id, x),
            "trace_id": take(self.trace, xr),
            "policy_digest": const(gen.digest, n_x),
            "feature": take(self.feature_arr, xr),
            "deployment_id": take(p.dep_ids, xdep),
            "provider": take(p.dep_provider, xdep),
            "model": take(p.dep_model, xdep),
            "region": take(p.dep_region, xdep),
            "allowed_regions": take(self.cols["decisions"]["allowed_regions"], x),
            "decode_strategy": take(p.strategy_names, self.strategy[x]),
            "max_output_tokens": pa.array(self.max_out[xr].astype(np.int64)),
            "estimated_cost_micros": pa.array(self.estimate[x].astype(np.int64)),
            "requested_at": ts(self.t_req[xr]),
            "data_subject": take(self.subject_arr, xr),
        }
        self.times["dispatches"], self.tenant_of["dispatches"] = self.t_disp, self.tenant[xr]
        self.disp_part = self.rng.integers(0, DEFAULT_PARTITIONS, n_x)  # keyed by request id: spread evenly

    def _draw_attempts(self) -> None:
        """Most calls succeed at once; some retry; a few fail for good."""
        rng, n_x, xr, max_out = self.rng, self.n_x, self.xr, self.max_out
        n_att = self.n_att = np.where(rng.random(n_x) < 0.96, 1, np.where(rng.random(n_x) < 0.875, 2, 3))
        self.failed = (n_att == 3) & (rng.random(n_x) < 0.5)
        att_of = self.att_of = np.repeat(np.arange(n_x), n_att)
        first_of = np.r_[0, np.cumsum(n_att)[:-1]]
        self.att_no = np.arange(len(att_of)) - first_of[att_of] + 1
        last = self.att_no == n_att[att_of]
        self.ok = last & ~self.failed[att_of]
        n_a = self.n_a = len(att_of)
        out_tokens = np.maximum(1, (max_out[xr] * rng.beta(2.0, 3.0, n_x)).astype(np.int64))
        self.out_tokens = np.where(self.failed, 0, out_tokens)
        ok_latency = (
            self.predicted[self.x] * rng.uniform(0.5, 1.3, n_x) * np.maximum(self.out_tokens, 1) / max_out[xr]
        )
        att_latency = self.att_latency = np.where(
            self.ok, ok_latency[att_of], rng.uniform(40, 2000, n_a)
        ).round(3)
        att_end = (
            self.t_disp[att_of]
            + (np.cumsum(att_latency) - (np.cumsum(att_latency)[first_of] - att_latency[first_of])[att_of])
            * MS
        )
        self.att_end = att_end.astype(np.int64)
        self.http = np.where(self.ok, 200, np.where(rng.random(n_a) < 0.7, 503, 429))

    def attempts(self) -> None:
        self._draw_attempts()
        p, n_a, att_of, ok = self.p, self.n_a, self.att_of, self.ok
        err_text = take(
            ["", "HTTP 503: upstream overloaded", "HTTP 429: rate limited"],
            np.where(ok, 0, np.where(self.http == 503, 1, 2)),
        )
        att_req = self.xr[att_of]
        self.cols["attempts"] = {
            "event_id": hex_ids(self.rng, n_a),
            "request_id": take(self.req_id, att_req),
            "tenant_id": take(self.tenant_arr, att_req),
            "occurred_at": ts(self.att_end),
            "producer": const("nexuscore.worker", n_a),
            "causation_id": take(self.disp_id, att_of),
            "trace_id": take(self.trace, att_req),
            "policy_digest": const(self.gen.digest, n_a),
            "attempt": pa.array(self.att_no.astype(np.int32)),
            "deployment_id": take(p.dep_ids, self.xdep[att_of]),
            "region": take(p.dep_region, self.xdep[att_of]),
            "status": take(["error", "ok"], ok.astype(np.int64)),
            "http_status": pa.array(self.http.astype(np.int32)),
            "latency_ms": pa.array(self.att_latency),
            "retryable": pa.array(~ok),
            "error": err_text,
        }
        self.times["attempts"], self.tenant_of["attempts"] = self.att_end, self.tenant[att_req]

    def outcomes(self) -> None:
        p, n_x, xr, xdep, failed, out_tokens = (
            self.p,
            self.n_x,
            self.xr,
            self.xdep,
            self.failed,
            self.out_tokens,
        )
        t_out = self.t_out = self.att_end[np.cumsum(self.n_att) - 1] + 100
        in_tokens = np.where(failed, 0, self.tokens_in[self.x])
        self.cost = -(-(in_tokens * p.dep_in[xdep] + out_tokens * p.dep_out[xdep]) // 1000)
        total_latency = (t_out - self.t_disp) / MS
        self.out_id = hex_ids(self.rng, n_x)
        self.cols["outcomes"] = {
            "event_id": self.out_id,
            "request_id": take(self.req_id, xr),
            "tenant_id": take(self.tenant_arr, xr),
            "occurred_at": ts(t_out),
            "producer": const("nexuscore.worker", n_x),
            "causation_id": self.disp_id,
            "trace_id": take(self.trace, xr),
            "policy_digest": const(self.gen.digest, n_x),
            "status": take(["answered", "failed"], failed.astype(np.int64)),
            "feature": take(self.feature_arr, xr),
            "deployment_id": take(p.dep_ids, xdep),
            "model": take(p.dep_model, xdep),
            "model_version": pc.if_else(pa.array(failed), const("", n_x), take(p.dep_version, xdep)),
            "region": take(p.dep_region, xdep),
            "attempts": pa.array(self.n_att.astype(np.int32)),
            "input_tokens": pa.array(in_tokens.astype(np.int64)),
            "output_tokens": pa.array(out_tokens.astype(np.int64)),
            "cost_micros": pa.array(self.cost.astype(np.int64)),
            "latency_ms": pa.array(total_latency.round(3)),
            "finish_reason": take(
                ["stop", "length", "error"],
                np.where(failed, 2, np.where(out_tokens >= self.max_out[xr], 1, 0)),
            ),
            "error": pc.if_else(
                pa.array(failed),
                const("3 attempts failed; last: HTTP 503: upstream overloaded", n_x),
                const("", n_x),
            ),
            "data_subject": take(self.subject_arr, xr),
        }
        self.times["outcomes"], self.tenant_of["outcomes"] = t_out, self.tenant[xr]
        self.jobs["outcomes"] = EncryptJob(
            str(self.gen.keys),
            "response",
            p.tenants,
            self.tenant[xr],
            [self.subjects[i] for i in xr.tolist()],
            self.out_id,
            self.rng.integers(0, self.corpus_len - 12_001, n_x),
            np.where(failed, 0, out_tokens * 4),
            self.gen.seed,
            self.gen.now,
        )

    def settlements(self) -> None:
        n_x, x, xr, gen = self.n_x, self.x, self.xr, self.gen
        t_set = self.t_out + 300
        xt = self.tenant[xr].astype(np.int64)
        spent_t = grouped_cumsum(xt * 1000 + self.day[x], self.cost, gen.carry["tenant_spent"])
        spent_f = grouped_cumsum(
            self.feat[xr].astype(np.int64) * 1000 + self.day[x], self.cost, gen.carry["feature_spent"]
        )
        self.cols["settlements"] = {
            "event_id": hex_ids(self.rng, n_x),
            "request_id": take(self.req_id, xr),
            "tenant_id": take(self.tenant_arr, xr),
            "occurred_at": ts(t_set),
            "producer": const("nexuscore.decider", n_x),
            "causation_id": self.out_id,
            "trace_id": take(self.trace, xr),
            "policy_digest": const(gen.digest, n_x),
            "feature": take(self.feature_arr, xr),
            "budget_window": take(gen.day_names, self.day[x]),
            "reserved_micros": pa.array(self.estimate[x].astype(np.int64)),
            "actual_micros": pa.array(self.cost.astype(np.int64)),
            "tenant_spent_micros": pa.array(spent_t),
            "feature_spent_micros": pa.array(spent_f),
            "state_version": pa.array(self.version[x] + 1),
        }
        self.times["settlements"], self.tenant_of["settlements"] = t_set, self.tenant[xr]

    # --- where every row goes: topic, partition (by key), offset (by time within the chunk) -------

    def _offsets(
        self, kind: str, parts: dict[str, np.ndarray], offsets_of: dict[str, np.ndarray]
    ) -> list[tuple[str, int, int, int]]:
        """Offsets of the rows of every table on topic ``kind`` (into ``offsets_of``), in time order
        per partition after what earlier chunks wrote; (topic, partition, start, end) per partition."""
        topic, next_offset = getattr(Topics(), kind), self.gen.next_offset
        tables = [tb for tb, k_ in TOPIC_OF_TABLE.items() if k_ == kind]
        tt = np.concatenate([self.times[tb] for tb in tables])
        pp = np.concatenate([parts[tb] for tb in tables])
        order = np.lexsort((tt, pp))
        sp = pp[order]
        counts = np.bincount(pp, minlength=DEFAULT_PARTITIONS)
        first_index = np.r_[0, np.cumsum(counts)[:-1]]
        base = np.array([next_offset[(topic, q)] for q in range(DEFAULT_PARTITIONS)], dtype=np.int64)
        off = np.empty(len(tt), dtype=np.int64)
        off[order] = np.arange(len(sp)) - first_index[sp] + base[sp]
        at = 0
        for tb in tables:
            offsets_of[tb] = off[at : at + len(self.times[tb])]
            at += len(self.times[tb])
        spans = []
        for q in range(DEFAULT_PARTITIONS):
            if counts[q]:
                start = next_offset[(topic, q)]
                spans.append((topic, q, start, start + int(counts[q])))
                next_offset[(topic, q)] = start + int(counts[q])
        return spans

    def place(self) -> Chunk:
        p, topics = self.p, Topics()
        parts = {
            tb: self.disp_part if tb == "dispatches" else p.partition[t] for tb, t in self.tenant_of.items()
        }
        regs = {tb: p.home[t] for tb, t in self.tenant_of.items()}
        offsets_of: dict[str, np.ndarray] = {}
        checkpoint: list[dict[str, Any]] = []
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for kind in dict.fromkeys(TOPIC_OF_TABLE.values()):
            for topic, q, start, end in self._offsets(kind, parts, offsets_of):
                ranges[(topic, q)] = (start, end)
                checkpoint.append(
                    {
                        "topic": topic,
                        "partition": q,
                        "start": start,
                        "end": end,
                        "events": end - start,
                        "duplicates": 0,
                        "undecodable": 0,
                    }
                )
        for table in WRITTEN_TABLES:
            c = self.cols[table]
            c["data_region"] = take(p.regions, regs[table])
            c["src_topic"] = const(getattr(topics, TOPIC_OF_TABLE[table]), len(offsets_of[table]))
            c["src_partition"] = pa.array(parts[table].astype(np.int32))
            c["src_offset"] = pa.array(offsets_of[table])
        picked = self.rng.choice(self.n_x, size=min(self.n_x, 20), replace=False)
        return Chunk(
            columns=self.cols,
            partition=parts,
            region=regs,
            offset=offsets_of,
            checkpoint=sorted(checkpoint, key=lambda e: (e["topic"], e["partition"])),
            ranges=ranges,
            jobs=self.jobs,
            rows={tb: len(offsets_of[tb]) for tb in WRITTEN_TABLES},
            sample_requests=[self.req_id[int(i)].as_py() for i in self.xr[picked]],
        )


def _list_of_reasons(slots: list[tuple[np.ndarray, list[pa.Array]]], offsets: np.ndarray) -> pa.Array:
    """The ``reasons`` list column from its slots: slot ``s`` holds the ``s``-th reason (kind, code,
    subject, detail) of the decisions in its rows; ``offsets`` are where each decision's list starts."""
    dest = np.concatenate([offsets[rows] + s for s, (rows, _) in enumerate(slots)])
    perm = np.empty(len(dest), dtype=np.int64)
    perm[dest] = np.arange(len(dest))
    seq = np.concatenate([np.full(len(rows), s, dtype=np.int32) for s, (rows, _) in enumerate(slots)])
    children = [pa.array(seq[perm], type=pa.int32())] + [
        pa.concat_arrays([arrs[i] for _, arrs in slots]).take(pa.array(perm)) for i in range(4)
    ]
    return pa.ListArray.from_arrays(
        pa.array(offsets),
        pa.StructArray.from_arrays(
            children, fields=list(SCHEMAS["decisions"].field("reasons").type.value_type)
        ),
    )
