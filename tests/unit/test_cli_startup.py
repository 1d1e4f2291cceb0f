"""The command line starts without loading what a read-only evidence command does not need."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nexuscore.cli._common import DEFAULT_POLICY_FILE
from nexuscore.policy import DEFAULT_POLICY_PATH


def test_the_cli_default_policy_is_the_bundled_one() -> None:
    assert DEFAULT_POLICY_FILE == DEFAULT_POLICY_PATH
    assert DEFAULT_POLICY_FILE.is_file()


def test_the_cli_and_the_evidence_package_load_neither_the_policy_model_nor_the_projector() -> None:
    # A fresh interpreter: what `nexuscore evidence residency` or `lineage` imports before it runs.
    code = (
        "import sys, json; import nexuscore.cli; from nexuscore.projections import EvidenceStore, lineage_at; "
        "from nexuscore.services import lineage_of; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith(('nexuscore', 'aiokafka', 'faust')))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)  # noqa: S603
    loaded = set(json.loads(done.stdout))
    assert "nexuscore.projections._lineage" in loaded
    assert not loaded & {
        "nexuscore.policy",
        "nexuscore.projections._projector",
        "nexuscore.core",
        "nexuscore.streams",
        "aiokafka",
        "faust",
    }


def test_a_running_stage_does_not_load_duckdb() -> None:
    # What `nexuscore run decider|worker|projector` imports: DuckDB (about 15 MB resident) is the
    # evidence commands' engine; the projector seals without it unless a value needs DuckDB's rendering.
    code = (
        "import sys; import nexuscore.cli; from nexuscore.services import run_projector, run_decider, run_worker; "
        "from nexuscore.projections import Projector, SealedWriter; print('duckdb' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, text=True)  # noqa: S603
    assert done.stdout.strip() == "False"


def test_every_public_name_of_the_lazily_loaded_packages_resolves() -> None:
    from nexuscore import projections, services

    for package in (projections, services):
        for name in package.__all__:
            assert getattr(package, name) is not None, name
        with pytest.raises(AttributeError):
            package.no_such_name  # noqa: B018
