"""What changed between two policies: every differing field, by path, with lists of things that have
ids (deployments, tenants, features, rules) matched by id rather than by position."""

from __future__ import annotations

import json
from typing import Any

from nexuscore.policy._model import RoutingPolicy

Change = tuple[str, Any, Any]  # (path, old, new); None stands for "absent"


def policy_diff(old: RoutingPolicy, new: RoutingPolicy) -> list[Change]:
    changes: list[Change] = []
    _walk("", json.loads(old.canonical_bytes), json.loads(new.canonical_bytes), changes)
    return changes


def _walk(path: str, a: Any, b: Any, out: list[Change]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            _walk(f"{path}.{key}" if path else key, a.get(key), b.get(key), out)
    elif isinstance(a, list) and isinstance(b, list) and _keyed(a) and _keyed(b):
        ids_a, ids_b = {x["id"]: x for x in a}, {x["id"]: x for x in b}
        for key in [*ids_a, *(k for k in ids_b if k not in ids_a)]:
            _walk(f"{path}[{key}]", ids_a.get(key), ids_b.get(key), out)
    elif a != b:
        out.append((path, a, b))


def _keyed(items: list[Any]) -> bool:
    return all(isinstance(x, dict) and "id" in x for x in items)
