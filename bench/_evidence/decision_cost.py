"""What one decision costs the projector, step by step (docs/decisions/0002-projector-decoding.md).

``python -m bench._evidence.decision_cost [--requests N]``: the ``RequestDecided`` events of a
recorded history, encoded as the decider publishes them, taken through the projector's own steps
one step at a time over all of them; CPU µs per decision for each step. No broker, no files.
"""

from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from typing import Any

from bench._harness import own_cpu_s
from nexuscore.projections._leaves import column_leaves
from nexuscore.projections._tables import ROW_BUILDERS, SCHEMAS, sourced_values, to_columns, to_table
from nexuscore.schemas import AvroCodec, RequestDecided
from tests.factories import POLICY, run_history


def timed(per: int, step: Callable[[], Any]) -> tuple[float, Any]:
    """(CPU µs per item, the step's result), without the cyclic collector walking the inputs again
    and again (the projector freezes it out of its rows too: ``Projector.run``)."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        c0 = own_cpu_s()
        out = step()
        return (own_cpu_s() - c0) / per * 1e6, out
    finally:
        gc.enable()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=4_000, help="requests of the history (default 4000)")
    n_requests = ap.parse_args().requests
    codec = AvroCodec()
    messages = [
        codec.encode(e) for e in run_history(POLICY, n_requests, seed=7) if isinstance(e, RequestDecided)
    ]
    n = len(messages)
    source = ("eu", "decisions", 0, 0)
    decode, records = timed(n, lambda: [codec.decode_record(m)[1] for m in messages])
    build, rows = timed(n, lambda: [ROW_BUILDERS[RequestDecided](r)[0][1] for r in records])
    columns_us, columns = timed(
        n, lambda: to_columns("decisions", [sourced_values("decisions", r, source) for r in rows])
    )
    arrow, _ = timed(n, lambda: to_table("decisions", columns))
    leaves, _ = timed(n, lambda: column_leaves(SCHEMAS["decisions"], columns))
    print(f"{n} decisions, CPU µs a decision:")
    for name, us in [
        ("fastavro decode", decode),
        ("row dict (_tables._decided)", build),
        ("row tuples to columns", columns_us),
        ("columns to Arrow", arrow),
        ("leaves (msgspec JSON + sha256)", leaves),
    ]:
        print(f"  {name:32s} {us:6.1f}")


if __name__ == "__main__":
    main()
