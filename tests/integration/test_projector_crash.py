"""The projector killed with SIGKILL at random moments, many times, and restarted: its tables come
out identical to those of an undisturbed run over the same log (none lost, none twice), and both
verify."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import signal
import time
import uuid
import zlib
from pathlib import Path

import pytest

from nexuscore._services import Service
from nexuscore.kernel.signing import generate_keypair, load_public_key
from nexuscore.policy import DEFAULT_POLICY_PATH
from nexuscore.projections import SCHEMAS, EvidenceStore, verify
from nexuscore.schemas import AvroCodec, Event
from nexuscore.transport import DEFAULT_PARTITIONS, Topics, ensure_topics, new_producer, start_client
from tests.factories import _TOPIC_OF, POLICY, _key_of, run_history

pytestmark = pytest.mark.integration
KILLS = 8


async def _publish(bootstrap: str, topics: Topics, events: list[Event]) -> dict[tuple[str, int], int]:
    """The log both projectors read; returns each partition's end offset."""
    codec = AvroCodec()
    producer = new_producer(bootstrap, linger_ms=5)
    await start_client(producer, bootstrap)
    try:
        futures = []
        for e in events:
            topic, key = getattr(topics, _TOPIC_OF[type(e).__name__]), _key_of(e)  # each topic's key
            partition = zlib.crc32(key) % DEFAULT_PARTITIONS
            futures.append(await producer.send(topic, codec.encode(e), key=key, partition=partition))
        await producer.flush()
        ends: dict[tuple[str, int], int] = {}
        for f in futures:
            meta = await f
            ends[(meta.topic, meta.partition)] = max(
                ends.get((meta.topic, meta.partition), 0), meta.offset + 1
            )
        return ends
    finally:
        await producer.stop()


def _positions(root: Path) -> dict[tuple[str, int], int]:
    positions: dict[tuple[str, int], int] = {}
    manifest = root / "manifest.jsonl"
    if manifest.exists():
        for line in manifest.read_bytes().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a torn last line, from a kill mid-append
            if entry["kind"] == "checkpoint":
                for p in entry["partitions"]:
                    positions[(p["topic"], p["partition"])] = p["end"]
    return positions


def _caught_up(root: Path, ends: dict[tuple[str, int], int]) -> bool:
    positions = _positions(root)
    return all(positions.get(tp, 0) >= end for tp, end in ends.items())


def _empty_trust(directory: Path) -> Path:
    """No trusted keys: this test projects no governance acts or reviews."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trust.yaml"
    path.write_text("keys: []\n")
    return path


def _projector(name: str, root: Path, bootstrap: str, topics: Topics, key: Path, logs: Path) -> Service:
    return Service(
        name,
        ["run", "projector", "--bootstrap", bootstrap, "--namespace", topics.namespace, "-e", str(root),
         "--signing-key", str(key), "--policy", str(DEFAULT_POLICY_PATH), "--flush-rows", "400",
         "--trust-store", str(_empty_trust(logs)),
         "--flush-interval", "0.05"],
        logs,
    )  # fmt: skip


def _rows(root: Path) -> dict[str, list[tuple[object, ...]]]:
    with EvidenceStore(root) as store:
        return {
            t: sorted(tuple(r.values()) for r in store.query(f"SELECT * FROM {t}").to_pylist())  # noqa: S608
            for t in SCHEMAS
        }


def _wait(service: Service, root: Path, ends: dict[tuple[str, int], int], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not _caught_up(root, ends):
        service.check()
        assert time.monotonic() < deadline, f"projector did not catch up: {service.log_tail()}"
        time.sleep(0.2)


def test_a_projector_killed_at_random_moments_projects_every_event_exactly_once(
    bootstrap: str, tmp_path: Path
) -> None:
    topics = Topics(f"pcrash-{uuid.uuid4().hex[:8]}.")
    asyncio.run(ensure_topics(bootstrap, topics))
    # Enough history that the (batched, faster) projector is still at work through several kills.
    events = run_history(POLICY, 3000, seed=11)
    ends = asyncio.run(_publish(bootstrap, topics, events))
    generate_keypair(tmp_path / "signer.pem", tmp_path / "signer.pub")
    logs = tmp_path / "logs"
    logs.mkdir()

    calm, killed = tmp_path / "calm", tmp_path / "killed"
    reference = _projector("calm", calm, bootstrap, topics, tmp_path / "signer.pem", logs)
    try:
        _wait(reference, calm, ends, 120)
    finally:
        reference.stop()
    # The same content keys, so that even the ciphertexts must come out the same.
    shutil.copytree(calm / "_keys", killed / "_keys")

    rng = random.Random(7)
    kills = 0
    while kills < KILLS:
        victim = _projector(f"killed-{kills}", killed, bootstrap, topics, tmp_path / "signer.pem", logs)
        victim.wait_for_line("projector ready", 30)
        time.sleep(rng.uniform(0.1, 0.9))  # a random moment of its work, not a wait for a condition
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        victim.stop()
        kills += 1
        if _caught_up(killed, ends):
            break
    assert kills >= 3, "the projector finished before it could be killed often enough"
    last = _projector("killed-last", killed, bootstrap, topics, tmp_path / "signer.pem", logs)
    try:
        _wait(last, killed, ends, 120)
    finally:
        last.stop()

    calm_rows, killed_rows = _rows(calm), _rows(killed)
    assert sum(len(r) for r in calm_rows.values()) == len(events)
    for table in SCHEMAS:
        assert killed_rows[table] == calm_rows[table], table
    public = load_public_key(tmp_path / "signer.pub")
    for root in (calm, killed):
        report = verify(root, public, {POLICY.digest})
        assert report.ok and report.rows == len(events), report.findings
    # The kills really interrupted flushes: the restarts found work to resume.
    assert (
        len([line for line in (killed / "manifest.jsonl").read_bytes().splitlines() if b"checkpoint" in line])
        > 1
    )
