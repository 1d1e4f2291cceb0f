"""Integration tests for the development Kafka broker helpers in ``nexuscore._broker``.

These start real single-node KRaft brokers with the local ``java`` (no Docker needed); the broker
jars are fetched once by Maven into ``.kafka/libs`` (or ``$NEXUSCORE_KAFKA_LIBS``).
"""

from __future__ import annotations

import asyncio
import errno
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

import nexuscore._broker as broker_mod
from nexuscore._broker import (
    LocalKafka,
    docker_available,
    ensure_kafka_jars,
    kafka_broker,
    kafka_libs_dir,
)
from nexuscore.kernel.errors import BrokerError

pytestmark = pytest.mark.integration

POM = broker_mod.REPO_ROOT / "kafka" / "pom.xml"


# -- helpers ----------------------------------------------------------------------------------------


def unused_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def assert_port_free(port: int) -> None:
    """Nothing accepts connections on the port, and a new listener could bind it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # REUSEADDR so connections left in TIME_WAIT do not count; a live listener still fails bind.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen()


async def create_topic(bootstrap: str, name: str, partitions: int = 4) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1)]
        )
    finally:
        await admin.close()
    assert [(topic, code) for topic, code, *_ in response.topic_errors] == [(name, 0)]


async def list_topics(bootstrap: str) -> list[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        topics: list[str] = await admin.list_topics()
    finally:
        await admin.close()
    return topics


async def consume(bootstrap: str, topic: str, count: int, *, group_id: str) -> list[tuple[bytes, bytes]]:
    """Read ``count`` committed records from the beginning and commit the group's offsets."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    try:
        records: list[tuple[bytes, bytes]] = []
        async with asyncio.timeout(30):
            while len(records) < count:
                record = await consumer.getone()
                assert record.key is not None and record.value is not None
                records.append((record.key, record.value))
        # Needs __consumer_offsets, created on demand although auto.create.topics.enable=false.
        await consumer.commit()
        return records
    finally:
        await consumer.stop()


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka_libs() -> Path:
    """The shared jar folder, fetched by Maven if this machine has never done it."""
    return ensure_kafka_jars()


@pytest.fixture
def local_kafka(kafka_libs: Path) -> Iterator[LocalKafka]:
    broker = LocalKafka(kafka_libs)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# -- ensure_kafka_jars ------------------------------------------------------------------------------


def test_ensure_kafka_jars_second_call_does_not_run_maven(
    kafka_libs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert kafka_libs == kafka_libs_dir().absolute()
    assert any(kafka_libs.glob("kafka_2.13-*.jar"))
    marker = kafka_libs / ".complete"
    marker_before = marker.stat()
    folder_inode = kafka_libs.stat().st_ino

    # With an empty PATH, any attempt to run Maven (or even look for it) would raise BrokerError.
    monkeypatch.setenv("PATH", "")
    assert ensure_kafka_jars() == kafka_libs

    marker_after = marker.stat()
    assert (marker_after.st_ino, marker_after.st_mtime_ns) == (
        marker_before.st_ino,
        marker_before.st_mtime_ns,
    )
    assert kafka_libs.stat().st_ino == folder_inode  # not replaced by a new fetch


def test_ensure_kafka_jars_refetches_after_pom_change(tmp_path: Path, kafka_libs: Path) -> None:
    # kafka_libs: Maven's local cache is warm, so this fetch only copies files.
    libs = tmp_path / "libs"
    assert ensure_kafka_jars(libs) == libs.absolute()
    digest = (libs / ".complete").read_text()
    assert len(digest) == 64
    assert not list(tmp_path.glob(".libs-staging-*"))  # the staging folder was renamed into place

    # A marker from another pom.xml (e.g. before a Kafka upgrade) means: fetch again, replace the folder.
    (libs / ".complete").write_text("0" * 64)
    (libs / "leftover-from-old-kafka.jar").write_bytes(b"")
    assert ensure_kafka_jars(libs) == libs.absolute()
    assert (libs / ".complete").read_text() == digest
    assert not (libs / "leftover-from-old-kafka.jar").exists()
    assert any(libs.glob("kafka_2.13-*.jar"))


def test_ensure_kafka_jars_without_maven_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(BrokerError, match="'mvn' was not found on PATH"):
        ensure_kafka_jars(tmp_path / "libs")
    assert not (tmp_path / "libs").exists()


def test_ensure_kafka_jars_never_deletes_a_foreign_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "libs"
    foreign.mkdir()
    (foreign / "precious.jar").write_bytes(b"x")
    with pytest.raises(BrokerError, match="was not filled by ensure_kafka_jars"):
        ensure_kafka_jars(foreign)
    assert (foreign / "precious.jar").read_bytes() == b"x"


# -- LocalKafka -------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_local_kafka_produce_consume_then_stop_cleans_up(local_kafka: LocalKafka) -> None:
    bootstrap = local_kafka.bootstrap
    data_dir, port = local_kafka.data_dir, local_kafka.port
    assert data_dir is not None and port is not None
    assert bootstrap == f"127.0.0.1:{port}"
    assert data_dir.name.startswith("nexuscore-kafka-")
    assert local_kafka.running

    topic = "nexuscore.test.roundtrip"
    await create_topic(bootstrap, topic, partitions=4)

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"hello", key=b"k1")
    finally:
        await producer.stop()

    # A transaction needs __transaction_state, which must appear although auto-creation is off.
    txn_producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id="nexuscore-test-txn")
    await txn_producer.start()
    try:
        async with txn_producer.transaction():
            await txn_producer.send_and_wait(topic, b"in-a-transaction", key=b"k1")
    finally:
        await txn_producer.stop()

    records = await consume(bootstrap, topic, 2, group_id="nexuscore-test-roundtrip")
    # Same key, same partition: the order is the produce order.
    assert records == [(b"k1", b"hello"), (b"k1", b"in-a-transaction")]
    assert {"__consumer_offsets", "__transaction_state", topic} <= set(await list_topics(bootstrap))

    # An explicitly configured broker is used as-is: nothing new is started.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEXUSCORE_BOOTSTRAP", bootstrap)
        with kafka_broker() as yielded:
            assert yielded == bootstrap

    local_kafka.stop()
    assert not local_kafka.running
    assert local_kafka.data_dir is None
    assert not data_dir.exists()
    assert_port_free(port)
    local_kafka.stop()  # idempotent


@pytest.mark.asyncio
async def test_local_kafka_restart_keeps_ports_and_data(local_kafka: LocalKafka) -> None:
    bootstrap, data_dir = local_kafka.bootstrap, local_kafka.data_dir
    topic = "nexuscore.test.restart"
    await create_topic(bootstrap, topic, partitions=2)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"before-restart", key=b"k")
    finally:
        await producer.stop()

    # Called from inside a running event loop on purpose: the readiness wait must cope with that.
    assert local_kafka.restart() == bootstrap
    assert local_kafka.data_dir == data_dir

    assert await consume(bootstrap, topic, 1, group_id="nexuscore-test-restart") == [
        (b"k", b"before-restart")
    ]


def test_local_kafka_retries_when_a_port_is_taken(kafka_libs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_ports = broker_mod._free_ports
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = int(squatter.getsockname()[1])
        calls: list[int] = []

        def first_pick_is_taken(count: int) -> list[int]:
            calls.append(count)
            return [taken, *real_free_ports(count - 1)] if len(calls) == 1 else real_free_ports(count)

        monkeypatch.setattr(broker_mod, "_free_ports", first_pick_is_taken)
        with LocalKafka(kafka_libs) as broker:
            assert broker.port != taken
            assert len(calls) == 2
            assert asyncio.run(list_topics(broker.bootstrap)) == []


def test_local_kafka_bad_config_reports_the_log(kafka_libs: Path) -> None:
    broker = LocalKafka(kafka_libs, overrides={"log.retention.hours": "not-a-number"})
    with pytest.raises(
        BrokerError, match="Invalid value not-a-number for configuration log.retention.hours"
    ) as err:
        broker.start()
    assert not broker.running
    assert broker.data_dir is None
    broker.stop()
    # The small post-mortem folder (broker.log, server.properties) is kept and named in the message.
    match = re.search(r"\(log: (\S+/broker\.log)\)", str(err.value))
    assert match is not None, str(err.value)
    post_mortem = Path(match.group(1)).parent
    try:
        assert sorted(p.name for p in post_mortem.iterdir()) == ["broker.log", "server.properties"]
    finally:
        shutil.rmtree(post_mortem)


# -- kafka_broker -----------------------------------------------------------------------------------


@pytest.mark.timeout(30)  # "fast": it must not wait out a long connect loop
def test_unreachable_nexuscore_bootstrap_fails_fast_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    address = f"127.0.0.1:{unused_port()}"
    monkeypatch.setenv("NEXUSCORE_BOOTSTRAP", address)
    with pytest.raises(BrokerError, match=re.escape(address)), kafka_broker():
        pytest.fail("kafka_broker() must not yield an unreachable broker")


def test_kafka_broker_without_docker_runs_local_kafka(
    kafka_libs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NEXUSCORE_BOOTSTRAP", raising=False)
    monkeypatch.setattr(broker_mod, "docker_available", lambda: False)
    with kafka_broker() as bootstrap:
        assert bootstrap.startswith("127.0.0.1:")
        asyncio.run(broker_mod.wait_for_broker(bootstrap, 10))
    assert_port_free(int(bootstrap.rpartition(":")[2]))


@pytest.mark.skipif(not docker_available(), reason="no Docker engine answers on this machine")
def test_kafka_broker_with_docker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NEXUSCORE_BOOTSTRAP", raising=False)
    with kafka_broker() as bootstrap:
        asyncio.run(broker_mod.wait_for_broker(bootstrap, 30))


@pytest.mark.timeout(20)  # "quickly": a hanging Docker socket must not hold the suite
def test_docker_available_answers_quickly() -> None:
    assert isinstance(docker_available(), bool)
