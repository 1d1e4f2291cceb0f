"""Function lengths in the benchmarks: ``python -m bench.function_lengths [--max 80] [--top 10] [PATH ...]``.

A function's length is its lines from ``def`` to its last line (docstring, comments and blank lines
included; a nested function counts in its parent too). Prints the longest ones and how many exceed
``--max``; exits 1 if any does. Default PATH: the ``bench`` package.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def function_lengths(path: Path) -> Iterator[tuple[int, str]]:
    """(lines, "file:line qualified.name") of every function and method in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def walk(node: ast.AST, prefix: str) -> Iterator[tuple[int, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                assert child.end_lineno is not None
                yield child.end_lineno - child.lineno + 1, f"{path.name}:{child.lineno} {name}"
                yield from walk(child, f"{name}.")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, f"{prefix}{child.name}.")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[BENCH])
    parser.add_argument("--max", type=int, default=80, help="Longest allowed function (default 80).")
    parser.add_argument("--top", type=int, default=10, help="How many of the longest to list.")
    ns = parser.parse_args(argv)
    files = sorted(f for p in ns.paths for f in ([p] if p.is_file() else p.rglob("*.py")))
    found = sorted((item for f in files for item in function_lengths(f)), reverse=True)
    for lines, where in found[: ns.top]:
        print(f"{lines:>5}  {where}")
    over = [item for item in found if item[0] > ns.max]
    print(f"{len(found)} functions in {len(files)} files; {len(over)} longer than {ns.max} lines")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
