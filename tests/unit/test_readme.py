"""The README is the front door: it must document every evidence table and column that exists."""

from __future__ import annotations

import re
from pathlib import Path

from nexuscore.projections import SCHEMAS

README = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")


def test_every_evidence_table_and_column_is_documented() -> None:
    missing = []
    for table, schema in SCHEMAS.items():
        if f"| `{table}` |" not in README:
            missing.append(table)
        for name in schema.names:
            if not re.search(rf"`{re.escape(name)}`", README):
                missing.append(f"{table}.{name}")
    assert not missing, f"README does not document: {missing}"


def test_the_readme_gives_the_two_commands() -> None:
    assert "make demo" in README and "make test" in README
