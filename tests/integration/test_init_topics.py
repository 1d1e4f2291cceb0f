"""``nexuscore run init-topics``: a deployment's one-shot init creates every topic of its namespace
(named ``NS.nexus.*``) with the partition count asked for, governance with one, and may run again;
topics that exist already are given the settings this version needs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from nexuscore.transport import Topics, partition_counts, start_client

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


def configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, str]]:
    async def describe() -> dict[str, dict[str, str]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await start_client(admin, bootstrap)
        try:
            answers = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
            )
        finally:
            await admin.close()
        return {r[3]: {e[0]: e[1] for e in r[4]} for a in answers for r in a.resources}

    return asyncio.run(describe())


def test_init_gives_topics_made_by_an_earlier_version_the_settings_and_keeps_their_own(
    bootstrap: str,
) -> None:
    """Topics that exist already (an earlier version made them, or a person) get the broker's time
    and the changelog settings this version needs; an operator's own override stays."""
    topics = Topics(f"old-{uuid.uuid4().hex[:8]}")
    changelog = topics.changelogs[0]

    async def create_as_before() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await start_client(admin, bootstrap)
        try:
            await admin.create_topics(
                [NewTopic(topics.requests, 3, 1, topic_configs={"retention.ms": "86400000"}),
                 NewTopic(changelog, 3, 1, topic_configs={"cleanup.policy": "compact"})]
            )  # fmt: skip
        finally:
            await admin.close()

    asyncio.run(create_as_before())
    before = configs(bootstrap, [topics.requests, changelog])
    assert before[topics.requests]["message.timestamp.type"] == "CreateTime"
    done = init(bootstrap, topics.namespace, 3)
    assert done.returncode == 0, done.stderr
    after = configs(bootstrap, [topics.requests, changelog, topics.decisions])
    assert after[topics.requests]["message.timestamp.type"] == "LogAppendTime"
    assert after[topics.requests]["retention.ms"] == "86400000"
    assert after[topics.decisions]["message.timestamp.type"] == "LogAppendTime"
    assert {k: after[changelog][k] for k in ("segment.ms", "min.cleanable.dirty.ratio")} == {
        "segment.ms": "300000",
        "min.cleanable.dirty.ratio": "0.1",
    }
    assert init(bootstrap, topics.namespace, 3).returncode == 0  # nothing left to change
