"""``nexuscore run broker --data-dir DIR --port P`` keeps its log: records produced before a stop are
read back after a start on the same folder and port, by a new broker object as a new process would."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from nexuscore._broker import LocalKafka, ensure_kafka_jars
from nexuscore.kernel.errors import BrokerError
from nexuscore.transport import Topics, ensure_topics, start_client
from tests.integration._topics import read_from_start

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    await start_client(producer, bootstrap)
    try:
        for v in values:
            await producer.send_and_wait(topic, v, key=b"k")
    finally:
        await producer.stop()


async def read_all(bootstrap: str, topic: str, n: int) -> list[bytes]:
    return await read_from_start(bootstrap, topic, lambda values: len(values) >= n, bytes)


def test_the_log_survives_a_stop_and_a_start_on_the_same_folder_and_port(tmp_path: Path) -> None:
    ensure_kafka_jars()
    folder, port = tmp_path / "kafka", free_port()
    topics = Topics("persist")
    values = [f"record-{i}".encode() for i in range(20)]
    with LocalKafka(data_dir=folder, port=port) as first:
        assert first.bootstrap == f"127.0.0.1:{port}"
        asyncio.run(ensure_topics(first.bootstrap, topics))
        asyncio.run(produce(first.bootstrap, topics.requests, values))
    assert (folder / "data" / "meta.properties").is_file(), "stop() kept the folder"
    with LocalKafka(data_dir=folder, port=port) as second:
        assert sorted(asyncio.run(read_all(second.bootstrap, topics.requests, len(values)))) == sorted(values)
    with LocalKafka(data_dir=folder) as third:  # no port: the one the folder was made with
        assert third.bootstrap == f"127.0.0.1:{port}"


def test_another_port_or_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    ensure_kafka_jars()
    folder, port = tmp_path / "kafka", free_port()
    with LocalKafka(data_dir=folder, port=port):
        pass
    with pytest.raises(BrokerError, match=f"made for port {port}"):
        LocalKafka(data_dir=folder, port=free_port()).start()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(BrokerError, match="neither empty nor a broker"):
        LocalKafka(data_dir=foreign).start()
    assert (foreign / "holiday.jpg").exists()


def test_the_cli_command_announces_the_port_it_was_given(tmp_path: Path) -> None:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "nexuscore",
        "run",
        "broker",
        "--data-dir",
        str(tmp_path / "k"),
        "--port",
        str(port),
    ]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) as proc:  # noqa: S603
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert f"listening on 127.0.0.1:{port}" in line, line
        finally:
            proc.terminate()
            assert proc.wait(timeout=60) == 0
    assert (tmp_path / "k" / "data" / "meta.properties").is_file()
