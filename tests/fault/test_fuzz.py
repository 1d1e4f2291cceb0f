"""Trust under attack: FUZZ_MESSAGES hostile messages (default 10,000) interleaved with FUZZ_REQUESTS
valid requests (default 2,000) on a live pipeline (its own local KRaft broker; simulated provider,
decider, worker and projector as child processes), spread over every input topic — requests,
outcomes, reviews, governance, circuits, dispatch — from a seeded RNG (FUZZ_SEED).

The hostile messages (``tests/fault/_hostile.py``): random bytes; truncated, bit-flipped and
extended copies of valid Avro events; empty values and tombstones; a few messages just under the
broker's 1 MiB limit; wrong keys and no keys; events of a type that does not belong on the topic;
schema-valid requests with hostile fields (empty, 129-character and control-character request ids,
out-of-range fields, unknown task types, tenants and features, 600 KiB prompts of 4-byte UTF-8
characters); forged, stale and replayed signed acts — reviews of real escalations unsigned, signed
by an unknown key, in another reviewer's name, for the wrong escalation, signed long ago, forged
deadline timeouts, reviews of requests never escalated, a genuine review re-published after it was
applied; kill switches unsigned, signed by a non-operator or an unknown key, altered after signing,
in another's name, stale, future-dated, of an unknown scope, genuine ones replayed (the genuine
switches only ever target a tenant no valid request names); promotions unsigned, signed by a
non-operator or an unknown key, with a wrong policy_version, with a 5,000-level-deep YAML document,
signed long ago. A stand-in review desk approves or denies each escalation (after the forgeries
against it were published).

On the internal topics (outcomes, dispatch, circuits) only bytes-level hostility is generated
(undecodable, truncated, extended, oversized, wrong or no keys, tombstones, events of another
type): a schema-valid forgery of a stage's own output (an OutcomeRecorded, DispatchRequested or
CircuitStateChanged that decodes and is correctly keyed) cannot be told from that stage's output by
anyone reading the topic; in production Kafka ACLs keep producers off those topics
(``tests/integration/test_acl.py``).

Pass conditions, from the evidence only:

1. no stage exits (checked throughout; at the end every service still runs);
2. every valid request has exactly one terminal state;
3. every hostile message is accounted for: a ``deadletters`` row at its (topic, partition, offset),
   or a ``refusals`` row there, or (schema-valid requests only) a ``rejections`` row for its
   (tenant, request id) with a reason; any other is listed by kind, with what the evidence holds
   at its position;
4. ``nexuscore.projections.verify`` reports no fatal finding;

and forged acts have no effect: no valid request decided under a kill switch, every escalation
ended by a genuine review, no hostile message in ``kill_switches`` or ``policy_events``.

Slow (minutes): ``make fuzz`` (``FUZZ_MESSAGES=1000 FUZZ_REQUESTS=300 make fuzz`` for a short run).
The figures go to ``bench/results/fuzz.{md,json}``; the services' logs stay in the test's temporary
folder (printed).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import subprocess
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaProducer

from nexuscore._broker import REPO_ROOT, LocalKafka, ensure_kafka_jars
from nexuscore._demo import Pipeline
from nexuscore._devkeys import DevKeys, dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import synthetic_requests
from nexuscore.core import derive_id
from nexuscore.kernel.errors import NexusError
from nexuscore.kernel.signing import load_public_key
from nexuscore.policy import DEFAULT_POLICY_PATH, load_policy
from nexuscore.projections import SCHEMAS, EvidenceStore, verify
from nexuscore.schemas import AvroCodec, InferenceRequested, ReviewRecorded
from nexuscore.services import review_event
from nexuscore.transport import Topics, ensure_topics, start_client
from tests.fault._hostile import DECIDER, GHOST_TENANT, ROLES, Factory, Genuine, Hostile, Keys, topic_of

# Minutes of load: its own deadline, far above a normal run.
pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(3600)]

MESSAGES = int(os.environ.get("FUZZ_MESSAGES", "10000"))
REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "2000"))
SEED = int(os.environ.get("FUZZ_SEED", "20261125"))
WAVES = 10
# A fixed few of the heaviest messages, so the run stays fast.
NEAR_LIMIT = 20 if MESSAGES >= 5000 else 6
HUGE_PROMPTS = 10 if MESSAGES >= 5000 else 3
POLL_S = 3.0
RESULTS = REPO_ROOT / "bench" / "results"
READY = {
    "decider": "decider ready",
    "worker": "worker ready",
    "projector": "projector ready",
}


# --- publishing ----------------------------------------------------------------------------------


class Wire:
    """One producer for everything the run publishes; records where the broker put each message."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.bootstrap, self.topics = bootstrap, topics
        self.producer: AIOKafkaProducer | None = None
        self.codec = AvroCodec()

    async def start(self) -> None:
        self.producer = AIOKafkaProducer(  # in the running loop: aiokafka takes it at construction
            bootstrap_servers=self.bootstrap,
            acks="all",
            enable_idempotence=True,
            linger_ms=2,
            # The default (1 MiB) already takes the near-limit messages; the broker is the judge.
            max_request_size=1_048_576,
            request_timeout_ms=60_000,
        )
        await start_client(self.producer, self.bootstrap)

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()

    async def send(self, messages: list[Hostile | Genuine | InferenceRequested]) -> None:
        """Publish in order; fill in each hostile or genuine message's topic, partition and offset."""
        assert self.producer is not None, "start() first"
        futures = []
        for m in messages:
            key: bytes | None
            value: bytes | None
            if isinstance(m, InferenceRequested):  # as nexuscore._synthetic.publish does
                topic, key, value = self.topics.requests, m.tenant_id.encode(), self.codec.encode(m)
            else:
                topic, key, value = topic_of(self.topics, m.role), m.key, m.value
            futures.append(await self.producer.send(topic, value, key=key))
        for m, future in zip(messages, futures, strict=True):
            meta = await future
            if not isinstance(m, InferenceRequested):
                m.topic, m.partition, m.offset = meta.topic, meta.partition, meta.offset
                if isinstance(m, Hostile):
                    m.value = None  # its size is kept; the bytes are on the topic


# --- the review desk -------------------------------------------------------------------------------

_PENDING_SQL = """
SELECT d.tenant_id, d.request_id, d.event_id, d.review_deadline FROM decisions d
JOIN escalations e ON e.tenant_id = d.tenant_id AND e.request_id = d.request_id
WHERE d.verdict = 'escalated' AND e.review_state = 'pending'
ORDER BY d.occurred_at
"""


class Desk:
    """Stands in for the reviewers. For each escalation found pending in the evidence it first
    publishes forgeries against it (and a signed review of a request never escalated), then the
    genuine review (bob's key: approved or denied by the request id's hash); once the escalation's
    resolution is in the evidence, it publishes the genuine review again, unchanged."""

    def __init__(self, factory: Factory, keys: Keys, wire: Wire, rng: random.Random) -> None:
        self.f, self.keys, self.wire, self.rng = factory, keys, wire, rng
        self.reviewed: set[tuple[str, str]] = set()
        self.genuine: dict[str, Genuine] = {}  # by review event id
        self.approved = 0
        self.denied = 0
        self.replayed: set[str] = set()
        self.hostile: list[Hostile] = []
        self.never_escalated_used: set[tuple[str, str]] = set()

    async def step(self, store: EvidenceStore) -> int:
        """Review what is pending, replay what was applied; returns how many messages it sent."""
        sent = await self._review(store)
        return sent + await self._replay(store)

    async def _review(self, store: EvidenceStore) -> int:
        pending = [
            r
            for r in store.query(_PENDING_SQL).to_pylist()
            if (r["tenant_id"], r["request_id"]) not in self.reviewed
        ]
        if not pending:
            return 0
        dispatched = [
            r
            for r in store.query(
                "SELECT tenant_id, request_id, event_id FROM decisions WHERE verdict = 'dispatch' "
                "ORDER BY occurred_at DESC LIMIT 500"
            ).to_pylist()
            if (r["tenant_id"], r["request_id"]) not in self.never_escalated_used
        ]
        now = datetime.now(UTC)
        forged: list[Hostile] = []
        genuine: list[Genuine] = []
        for i, row in enumerate(pending):
            others = [p["event_id"] for p in pending if p["event_id"] != row["event_id"]]
            wrong = others[0] if others else derive_id("fuzz", "no-such-escalation", row["event_id"])
            forged += self._forgeries(row, wrong, now + timedelta(microseconds=10 * i))
            if dispatched:
                target = dispatched.pop(self.rng.randrange(len(dispatched)))
                self.never_escalated_used.add((target["tenant_id"], target["request_id"]))
                forged.append(self._review_of(target, "approval of a request never escalated (signed by a reviewer)",
                                              now, key=self.keys.reviewer, reviewer=self.keys.reviewer_name))  # fmt: skip
            approve = int(hashlib.sha256(row["request_id"].encode()).hexdigest(), 16) % 2 == 0
            action = "approved" if approve else "denied"
            event = review_event(
                row["request_id"], row["tenant_id"], row["event_id"], action,
                "checked against the file" if approve else "not for a model: handled by phone",
                self.keys.reviewer, self.keys.reviewer_name, now + timedelta(microseconds=10 * i + 9),
            )  # fmt: skip
            genuine.append(
                Genuine(
                    f"genuine review ({action})",
                    "reviews",
                    event.tenant_id.encode(),
                    self.f.encode(event),
                    event.event_id,
                )
            )
            self.approved += approve
            self.denied += not approve
            self.reviewed.add((row["tenant_id"], row["request_id"]))
        # The forgeries reach each escalation's decider before the genuine review (same partition).
        await self.wire.send(list(forged))
        await self.wire.send(list(genuine))
        self.hostile += forged
        self.genuine.update((g.event_id, g) for g in genuine)
        return len(forged) + len(genuine)

    def _review_of(
        self,
        row: dict[str, Any],
        kind: str,
        now: datetime,
        *,
        key: Any,
        reviewer: str,
        escalation: str | None = None,
    ) -> Hostile:
        event = review_event(
            row["request_id"], row["tenant_id"], escalation or row["event_id"], "approved", "approve it",
            key, reviewer, now,
        )  # fmt: skip
        return Hostile(kind, "reviews", event.tenant_id.encode(), self.f.encode(event), "refusal")

    def _forgeries(self, row: dict[str, Any], wrong_escalation: str, now: datetime) -> list[Hostile]:
        k = self.keys
        us = timedelta(microseconds=1)
        unsigned = review_event(
            row["request_id"],
            row["tenant_id"],
            row["event_id"],
            "approved",
            "approve it",
            k.reviewer,
            k.reviewer_name,
            now,
        )
        unsigned = msgspec.structs.replace(unsigned, key_id="", signature="")
        timeout = ReviewRecorded(
            event_id=derive_id("fuzz", row["tenant_id"], row["request_id"], "forged-timeout"),
            request_id=row["request_id"],
            tenant_id=row["tenant_id"],
            occurred_at=now,
            producer=DECIDER,
            causation_id=row["event_id"],
            action="timed_out",
            reviewer=DECIDER,
            reason="no review before the deadline",
            deadline=row["review_deadline"],
        )
        key = row["tenant_id"].encode()
        return [
            Hostile(
                "unsigned approval of a real escalation", "reviews", key, self.f.encode(unsigned), "refusal"
            ),
            self._review_of(
                row,
                "approval of a real escalation by an unknown key",
                now + us,
                key=k.stranger,
                reviewer="mallory@evil",
            ),
            self._review_of(
                row,
                "approval in another reviewer's name",
                now + 2 * us,
                key=k.reviewer,
                reviewer=k.operator_name,
            ),
            self._review_of(
                row,
                "approval for the wrong escalation (causation_id)",
                now + 3 * us,
                key=k.reviewer,
                reviewer=k.reviewer_name,
                escalation=wrong_escalation,
            ),  # fmt: skip
            self._review_of(
                row,
                "stale approval (signed long ago)",
                now - timedelta(minutes=20),
                key=k.reviewer,
                reviewer=k.reviewer_name,
            ),
            Hostile("forged timeout before the deadline", "reviews", key, self.f.encode(timeout), "refusal"),
        ]

    async def _replay(self, store: EvidenceStore) -> int:
        todo = [i for i in self.genuine if i not in self.replayed]
        if not todo:
            return 0
        applied = {
            r["review_event_id"]
            for r in store.query(
                "SELECT DISTINCT review_event_id FROM resolutions WHERE list_contains($ids, review_event_id)",
                {"ids": todo},
            ).to_pylist()
        }
        replays = [
            Hostile("genuine review re-published after it was applied", "reviews", g.key, g.value, "refusal")
            for i, g in self.genuine.items()
            if i in applied and i not in self.replayed
        ]
        await self.wire.send(list(replays))
        self.replayed |= applied
        self.hostile += replays
        return len(replays)


# --- the run ---------------------------------------------------------------------------------------


class Run:
    def __init__(self, evidence: Path, services: Services, valid: list[InferenceRequested]) -> None:
        self.evidence, self.services, self.valid = evidence, services, valid
        self.ids = pa.table(
            {"tenant_id": [r.tenant_id for r in valid], "request_id": [r.request_id for r in valid]}
        )
        self.published_valid = 0
        self.last_poll = 0.0

    def store(self) -> EvidenceStore | None:
        if not (self.evidence / "manifest.head.json").exists():
            return None
        store = EvidenceStore(self.evidence)
        store.con.register("valid", self.ids)
        return store

    def progress(self, store: EvidenceStore) -> dict[str, int]:
        row = store.query(
            """
            SELECT (SELECT count(*) FROM (SELECT DISTINCT tenant_id, request_id FROM decisions
                     UNION SELECT DISTINCT tenant_id, request_id FROM rejections) d
                    SEMI JOIN valid USING (tenant_id, request_id)) AS decided,
                   (SELECT count(*) FROM (SELECT DISTINCT tenant_id, request_id FROM terminal_states) t
                    SEMI JOIN valid USING (tenant_id, request_id)) AS terminal,
                   (SELECT count(*) FROM deadletters) AS deadletters,
                   (SELECT count(*) FROM refusals) AS refusals
            """
        ).to_pylist()[0]
        return dict(row)


async def _poll(run: Run, desk: Desk) -> dict[str, int] | None:
    """One look at the evidence (at most every POLL_S): the desk reviews on the way. Raises
    NexusError if a stage has exited."""
    run.services.check()
    wait = run.last_poll + POLL_S - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)  # paces the polling itself; the conditions are awaited by the callers
    run.last_poll = time.monotonic()
    store = run.store()
    if store is None:
        return None
    with store:
        await desk.step(store)
        return run.progress(store)


async def _await_decided(run: Run, desk: Desk, count: int, timeout_s: float) -> bool:
    """Until ``count`` valid requests have a decision or a rejection (the pipeline keeps up)."""
    if count <= 0:
        return True
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        p = await _poll(run, desk)
        if p is not None and p["decided"] >= count:
            return True
    return False


async def _await_terminal(run: Run, desk: Desk, timeout_s: float, stall_s: float) -> str | None:
    """Until every valid request has a terminal state; why it stopped waiting otherwise."""
    deadline = time.monotonic() + timeout_s
    last: tuple[int, ...] = ()
    moved = time.monotonic()
    p: dict[str, int] | None = None
    while time.monotonic() < deadline:
        p = await _poll(run, desk)
        if p is None:
            continue
        if p["terminal"] >= len(run.valid):
            return None
        now = (p["decided"], p["terminal"], len(desk.reviewed))
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            return f"no progress for {stall_s:.0f} s at {p}"
    return f"timed out after {timeout_s:.0f} s at {p}"


def _accounting(
    store: EvidenceStore, hostile: list[Hostile]
) -> tuple[
    dict[tuple[str, int, int], list[str]],
    dict[tuple[str, int, int], list[str]],
    dict[tuple[str, str], list[str]],
]:
    """Dead letters and refusals by position, rejections (with a reason) by (tenant, request id)."""
    topics = sorted({h.topic for h in hostile})
    letters: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for r in store.query(
        "SELECT source_topic, source_partition, source_offset, reason FROM deadletters WHERE list_contains($t, source_topic)",
        {"t": topics},
    ).to_pylist():
        letters[(r["source_topic"], r["source_partition"], r["source_offset"])].append(r["reason"])
    refusals: dict[tuple[str, int, int], list[str]] = defaultdict(list)
    for r in store.query(
        "SELECT source_topic, source_partition, source_offset, code, reason FROM refusals WHERE list_contains($t, source_topic)",
        {"t": topics},
    ).to_pylist():
        refusals[(r["source_topic"], r["source_partition"], r["source_offset"])].append(
            f"{r['code']}: {r['reason']}"
        )
    wanted = [h for h in hostile if h.expect == "rejection"]
    rejections: dict[tuple[str, str], list[str]] = defaultdict(list)
    if wanted:
        for r in store.query(
            "SELECT tenant_id, request_id, reason_code, reason FROM rejections "
            "WHERE list_contains($ids, request_id) AND reason_code <> '' AND reason <> ''",
            {"ids": [h.request_id for h in wanted]},
        ).to_pylist():
            rejections[(r["tenant_id"], r["request_id"])].append(f"{r['reason_code']}: {r['reason']}")
    return letters, refusals, rejections


def _how(
    h: Hostile,
    letters: dict[tuple[str, int, int], list[str]],
    refusals: dict[tuple[str, int, int], list[str]],
    rejections: dict[tuple[str, str], list[str]],
) -> tuple[str, str]:
    """How the evidence accounts for one hostile message (condition 3), and the first reason given."""
    at = (h.topic, h.partition, h.offset)
    if at in letters:
        return "deadletter", letters[at][0]
    if at in refusals:
        return "refusal", refusals[at][0]
    if h.expect == "rejection" and (h.tenant_id, h.request_id) in rejections:
        return "rejection", rejections[(h.tenant_id, h.request_id)][0]
    return "unaccounted", ""


async def _await_accounted(
    run: Run, desk: Desk, hostile: list[Hostile], timeout_s: float, stall_s: float
) -> str | None:
    """Until every hostile message is accounted for (dead letters and refusals trail the requests)."""
    deadline = time.monotonic() + timeout_s
    best, moved = -1, time.monotonic()
    missing = len(hostile)
    while time.monotonic() < deadline:
        await _poll(run, desk)
        everything = hostile + desk.hostile
        store = run.store()
        if store is None:
            continue
        with store:
            found = _accounting(store, everything)
        missing = sum(_how(h, *found)[0] == "unaccounted" for h in everything)
        if missing == 0:
            return None
        if len(everything) - missing > best:
            best, moved = len(everything) - missing, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            return f"{missing} hostile message(s) still unaccounted for after {stall_s:.0f} s without change"
    return f"{missing} hostile message(s) unaccounted for at the deadline"


async def _drive(
    run: Run,
    wire: Wire,
    factory: Factory,
    desk: Desk,
    plan: list[tuple[str, str]],
    rng: random.Random,
    timings: dict[str, float],
) -> tuple[list[Hostile], list[Genuine], str | None]:
    """Publish the waves (valid and hostile interleaved), the genuine switches, then wait."""
    hostile: list[Hostile] = []
    genuine: list[Genuine] = []
    await wire.start()
    try:
        t0 = time.monotonic()
        timings["t0"] = t0
        # A genuine off and on for the ghost tenant first: there is something to replay from the start.
        pair = [
            factory.genuine_switch(datetime.now(UTC), "off"),
            factory.genuine_switch(datetime.now(UTC) + timedelta(milliseconds=1), "on"),
        ]
        await wire.send(list(pair))
        genuine += pair
        valid_waves = [run.valid[k::WAVES] for k in range(WAVES)]
        hostile_waves = [plan[k::WAVES] for k in range(WAVES)]
        for k in range(WAVES):
            now = datetime.now(UTC)
            made = [factory.make(role, kind, now) for role, kind in hostile_waves[k]]
            items: list[Hostile | Genuine | InferenceRequested] = [*valid_waves[k], *made]
            rng.shuffle(items)
            if k in (3, 6):  # more genuine switches, each off paired with an on at once
                pair = [
                    factory.genuine_switch(now, "off"),
                    factory.genuine_switch(now + timedelta(milliseconds=1), "on"),
                ]
                at = rng.randrange(len(items))
                items[at:at] = pair
                genuine += pair
            await wire.send(items)
            hostile += made
            run.published_valid += len(valid_waves[k])
            print(
                f"[fuzz +{time.monotonic() - t0:6.1f} s] wave {k + 1}/{WAVES}: {len(valid_waves[k])} valid, {len(made)} hostile",
                flush=True,
            )
            # The next wave once the pipeline has taken in (decided) the waves before this one.
            before = run.published_valid - len(valid_waves[k])
            if not await _await_decided(run, desk, before, timeout_s=120):
                print(
                    f"[fuzz] the pipeline had not decided {before} valid requests within 120 s; going on",
                    flush=True,
                )
        timings["published"] = time.monotonic() - t0
        why = await _await_terminal(run, desk, timeout_s=max(600.0, REQUESTS * 0.3), stall_s=180)
        timings["all_terminal"] = time.monotonic() - t0
        if why is None:
            # The replays of the last genuine reviews, then every dead letter and refusal.
            why = await _await_accounted(run, desk, hostile, timeout_s=300, stall_s=60)
        timings["all_accounted"] = time.monotonic() - t0
        run.services.check()
        return hostile, genuine, why
    except NexusError as exc:  # a stage died: still look at the evidence
        return hostile, genuine, f"a process died on its own: {exc}"
    finally:
        await wire.stop()


# --- the checks, from the evidence -----------------------------------------------------------------

_TABLES_AT = " UNION ALL ".join(
    f"SELECT '{t}' AS tbl, src_topic, src_partition, src_offset FROM {t} WHERE list_contains($t, src_topic)"  # noqa: S608
    for t in SCHEMAS
    if t not in ("deadletters", "refusals")
)


def _analyse(
    evidence: Path,
    run: Run,
    hostile: list[Hostile],
    genuine: list[Genuine],
    desk: Desk,
    keys: DevKeys,
    digest: str,
) -> tuple[dict[str, Any], list[str]]:
    problems: list[str] = []
    figures: dict[str, Any] = {}
    everything = hostile + desk.hostile
    with EvidenceStore(evidence) as store:
        store.con.register("valid", run.ids)
        found = _accounting(store, everything)
        topics = sorted({h.topic for h in everything} | {g.topic for g in genuine})
        # Every row of any other table at a hostile message's position: what the message became.
        elsewhere: dict[tuple[str, int, int], list[str]] = defaultdict(list)
        for r in store.query(_TABLES_AT, {"t": topics}).to_pylist():
            elsewhere[(r["src_topic"], r["src_partition"], r["src_offset"])].append(r["tbl"])

        # 3. every hostile message accounted for
        by_kind: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        unaccounted: dict[tuple[str, str], list[Hostile]] = defaultdict(list)
        leaks: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
        how_total: Counter[str] = Counter()
        listing: list[dict[str, Any]] = []
        for h in everything:
            how, reason = _how(h, *found)
            how_total[how] += 1
            k = by_kind[h.role].setdefault(
                h.kind, {"sent": 0, "bytes": 0, "expected": h.expect, "deadletter": 0, "refusal": 0, "rejection": 0,
                         "unaccounted": 0, "reasons": Counter(), "also_in": Counter()}
            )  # fmt: skip
            k["sent"] += 1
            k["bytes"] += max(0, h.size)
            k[how] += 1
            if reason:
                k["reasons"][_reason_class(reason)] += 1
            at = (h.topic, h.partition, h.offset)
            for table in elsewhere.get(at, []):
                k["also_in"][table] += 1
                if table not in _EXPECTED_ROWS.get(h.role, ()) and not (
                    h.role == "requests" and table == "requests" and h.expect == "rejection"
                ):
                    leaks[(h.role, h.kind)][table] += 1
            if how == "unaccounted":
                unaccounted[(h.role, h.kind)].append(h)
            listing.append(
                {"kind": h.kind, "topic": h.topic, "partition": h.partition, "offset": h.offset, "bytes": h.size,
                 "key": None if h.key is None else h.key[:80].decode("utf-8", "replace"), "expected": h.expect,
                 "accounted": how, "reason": reason[:300], "also_in": elsewhere.get(at, [])}
            )  # fmt: skip
        figures["hostile"] = {
            "total": len(everything),
            "static": len(hostile),
            "at_real_escalations": len(desk.hostile),
            "by_topic": dict(Counter(h.role for h in everything)),
            "accounted": dict(how_total),
            "bytes": sum(max(0, h.size) for h in everything),
            "largest_bytes": max((h.size for h in everything), default=0),
        }
        figures["by_kind"] = {
            role: {
                kind: {**v, "reasons": dict(v["reasons"].most_common(4)), "also_in": dict(v["also_in"])}
                for kind, v in sorted(kinds.items())
            }
            for role, kinds in sorted(by_kind.items())
        }
        for (role, kind), items in sorted(unaccounted.items()):
            examples = "; ".join(
                f"{h.topic}[{h.partition}]@{h.offset} ({h.size} bytes, key {h.key!r:.40}): "
                f"{', '.join(sorted(set(elsewhere.get((h.topic, h.partition, h.offset), [])))) or 'no row at all'}"
                for h in items[:3]
            )
            problems.append(
                f"UNACCOUNTED {role} / {kind}: {len(items)} of {by_kind[role][kind]['sent']}; e.g. {examples}"
            )
        # Every hostile message, where it went and how it was accounted for: beside the logs.
        listing_path = evidence.parent / "logs" / "hostile.jsonl"
        listing_path.parent.mkdir(parents=True, exist_ok=True)
        listing_path.write_text("".join(json.dumps(x) + "\n" for x in listing), encoding="utf-8")
        figures["hostile"]["listing"] = str(listing_path)
        figures["leaks"] = {f"{role} / {kind}": dict(c) for (role, kind), c in sorted(leaks.items())}

        # 2. every valid request exactly one terminal state
        counts = store.query(
            "SELECT v.tenant_id, v.request_id, count(t.request_id) AS n, string_agg(t.state, '+') AS states "
            "FROM valid v LEFT JOIN terminal_states t USING (tenant_id, request_id) GROUP BY ALL"
        ).to_pylist()
        lost = [r for r in counts if r["n"] == 0]
        doubled = [r for r in counts if r["n"] > 1]
        if lost:
            problems.append(
                f"LOST (no terminal state): {len(lost)} valid requests, e.g. {[r['request_id'] for r in lost[:5]]}"
            )
        if doubled:
            problems.append(
                f"TWO OR MORE terminal states: {len(doubled)} valid requests, e.g. {[(r['request_id'], r['states']) for r in doubled[:5]]}"
            )
        figures["valid"] = {
            "published": len(run.valid),
            "with_one_terminal_state": sum(r["n"] == 1 for r in counts),
            "without_terminal_state": len(lost),
            "with_two_or_more": len(doubled),
            "terminal_states": {
                r["state"]: r["n"]
                for r in store.query(
                    "SELECT state, count(*) AS n FROM terminal_states SEMI JOIN valid USING (tenant_id, request_id) "
                    "GROUP BY 1 ORDER BY 2 DESC"
                ).to_pylist()
            },
        }

        # Forged acts have no effect.
        switched = store.query(
            "SELECT count(*) AS n FROM decision_reasons SEMI JOIN valid USING (tenant_id, request_id) WHERE subject = 'kill_switch'"
        ).to_pylist()[0]["n"]
        switched += store.query(
            "SELECT count(*) AS n FROM resolutions SEMI JOIN valid USING (tenant_id, request_id) WHERE verdict_reason LIKE 'kill_switch%'"
        ).to_pylist()[0]["n"]
        cached = store.query(
            "SELECT count(*) AS n FROM outcomes SEMI JOIN valid USING (tenant_id, request_id) WHERE cached"
        ).to_pylist()[0]["n"]
        resolutions = store.query(
            "SELECT request_id, review_event_id, reviewer, resolution FROM resolutions SEMI JOIN valid USING (tenant_id, request_id)"
        ).to_pylist()
        foreign = [
            r for r in resolutions if r["review_event_id"] not in desk.genuine and r["reviewer"] != DECIDER
        ]
        switch_positions = {(g.topic, g.partition, g.offset) for g in genuine}
        switches = store.query(
            "SELECT src_topic, src_partition, src_offset, mode, target FROM kill_switches"
        ).to_pylist()
        applied_switches = [
            r for r in switches if (r["src_topic"], r["src_partition"], r["src_offset"]) in switch_positions
        ]
        stray_switches = [
            r
            for r in switches
            if (r["src_topic"], r["src_partition"], r["src_offset"]) not in switch_positions
        ]
        policies = store.query("SELECT to_stage, reason, actor FROM policy_events").to_pylist()
        stray_policies = [r for r in policies if r["reason"] != "bootstrap"]
        genuine_reviews_in = store.query(
            "SELECT count(*) AS n FROM reviews WHERE list_contains($ids, event_id) AND src_topic = $topic",
            {"ids": list(desk.genuine), "topic": next(iter({g.topic for g in desk.genuine.values()}), "")},
        ).to_pylist()[0]["n"]
        figures["effects"] = {
            "valid_requests_decided_under_a_kill_switch": switched,
            "cached_offline_answers": cached,
            "escalations_reviewed": len(desk.reviewed),
            "approved": desk.approved,
            "denied": desk.denied,
            "resolutions_of_valid_requests": len(resolutions),
            "resolutions_not_by_a_genuine_review": len(foreign),
            "genuine_reviews_in_reviews_table": genuine_reviews_in,
            "genuine_switches_published": len(genuine),
            "genuine_switches_applied": len(applied_switches),
            "kill_switch_rows_not_genuine": len(stray_switches),
            "policy_events_besides_bootstrap": len(stray_policies),
        }
        if switched or cached:
            problems.append(
                f"FORGED KILL SWITCH TOOK EFFECT: {switched} valid decisions under a switch, {cached} offline answers"
            )
        if foreign:
            problems.append(
                f"FORGED REVIEW TOOK EFFECT: {len(foreign)} escalations ended by another review, e.g. {foreign[:3]}"
            )
        if stray_switches:
            problems.append(
                f"kill switches in the evidence that no genuine act published: {stray_switches[:5]}"
            )
        if stray_policies:
            problems.append(f"policy steps besides the bootstrap: {stray_policies[:5]}")
        if len(applied_switches) != len(genuine):
            problems.append(
                f"genuine kill switches not taken: {len(genuine) - len(applied_switches)} of {len(genuine)}"
            )
        if genuine_reviews_in != len(desk.genuine):
            problems.append(
                f"genuine reviews missing from the reviews table: {len(desk.genuine) - genuine_reviews_in} of {len(desk.genuine)}"
            )
        escalated = store.query(
            "SELECT count(*) AS n FROM escalations SEMI JOIN valid USING (tenant_id, request_id)"
        ).to_pylist()[0]["n"]
        figures["effects"]["escalations_of_valid_requests"] = escalated

    # What the stages emitted a second time (dropped by the projector as duplicates, counted in the
    # manifest's checkpoints): in a run without crashes, only hostile input can make a stage repeat
    # itself (a re-published review makes the decider send its resolution and dispatch again).
    repeated: Counter[str] = Counter()
    for line in (evidence / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if entry.get("kind") == "checkpoint":
            for p in entry.get("partitions", []):
                repeated[p["topic"].removeprefix(topics_prefix(p["topic"]))] += p.get("duplicates", 0)
    repeated = Counter({t: n for t, n in repeated.items() if n})
    figures["effects"]["outputs_emitted_twice_by_topic"] = dict(repeated)
    if repeated:
        replays = sum(h.kind.startswith("genuine review re-published") for h in everything)
        problems.append(
            f"HOSTILE INPUT MADE THE STAGES REPEAT THEMSELVES: {sum(repeated.values())} events emitted a second time "
            f"(dropped by the projector as duplicates): {dict(repeated)}; {replays} genuine reviews were re-published "
            "(refused as replayed in the evidence), and the decider re-sent what each had caused"
        )

    # 4. verify
    started = time.monotonic()
    report = verify(evidence, load_public_key(keys.evidence_public), {digest})
    figures["verify"] = {
        "ok": report.ok,
        "rows": report.rows,
        "files": report.files,
        "partitions": report.partitions,
        "requests": report.requests,
        "seconds": round(time.monotonic() - started, 1),
        "findings": [
            f"{'FATAL' if f.fatal else 'note'} {f.kind} {f.where}: {f.detail[:300]}" for f in report.findings
        ],
    }
    if not report.ok:
        fatal = [f for f in report.findings if f.fatal]
        problems.append(
            f"verify: {len(fatal)} fatal finding(s): "
            + "; ".join(f"{f.kind} {f.where}: {f.detail[:300]}" for f in fatal[:10])
        )
    return figures, problems


def topics_prefix(topic: str) -> str:
    """The namespace of a topic name (``fuzz-1234.nexus.requests`` -> ``fuzz-1234.``)."""
    return topic[: topic.index("nexus.")] if "nexus." in topic else ""


# Tables a hostile message of each topic may legitimately leave a row in besides a dead letter or
# refusal: a review with a valid signature (or a timeout) is recorded before the decider judges what
# it answers; a schema-valid request is recorded beside its rejection.
_EXPECTED_ROWS: dict[str, tuple[str, ...]] = {"reviews": ("reviews",)}


def _reason_class(reason: str) -> str:
    """A reason without its particulars (ids, offsets, keys, numbers), for counting."""
    text = re.sub(r"fuzz-[0-9a-f]{8}\.", "", reason)  # the run's topic namespace
    text = re.sub(r"b'[^']*'|b\"[^\"]*\"|'[^']*'|\"[^\"]*\"", "…", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:.+]+", "<time>", text)
    text = re.sub(r"\b[0-9a-f]{12,}\b", "<id>", text)
    text = re.sub(r"-?\d{3,}", "<n>", text)
    return text[:110]


# --- the figures -----------------------------------------------------------------------------------


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO_ROOT, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=REPO_ROOT,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if head.returncode != 0:
        return "unknown"
    return f"{head.stdout.strip()}{' + uncommitted changes' if dirty.stdout.strip() else ''}"


def _markdown(f: dict[str, Any]) -> str:
    h, v, e, ver, t = f["hostile"], f["valid"], f["effects"], f["verify"], f["durations_s"]
    acc = h["accounted"]
    states = ", ".join(f"{k} {n:,}" for k, n in v["terminal_states"].items())
    lines = [
        "# Fuzz run: trust under attack",
        "",
        f"Run of {f['started_utc'][:10]} (commit `{f['commit']}`, `{f['command']}`, seed {f['seed']}): "
        f"{h['total']:,} hostile messages ({h['static']:,} planned over every input topic, {h['at_real_escalations']:,} "
        f"more against real escalations) interleaved with {v['published']:,} valid requests in {WAVES} waves, through a "
        f"live pipeline (simulated provider, decider, worker, projector) on its own local KRaft broker, on {os.cpu_count()} cores.",
        "",
        "| | |",
        "|---|---|",
        f"| 1. stages that exited | **{f['services']['exited']}** ({', '.join(f['services']['running'])} running at the end) |",
        f"| 2. valid requests published / with exactly one terminal state / none / two or more | {v['published']:,} / {v['with_one_terminal_state']:,} / **{v['without_terminal_state']:,}** / **{v['with_two_or_more']:,}** |",
        f"| 3. hostile messages accounted for: dead letter / refusal / rejection / **none** | {acc.get('deadletter', 0):,} / {acc.get('refusal', 0):,} / {acc.get('rejection', 0):,} / **{acc.get('unaccounted', 0):,}** |",
        f"| 4. `verify` | {'ok' if ver['ok'] else '**FAILED**'}: {ver['rows']:,} events, {ver['files']:,} files, {ver['partitions']} partitions, {sum(x.startswith('FATAL') for x in ver['findings'])} fatal finding(s), {ver['seconds']} s |",
        f"| forged acts with an effect | kill switch: {e['valid_requests_decided_under_a_kill_switch']} decisions, {e['cached_offline_answers']} offline answers; reviews: {e['resolutions_not_by_a_genuine_review']} of {e['resolutions_of_valid_requests']} resolutions; {e['kill_switch_rows_not_genuine']} switches and {e['policy_events_besides_bootstrap']} policy steps not genuine |",
        f"| hostile messages leaving a row in another table at their position | {sum(sum(c.values()) for c in f['leaks'].values()):,} (see below) |",
        f"| terminal states of the valid requests | {states} |",
        f"| escalations of valid requests / reviewed by the desk (approved, denied) | {e['escalations_of_valid_requests']} / {e['escalations_reviewed']} ({e['approved']}, {e['denied']}) |",
        f"| genuine kill switches (ghost tenant) published / taken | {e['genuine_switches_published']} / {e['genuine_switches_applied']} |",
        f"| hostile bytes in all / largest message | {h['bytes']:,} / {h['largest_bytes']:,} |",
        f"| durations (from the first message): all published / all valid terminal / all hostile accounted | {t.get('published', 0):.1f} s / {t.get('all_terminal', 0):.1f} s / {t.get('all_accounted', 0):.1f} s; whole test {t.get('test', 0):.1f} s |",
        "",
        "Hostile messages by topic and kind (expected: how it should be accounted for; sent; dead letter / refusal / "
        "rejection / none; the most frequent reason; other tables holding a row at its position):",
        "",
        "| topic | kind | expected | sent | DL | ref. | rej. | **none** | reason (most frequent) | also in |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for role, kinds in f["by_kind"].items():
        for kind, k in kinds.items():
            reason = next(iter(k["reasons"]), "")
            also = ", ".join(f"{t} {n}" for t, n in k["also_in"].items())
            lines.append(
                f"| {role} | {kind} | {k['expected']} | {k['sent']:,} | {k['deadletter']:,} | {k['refusal']:,} | "
                f"{k['rejection']:,} | **{k['unaccounted']:,}** | {reason.replace('|', '/')} | {also} |"
            )
    leaks = "; ".join(f"{k}: {', '.join(f'{t} {n}' for t, n in v.items())}" for k, v in f["leaks"].items())
    lines += [
        "",
        f"Hostile messages that entered a table other than `deadletters`/`refusals` (beyond a schema-valid request's "
        f"`requests` row and a review's `reviews` row): {leaks or 'none'}.",
        "",
        f"Events the stages emitted a second time after hostile input (dropped by the projector as duplicates, "
        f"from the manifest's checkpoints): {e['outputs_emitted_twice_by_topic'] or 'none'}.",
        "",
        f"`verify` findings: {'; '.join(ver['findings'][:12]) or 'none'}",
        "",
        f"Result: **{'all checks passed' if not f['problems'] else 'FAILED: ' + str(len(f['problems'])) + ' problem(s)'}**"
        + ("" if not f["problems"] else "\n\n```\n" + "\n".join(f["problems"])[:8000] + "\n```"),
        "",
    ]
    return "\n".join(lines)


# --- the test ----------------------------------------------------------------------------------------


def test_hostile_input_on_every_topic_is_accounted_for_and_changes_nothing(tmp_path: Path) -> None:
    t_test = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    started_utc = datetime.now(UTC).isoformat(timespec="seconds")
    topics = Topics(f"fuzz-{run_id}.")
    evidence = tmp_path / "evidence"
    log_dir = tmp_path / "logs"
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    policy = load_policy(keys.policy)
    rng = random.Random(SEED)  # noqa: S311  # test data, not cryptography
    factory = Factory(rng, policy, topics, Keys(keys, rng), run_id)
    plan = factory.plan(MESSAGES, HUGE_PROMPTS, NEAR_LIMIT)
    valid = synthetic_requests(policy, REQUESTS, seed=SEED, start=datetime.now(UTC), run=f"fuzz-{run_id}")
    timings: dict[str, float] = {}
    broker = LocalKafka(ensure_kafka_jars())
    broker.start()
    services_figures: dict[str, Any] = {}
    try:
        asyncio.run(ensure_topics(broker.bootstrap, topics))
        with Services(log_dir) as services:
            Pipeline(services, broker.bootstrap, topics, keys, evidence)
            for s in services.started:
                if s.name in READY:
                    s.wait_for_line(READY[s.name], 90)
            print(
                f"\nfuzz run {run_id}: {MESSAGES} hostile messages, {REQUESTS} valid requests; logs in {log_dir}",
                flush=True,
            )
            run = Run(evidence, services, valid)
            wire = Wire(broker.bootstrap, topics)
            desk = Desk(factory, factory.keys, wire, rng)
            hostile, genuine, why = asyncio.run(_drive(run, wire, factory, desk, plan, rng, timings))
            exited = [s.name for s in services.started if s.proc.poll() is not None]
            services_figures = {
                "exited": len(exited),
                "exited_names": exited,
                "running": [s.name for s in services.started if s.proc.poll() is None],
                "exit_tails": {s.name: s.log_tail(12) for s in services.started if s.name in exited},
            }
        # Every service stopped (the projector's last flush sealed): the evidence no longer moves.
        figures, problems = _analyse(evidence, run, hostile, genuine, desk, keys, policy.digest)
    finally:
        if broker.log_path is not None and broker.log_path.exists():
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / "broker.log").write_bytes(broker.log_path.read_bytes())
        broker.stop()
    if services_figures["exited"]:
        problems.insert(
            0, f"STAGES EXITED: {services_figures['exited_names']}: {services_figures['exit_tails']}"
        )
    if why is not None:
        problems.insert(0, f"stopped waiting: {why}")
    timings["test"] = time.monotonic() - t_test
    t0 = timings.pop("t0", 0.0)
    del t0
    figures = {
        "started_utc": started_utc,
        "commit": _commit(),
        "command": f"FUZZ_MESSAGES={MESSAGES} FUZZ_REQUESTS={REQUESTS} make fuzz",
        "seed": SEED,
        "messages_planned": MESSAGES,
        "ghost_tenant": GHOST_TENANT,
        "roles": list(ROLES),
        "topics": {role: topic_of(topics, role) for role in ROLES},
        "services": services_figures,
        "durations_s": {k: round(v, 1) for k, v in timings.items()},
        **figures,
        "log_dir": str(log_dir),
        "problems": problems,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(figures, indent=2, default=str) + "\n", encoding="utf-8")
    markdown = _markdown(figures)
    (RESULTS / "fuzz.md").write_text(markdown, encoding="utf-8")
    print("\n" + markdown, flush=True)
    assert not problems, "\n\n".join(problems)
