"""Building blocks of the synthetic store: the mix it draws from, and vectorised column helpers.

Everything here builds whole columns at once (numpy draws, pyarrow arrays), never a Python loop per
row: a 10,000,000-decision store has about 60 million rows.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_WORDS = (
    *("account", "payment", "credit", "customer", "risk", "sanctions", "claim", "policy", "review"),
    *("transfer", "limit", "balance", "report", "the", "a", "of", "to", "and", "for", "with", "on"),
    *("is", "was", "please", "check", "whether", "this", "that", "our", "their", "summary"),
    *("decision", "invoice", "counterparty", "exposure", "rating", "memo", "screening", "match"),
    *("alert", "fraud", "chargeback", "merchant"),
)
RISK_W = (50, 30, 17, 3)  # weights of nexuscore._synthetic's RISKS and CLASSES, in their order
CLASS_W = (20, 40, 30, 10)
TIERS = ("small", "mid", "frontier")
TENANT_W = (0.4, 0.3, 0.1, 0.2)  # the default policy's four tenants, in its order
UNKNOWN_FEATURES = ("beta-assistant", "legacy-summariser")
MAX_OUT = (64, 128, 256, 512)
REJECT_SHARE = 0.005  # requests refused at admission, on top of the decisions
SUBJECT_SHARE = 0.02  # requests naming a data subject (a key of its own)
SUBJECTS_PER_TENANT = 50
# Which topic each table's events travel on.
TOPIC_OF_TABLE = {
    "requests": "requests",
    "decisions": "decisions",
    "rejections": "decisions",
    "settlements": "decisions",
    "dispatches": "dispatch",
    "attempts": "attempts",
    "outcomes": "outcomes",
    "reviews": "reviews",  # escalations: a reviewer's denial or the decider's timeout
    "resolutions": "decisions",  # and how each ended
}
WRITTEN_TABLES = tuple(TOPIC_OF_TABLE)
MS = 1000  # microseconds


@functools.cache
def corpus(seed: int) -> str:
    """About 4 MB of words: prompts and responses are slices of it."""
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS)[rng.integers(0, len(_WORDS), 700_000)]
    return " ".join(words.tolist())


def hex_ids(rng: np.random.Generator, n: int) -> pa.StringArray:
    """``n`` random 32-hex-digit ids (as ``derive_id`` makes), built without a Python loop."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    out = np.empty((n, 32), dtype=np.uint8)
    out[:, 0::2] = _HEX[raw >> 4]
    out[:, 1::2] = _HEX[raw & 15]
    offsets = np.arange(0, 32 * (n + 1), 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(out.tobytes()))


def take(values: Sequence[Any] | pa.Array, idx: np.ndarray, type_: pa.DataType | None = None) -> pa.Array:
    """``values[idx]`` as an Arrow array (a lookup table indexed by a column of codes)."""
    arr = values if isinstance(values, pa.Array) else pa.array(list(values), type=type_)
    return arr.take(pa.array(idx, type=pa.int64()))


def ts(us: np.ndarray) -> pa.Array:
    """Microseconds since the epoch as a UTC timestamp column."""
    return pa.array(us.astype(np.int64), type=TS)


def const(value: Any, n: int, type_: pa.DataType | None = None) -> pa.Array:
    """``value`` repeated ``n`` times."""
    return pa.array([value], type=type_ or pa.string()).take(pa.array(np.zeros(n, dtype=np.int64)))


def choice(rng: np.random.Generator, n: int, weights: Sequence[float]) -> np.ndarray:
    """``n`` indexes drawn with the given (unnormalised) weights."""
    p = np.asarray(weights, dtype=float)
    return rng.choice(len(p), size=n, p=p / p.sum())


def grouped_cumsum(keys: np.ndarray, values: np.ndarray, carry: dict[int, int]) -> np.ndarray:
    """Inclusive running sum of ``values`` per key, in row order, continuing from ``carry``."""
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    k, v = keys[order], values[order].astype(np.int64)
    cs = np.cumsum(v)
    starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
    group = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(k)]))
    inclusive = cs - (cs[starts] - v[starts])[group]
    base = np.array([carry.get(int(u), 0) for u in k[starts]], dtype=np.int64)
    inclusive += base[group]
    for u, last in zip(k[starts], inclusive[np.r_[starts[1:], len(k)] - 1], strict=True):
        carry[int(u)] = int(last)
    out = np.empty_like(inclusive)
    out[order] = inclusive
    return out
