"""``nexuscore run init-topics``: a deployment's one-shot init creates every topic of its namespace
(named ``NS.nexus.*``) with the partition count asked for, governance with one, and may run again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest

from nexuscore.transport import Topics, partition_counts

pytestmark = pytest.mark.integration


def init(bootstrap: str, namespace: str, partitions: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexuscore", "run", "init-topics", "--bootstrap", bootstrap,
         "--namespace", namespace, "--partitions", str(partitions)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_init_creates_the_namespaces_topics_and_can_run_again(bootstrap: str) -> None:
    namespace = f"init-{uuid.uuid4().hex[:8]}"
    first = init(bootstrap, namespace, 3)
    assert first.returncode == 0, first.stderr
    topics = Topics(namespace)
    counts = asyncio.run(partition_counts(bootstrap, (*topics.all, *topics.changelogs)))
    assert all(name.startswith(f"{namespace}.") for name in counts)
    assert counts.pop(topics.governance) == 1
    assert set(counts.values()) == {3}
    again = init(bootstrap, namespace, 3)
    assert again.returncode == 0, again.stderr


def test_init_refuses_an_invalid_namespace_in_one_line(bootstrap: str) -> None:
    done = init(bootstrap, "no/such", 3)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
