"""Where the projector's time goes, without the broker in the loop (a child process of phase 1).

Every record is read into memory first (plain consumer); then ``Projector.add`` and
``Projector.flush`` run on them exactly as ``Projector._loop`` calls them (a flush every
``flush_rows`` events), with the main steps timed by wrappers (about 0.3 µs per wrapped call).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from bench._evidence.common import partition_of, sealing_targets, signing_key
from bench._harness import CallTimer, own_cpu_s
from nexuscore.kernel.clock import SystemClock
from nexuscore.projections import Projector, SealedWriter
from nexuscore.schemas import AvroCodec
from nexuscore.transport import Topics, new_consumer, start_client


async def read_all(bootstrap: str, topics: Topics, ends: dict[str, int]) -> list[Any]:
    """Every record of the namespace, from offset 0 to the end offsets."""
    want = {TopicPartition(*partition_of(k)): end for k, end in ends.items()}
    consumer = new_consumer(
        bootstrap, (), topics.group("bench-offline"), max_partition_fetch_bytes=4 * 1024 * 1024
    )
    await start_client(consumer, bootstrap)
    try:
        consumer.assign(list(want))
        await consumer.seek_to_beginning(*want)
        remaining = {tp for tp, end in want.items() if end > 0}
        records: list[Any] = []
        while remaining:
            fetched = await consumer.getmany(timeout_ms=100, max_records=10_000)
            for tp, batch in fetched.items():
                records.extend(batch)
                if batch and batch[-1].offset + 1 >= want[tp]:
                    remaining.discard(tp)
    finally:
        await consumer.stop()
    return records


def _targets() -> dict[str, tuple[Any, str]]:
    from nexuscore.projections import _projector

    return {
        "add: AvroCodec.decode_record (fastavro; all topics)": (AvroCodec, "decode_record"),
        "add: decode_tenant_record (requests, reviews: decode + msgspec validation)": (
            _projector,
            "decode_tenant_record",
        ),
        "add: AvroCodec.decode_validated (decode + msgspec validation)": (AvroCodec, "decode_validated"),
        "add: _Recent.seen (dedup window)": (_projector._Recent, "seen"),
        "add: _protect (FieldCipher.encrypt)": (_projector.Projector, "_protect"),
        "flush": (_projector.Projector, "flush"),
        "flush: SealedWriter.write_flush": (SealedWriter, "write_flush"),
        **{f"flush: {k}": v for k, v in sealing_targets().items()},
    }


@contextlib.contextmanager
def timed_row_builders() -> Iterator[list[float]]:
    """Time spent in ``_tables.ROW_BUILDERS`` (Avro record -> row dict) while inside: [seconds]."""
    from nexuscore.projections import _tables

    builders = dict(_tables.ROW_BUILDERS)
    built = [0.0]

    def timed_builder(fn: Callable[[dict[str, Any]], Any]) -> Callable[[dict[str, Any]], Any]:
        def call(r: dict[str, Any]) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(r)
            finally:
                built[0] += time.perf_counter() - t0

        return call

    for cls, fn in builders.items():
        _tables.ROW_BUILDERS[cls] = timed_builder(fn)
    try:
        yield built
    finally:
        _tables.ROW_BUILDERS.update(builders)


def add_and_flush(projector: Projector, records: list[Any], flush_rows: int) -> tuple[float, float]:
    """``add`` every record, ``flush`` every ``flush_rows`` and at the end; (seconds, CPU seconds)."""
    add, flush = projector.add, projector.flush
    c0, t0 = own_cpu_s(), time.perf_counter()
    batches: dict[Any, Any] = {}
    pending = 0
    for record in records:
        add(batches, record)
        pending += 1
        if pending >= flush_rows:
            flush(batches)
            batches, pending = {}, 0
    if batches:
        flush(batches)
    return time.perf_counter() - t0, own_cpu_s() - c0


def _derived_calls(timer: CallTimer, built_s: float, seconds: float, events: int) -> dict[str, Any]:
    """The timed calls, plus the steps worked out by difference, sorted by phase then time."""
    calls = timer.result()
    calls["add: ROW_BUILDERS (Avro record -> row dict)"] = {"s": round(built_s, 3), "calls": events}
    flush_s = timer.seconds["flush"]
    write_s = timer.seconds["flush: SealedWriter.write_flush"]
    commit_s = timer.seconds["flush: manifest commit + sign"]
    calls["flush: Table.from_pylist (= flush - write - commit)"] = {
        "s": round(flush_s - write_s - commit_s, 3),
        "calls": timer.calls["flush: SealedWriter.write_flush"],
    }
    calls["add: everything (= total - flush)"] = {"s": round(seconds - flush_s, 3), "calls": events}
    return {k: calls[k] for k in sorted(calls, key=lambda k: (k.split(":")[0], -calls[k]["s"]))}


def projector_offline(
    bootstrap: str,
    namespace: str,
    ends: dict[str, int],
    evidence_dir: str,
    regions: dict[str, str],
    flush_rows: int,
) -> dict[str, Any]:
    """Child: where the projector's time goes, without the broker in the loop (see the module)."""
    topics = Topics(namespace=namespace)
    records = asyncio.run(read_all(bootstrap, topics, ends))
    projector = Projector(
        bootstrap,
        Path(evidence_dir),
        signing_key(),
        SystemClock(),
        regions=regions,
        topics=topics,
        flush_rows=flush_rows,
    )
    projector.recover()
    with timed_row_builders() as built, CallTimer(_targets()) as timer:
        seconds, cpu = add_and_flush(projector, records, flush_rows)
    return {
        "events": len(records),
        "flush_rows": flush_rows,
        "seconds": round(seconds, 2),
        "events_per_s": round(len(records) / seconds),
        "cpu_s": round(cpu, 2),
        "us_per_event": round(seconds / len(records) * 1e6, 1),
        "timed_calls": _derived_calls(timer, built[0], seconds, len(records)),
        "files": projector.writer.files if projector.writer else None,
    }


# --- without any broker: the log made in memory ----------------------------------------------------


def memory_records(events_wanted: int, seed: int, partitions: int = 4) -> tuple[list[Any], dict[str, str]]:
    """A recorded history encoded and keyed as the stages publish it, as ConsumerRecords in memory
    (the records a projector would fetch, without a broker): (records, regions)."""
    import zlib
    from collections import defaultdict

    from aiokafka import ConsumerRecord

    from bench._evidence.projector import history
    from tests.factories import _TOPIC_OF, POLICY

    topics, codec = Topics(), AvroCodec()
    offsets: dict[tuple[str, int], int] = defaultdict(int)
    records: list[Any] = []
    for e in history(events_wanted, seed):
        kind = _TOPIC_OF[type(e).__name__]
        topic = getattr(topics, kind)
        key = (e.request_id if kind == "dispatch" else e.tenant_id).encode()
        partition = 0 if topic == topics.governance else zlib.crc32(key) % partitions
        offset = offsets[(topic, partition)]
        offsets[(topic, partition)] += 1
        records.append(
            ConsumerRecord(
                topic=topic,
                partition=partition,
                offset=offset,
                timestamp=int(e.occurred_at.timestamp() * 1000),
                timestamp_type=1,
                key=key,
                value=codec.encode(e),
                checksum=None,
                serialized_key_size=len(key),
                serialized_value_size=0,
                headers=(),
            )  # fmt: skip
        )
    return records, {t.id: t.home_region for t in POLICY.tenants}


def decode_only(records: list[Any]) -> float:
    """The floor of the same run: CPU seconds to Avro-decode every record once, nothing else."""
    codec = AvroCodec()
    c0 = own_cpu_s()
    for r in records:
        codec.decode_record(r.value)
    return own_cpu_s() - c0


# The steps timed in CPU seconds, where they exist (the baseline commit may lack some): label ->
# (module path, attribute path).
_STEPS = {
    "Avro decode (AvroCodec.decode_record)": ("nexuscore.schemas", "AvroCodec.decode_record"),
    "requests check (decode_tenant_event)": ("nexuscore.projections._projector", "decode_tenant_event"),
    "requests check (decode_tenant_record)": ("nexuscore.projections._projector", "decode_tenant_record"),
    "encryption (Projector._protect)": ("nexuscore.projections._projector", "Projector._protect"),
    "dedup (_Recent.seen)": ("nexuscore.projections._projector", "_Recent.seen"),
    "flush (all of it)": ("nexuscore.projections._projector", "Projector.flush"),
    "rows to columns (_tables.to_columns)": ("nexuscore.projections._projector", "to_columns"),
    "columns to Arrow (_tables.to_table)": ("nexuscore.projections._projector", "to_table"),
    "row building (Projector._rows, decode included)": (
        "nexuscore.projections._projector",
        "Projector._rows",
    ),
    "leaves in Python (_leaves.column_leaves)": ("nexuscore.projections._projector", "column_leaves"),
    "leaves in DuckDB (_seal.leaf_hashes)": ("nexuscore.projections._seal", "leaf_hashes"),
    "Parquet (pyarrow write_table)": ("pyarrow.parquet", "write_table"),
    "Parquet (pyarrow ParquetWriter.write_table)": ("pyarrow.parquet", "ParquetWriter.write_table"),
    "file write + fsync (_writer.write_table)": ("nexuscore.projections._writer", "write_table"),
    "Merkle root (ledger.root)": ("nexuscore.ledger", "root"),
    "manifest commit + sign": ("nexuscore.projections._manifest", "Manifest.commit"),
}


@contextlib.contextmanager
def cpu_steps() -> Iterator[dict[str, float]]:
    """CPU seconds spent inside each of ``_STEPS`` (that exists) while inside."""
    import functools
    import importlib

    spent: dict[str, float] = {}
    saved: list[tuple[Any, str, Any]] = []
    for label, (module, path) in _STEPS.items():
        owner: Any = importlib.import_module(module)
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, name, None)
        if fn is None:
            continue
        spent[label] = 0.0

        def timed(*a: Any, _fn: Any = fn, _label: str = label, **k: Any) -> Any:
            t0 = time.process_time()
            try:
                return _fn(*a, **k)
            finally:
                spent[_label] += time.process_time() - t0

        saved.append((owner, name, fn))
        setattr(owner, name, functools.wraps(fn)(timed))
    try:
        yield spent
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)


def child(records_path: str, flush_rows: int, steps: bool) -> dict[str, Any]:
    """One measurement in this process, with whichever ``nexuscore`` is first on sys.path."""
    import gc
    import pickle
    import shutil
    import tempfile

    with open(records_path, "rb") as f:
        records, regions = pickle.load(f)  # noqa: S301  # our own file, written by main()
    root = Path(tempfile.mkdtemp(prefix="nexus-offline-"))
    try:
        projector = Projector(
            "unused:9092", root, signing_key(), SystemClock(), regions=regions, flush_rows=flush_rows
        )
        projector.recover()
        # The collector settings of Projector.run, for both sides: the baseline commit did not set
        # them, so the ratio leaves that gain (about 5%) out.
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        with cpu_steps() if steps else contextlib.nullcontext({}) as spent:
            seconds, cpu = add_and_flush(projector, records, flush_rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = len(records)
    return {
        "events": n,
        "cpu_us_per_event": round(cpu / n * 1e6, 1),
        "events_per_s": round(n / seconds),
        "files": projector.writer.files if projector.writer else None,
        "steps_us_per_event": {k: round(v / n * 1e6, 1) for k, v in spent.items()},
    }


def baseline_tree(rev: str, work: Path) -> Path:
    """The code of commit ``rev`` laid out as the installed ``nexuscore`` package (a link tree, as
    ``make linktree`` does), for a child process to import instead of this worktree's."""
    import subprocess

    src = work / "src"
    src.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev], check=True, capture_output=True).stdout  # noqa: S607
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)  # noqa: S607
    tree = work / "tree"
    (tree / "nexuscore").mkdir(parents=True)
    for f in (src / "nexuscore").iterdir():
        (tree / "nexuscore" / f.name).symlink_to(f)
    for package in ("kernel", "ledger", "schemas", "policy", "core", "transport", "streams",
                    "providers", "projections", "replay", "services"):  # fmt: skip
        (tree / "nexuscore" / package).symlink_to(src / package)
    return tree


def run_child(tree: Path | None, records_path: Path, flush_rows: int, steps: bool) -> dict[str, Any]:
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    path = [str(tree)] if tree else []
    code = (
        f"import sys; sys.path[:0] = {[*path, str(repo)]!r}; import json; "
        "from bench._evidence.projector_offline import child; "
        f"print(json.dumps(child({str(records_path)!r}, {flush_rows}, {steps})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tree or repo
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    """``python -m bench._evidence.projector_offline [--events N] [--baseline REV] [--repeat K]``:
    the projector's CPU per event on an in-memory log (no broker), this worktree against commit REV,
    alternating child processes on the same records; figures to bench/results/projector-offline.*."""
    import argparse
    import json
    import pickle
    import statistics
    import tempfile

    from bench._harness import git_commit, loadavg, write_results

    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--flush-rows", type=int, default=10_000)
    ap.add_argument("--baseline", default="534cfd0")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nexus-offline-") as tmp:
        work = Path(tmp)
        records, regions = memory_records(args.events, seed=7)
        records_path = work / "records.pkl"
        records_path.write_bytes(pickle.dumps((records, regions)))
        floor = decode_only(records) / len(records) * 1e6
        tree = baseline_tree(args.baseline, work / "baseline")
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "current": []}
        for i in range(args.repeat):
            steps = i == 0  # the first pair with step timers (they add a little), then without
            runs["baseline"].append(run_child(tree, records_path, args.flush_rows, steps))
            runs["current"].append(run_child(None, records_path, args.flush_rows, steps))
    plain = {k: [r["cpu_us_per_event"] for r in v[1:] or v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in plain.items()}
    results = {
        "commit": git_commit(),
        "baseline_commit": args.baseline,
        "events": len(records),
        "flush_rows": args.flush_rows,
        "loadavg": loadavg(),
        "decode_only_cpu_us_per_event": round(floor, 1),
        "cpu_us_per_event": med,
        "ratio_current_to_baseline": round(med["current"] / med["baseline"], 3),
        "runs": runs,
    }
    write_results("projector-offline", results, _markdown(results))
    print(json.dumps({k: v for k, v in results.items() if k != "runs"}, indent=1))


def _markdown(r: dict[str, Any]) -> str:
    first = {k: v[0] for k, v in r["runs"].items()}
    labels = list(
        dict.fromkeys([*first["baseline"]["steps_us_per_event"], *first["current"]["steps_us_per_event"]])
    )
    lines = [
        "# Projector, offline (no broker): CPU µs per event",
        "",
        f"`python -m bench._evidence.projector_offline --events {r['events']} --baseline "
        f"{r['baseline_commit']}` at commit `{r['commit']}`; {r['events']:,} events of "
        f"`tests.factories.run_history` in memory, flush every {r['flush_rows']:,}; load average "
        f"{r['loadavg']} (a shared machine: CPU time is the stable figure, wall time is not).",
        "",
        "| | CPU µs/event (median) | runs |",
        "| --- | --- | --- |",
        f"| baseline `{r['baseline_commit']}` | {r['cpu_us_per_event']['baseline']} | "
        f"{[x['cpu_us_per_event'] for x in r['runs']['baseline']]} |",
        f"| this commit | {r['cpu_us_per_event']['current']} | "
        f"{[x['cpu_us_per_event'] for x in r['runs']['current']]} |",
        f"| Avro decode alone (the floor with fastavro) | {r['decode_only_cpu_us_per_event']} | |",
        "",
        f"Ratio this / baseline: **{r['ratio_current_to_baseline']}**.",
        "",
        "Steps (first run of each, with timers; CPU µs per event, nested steps overlap):",
        "",
        "| step | baseline | this commit |",
        "| --- | --- | --- |",
    ]
    for label in labels:
        b = first["baseline"]["steps_us_per_event"].get(label, "—")
        c = first["current"]["steps_us_per_event"].get(label, "—")
        lines.append(f"| {label} | {b} | {c} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
