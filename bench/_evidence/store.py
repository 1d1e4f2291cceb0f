"""Phase 2: the store of N decisions, written with the production sealing code and encryption.

``build_store`` reuses a complete store of the same size (``--reuse``) or generates one in a child
process (``generate``): chunks from ``StoreGenerator``, their prompts and responses encrypted with the
production ``FieldCipher`` in one worker process while this one seals and writes the previous chunk
with ``SealedWriter`` (Parquet, Merkle root, signed manifest, a checkpoint per chunk).
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import shutil
import time
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from bench._evidence.common import Params, meta_path, sealing_targets, signing_key
from bench._evidence.generator import Chunk, EncryptJob, StoreGenerator
from bench._evidence.synthetic import TENANT_W, TOPIC_OF_TABLE, WRITTEN_TABLES, const, corpus
from bench._harness import BenchError, CallTimer, own_cpu_s, own_rss_mb, run_child
from nexuscore.policy import default_policy
from nexuscore.projections import SCHEMAS, FieldCipher, LocalKeyStore, SealedWriter, committed_files
from nexuscore.transport import Topics

STORE_START = datetime(2026, 10, 21, tzinfo=UTC)
GENERATE_TIMEOUT_S = 6 * 3600
# The content columns, encrypted by the worker: table -> (ciphertext column, key id column).
CONTENT = {"requests": ("prompt", "prompt_key"), "outcomes": ("response", "response_key")}

# Columns of the current schemas the generator does not know, and what it wrote in them.
FILLED: dict[str, str] = {}


@functools.cache
def _cipher(keys_dir: str) -> FieldCipher:
    return FieldCipher(LocalKeyStore(Path(keys_dir)))


def encrypt_column(job: EncryptJob) -> tuple[pa.Array, pa.Array, float, float]:
    """(key ids, ciphertexts, seconds, CPU seconds): the projector's encryption, one call per row."""
    t0, c0 = time.perf_counter(), own_cpu_s()
    cipher = _cipher(job.keys_dir)
    text = corpus(job.corpus_seed)
    encrypt = cipher.encrypt
    tenants, column, now = job.tenants, job.column, job.now
    keys: list[str] = []
    blobs: list[bytes] = []
    add_key, add_blob = keys.append, blobs.append
    for t, s, e, o, n in zip(
        job.tenant_idx.tolist(),
        job.subjects,
        job.event_ids.to_pylist(),
        job.starts.tolist(),
        job.lengths.tolist(),
        strict=True,
    ):
        k, b = encrypt(tenants[t], s or None, e, column, text[o : o + n], now)
        add_key(k)
        add_blob(b)
    out = pa.array(keys, type=pa.string()), pa.array(blobs, type=pa.binary())
    return (*out, time.perf_counter() - t0, own_cpu_s() - c0)


# --- sealing and writing ---------------------------------------------------------------------------


def _table(table: str, cols: dict[str, pa.Array], n_rows: int) -> pa.Table:
    """The columns as a table of the current schema; columns the generator does not know (added to
    the schema after it was written) are filled, and noted in ``FILLED``."""
    schema = SCHEMAS[table]
    for f in schema:
        if f.name not in cols:
            cols[f.name] = const("active", n_rows) if f.name == "policy_stage" else pa.nulls(n_rows, f.type)
            FILLED[f"{table}.{f.name}"] = "active" if f.name == "policy_stage" else "null"
    return pa.Table.from_arrays([cols[name] for name in schema.names], schema=schema)


def write_chunk(
    writer: SealedWriter, gen: StoreGenerator, chunk: Chunk, encrypted: dict[str, tuple[pa.Array, pa.Array]]
) -> int:
    """Seal and write every file of a chunk, then commit it: one flush. Returns the files written."""
    files = 0
    for table in WRITTEN_TABLES:
        cols = chunk.columns.pop(table)
        if table in CONTENT:
            keys, blobs = encrypted[table]
            cols[CONTENT[table][0]] = blobs
            cols[CONTENT[table][1]] = keys
        data = _table(table, cols, chunk.rows[table])
        del cols
        part, reg, off = chunk.partition[table], chunk.region[table], chunk.offset[table]
        topic = getattr(Topics(), TOPIC_OF_TABLE[table])
        # One file per (partition, region), rows in offset order.
        for q in np.unique(part).tolist():
            for r in np.unique(reg[part == q]).tolist():
                idx = np.flatnonzero((part == q) & (reg == r))
                idx = idx[np.argsort(off[idx], kind="stable")]
                start, end = chunk.ranges[(topic, q)]
                writer.write(
                    data.take(pa.array(idx)),
                    table=table,
                    region=gen.p.regions[r],
                    topic=topic,
                    partition=q,
                    first_offset=start,
                    last_offset=end - 1,
                )
                files += 1
        del data
    writer.commit(chunk.checkpoint, datetime.now(UTC))
    return files


@dataclass
class _Writing:
    """Progress and time accounts of writing a store, flush by flush."""

    writer: SealedWriter
    gen: StoreGenerator
    t0: float = field(default_factory=time.perf_counter)
    rows: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)
    gen_s: float = 0.0
    enc_wait_s: float = 0.0
    write_s: float = 0.0
    enc_s: float = 0.0
    enc_cpu: float = 0.0
    encrypted_fields: int = 0
    files: int = 0
    flushes: int = 0

    def finish(self, chunk: Chunk, futures: dict[str, Future[Any]]) -> None:
        """Wait for a chunk's encrypted columns, then seal and write it."""
        w0 = time.perf_counter()
        encrypted = {}
        for table, fut in futures.items():
            keys, blobs, secs, cpu = fut.result()
            encrypted[table] = (keys, blobs)
            self.enc_s += secs
            self.enc_cpu += cpu
            self.encrypted_fields += len(blobs)
        w1 = time.perf_counter()
        self.enc_wait_s += w1 - w0
        self.files += write_chunk(self.writer, self.gen, chunk, encrypted)
        self.write_s += time.perf_counter() - w1
        self.flushes += 1
        self.rows.update(chunk.rows)
        print(
            f"    flush {self.flushes}: {sum(self.rows.values()):,} rows, {self.files} files, "
            f"{time.perf_counter() - self.t0:.0f} s",
            flush=True,
        )

    def run(self, pool: ProcessPoolExecutor) -> None:
        """Every chunk: encryption of chunk k+1 (in ``pool``) overlaps with sealing chunk k (here)."""
        pending: tuple[Chunk, dict[str, Future[Any]]] | None = None
        chunks = iter(self.gen)
        while True:
            g0 = time.perf_counter()
            chunk = next(chunks, None)
            if chunk is None:
                break
            futures = {table: pool.submit(encrypt_column, job) for table, job in chunk.jobs.items()}
            chunk.jobs = {}
            self.samples.extend(chunk.sample_requests)
            self.gen_s += time.perf_counter() - g0
            if pending is not None:
                self.finish(*pending)
            pending = (chunk, futures)
        if pending is not None:
            self.finish(*pending)


def generate(
    root: str, decisions: int, chunk_size: int, seed: int, days: int, start_iso: str
) -> dict[str, Any]:
    """Child: write the store; encryption of chunk k+1 overlaps with sealing chunk k (two cores)."""
    rootp = Path(root)
    start = datetime.fromisoformat(start_iso)
    gen = StoreGenerator(default_policy(), decisions, chunk_size, seed, days, start, rootp / "_keys")
    w = _Writing(SealedWriter(rootp, signing_key()), gen)
    c0 = own_cpu_s()
    # The encryption runs in one worker process while this one seals and writes.
    with (
        ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool,
        CallTimer(sealing_targets()) as timer,
    ):
        w.run(pool)
    seconds = time.perf_counter() - w.t0
    size = sum(f.stat().st_size for f in rootp.rglob("*") if f.is_file())
    parquet = sum(f.stat().st_size for f in rootp.glob("region=*/*/*.parquet"))
    return {
        "decisions": decisions,
        "chunk_decisions": chunk_size,
        "days": days,
        "start": start_iso,
        "seconds": round(seconds, 1),
        "cpu_s_main": round(own_cpu_s() - c0, 1),
        "generate_s": round(w.gen_s, 1),
        "wait_for_encryption_s": round(w.enc_wait_s, 1),
        "seal_and_write_s": round(w.write_s, 1),
        "encryption": {
            "fields": w.encrypted_fields,
            "seconds_in_worker": round(w.enc_s, 1),
            "cpu_s_in_worker": round(w.enc_cpu, 1),
            "us_per_field": round(w.enc_s / max(w.encrypted_fields, 1) * 1e6, 2),
            "note": "FieldCipher.encrypt, one call per prompt/response, in one worker process overlapping the sealing",
        },
        "timed_calls": timer.result(),
        "flushes": w.flushes,
        "files": w.files,
        "rows": dict(w.rows),
        "rows_total": sum(w.rows.values()),
        "store_bytes": size,
        "store_gb": round(size / 1e9, 2),
        "parquet_gb": round(parquet / 1e9, 2),
        "peak_rss_mb_writer": round(own_rss_mb(), 1),
        "sample_requests": w.samples,
        "tenant_shares": dict(zip(gen.p.tenants, TENANT_W, strict=True)),
        "columns_filled": dict(FILLED),
        "file_rows": _file_rows(rootp),
    }


def _file_rows(root: Path) -> dict[str, Any]:
    rows = sorted(e["rows"] for e in committed_files(root))
    if not rows:
        return {}
    return {"min": rows[0], "median": rows[len(rows) // 2], "max": rows[-1], "files": len(rows)}


# --- reuse or build -------------------------------------------------------------------------------


def _looks_like_ours(root: Path) -> bool:
    """Only an evidence store (or nothing) may be deleted to make room for a new one."""
    if not root.exists():
        return True
    names = {p.name for p in root.iterdir()}
    return not names or bool(names & {"manifest.jsonl", "manifest.head.json"})


def _reusable(args: Params) -> dict[str, Any] | None:
    """The figures of a complete store of the same size already under ``--root``, with ``--reuse``."""
    path = meta_path(args.root)
    if not (args.reuse and path.exists()):
        return None
    meta = json.loads(path.read_text())
    if meta.get("complete") and meta["generation"]["decisions"] == args.decisions:
        print(
            f"[store] reusing {args.root} ({args.decisions:,} decisions, generated {meta['generated_at']})",
            flush=True,
        )
        return {**meta["generation"], "reused": True, "generated_at": meta["generated_at"]}
    print(f"[store] {args.root} holds another store; generating anew", flush=True)
    return None


def build_store(args: Params) -> dict[str, Any]:
    root = args.root
    reused = _reusable(args)
    if reused is not None:
        return reused
    if not _looks_like_ours(root):
        raise BenchError(f"{root} exists and is not a benchmark store: refusing to delete it")
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    print(
        f"[store] generating {args.decisions:,} decisions in chunks of {args.chunk:,} under {root}",
        flush=True,
    )
    gen = run_child(
        "store generation",
        GENERATE_TIMEOUT_S,
        generate,
        *(str(root), args.decisions, args.chunk, args.seed, args.days, STORE_START.isoformat()),
    )
    meta = {
        "complete": True,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "generation": gen,
    }
    meta_path(root).write_text(json.dumps(meta, indent=1) + "\n")
    return {**gen, "reused": False, "generated_at": meta["generated_at"]}
