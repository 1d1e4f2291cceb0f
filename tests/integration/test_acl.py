"""The Kafka ACLs of ``nexuscore._acls`` hold on a real broker: a producer credential stays off the
control topics, and every principal can do exactly what the table grants.

The broker is a local KRaft Kafka 4.1 with SASL/PLAIN on both listeners and the StandardAuthorizer
(``LocalKafka(sasl_users=...)``, ``allow.everyone.if.no.acl.found=false``); the topics are created
and one record put on partition 0 of each as ``admin`` (the only super user), then ``apply_acls``
sets the table. The clients are plain aiokafka ones logged in as each principal. Every client
operation is bounded by ``OP_TIMEOUT_S``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
)

from nexuscore._acls import PRINCIPALS, Grant, Operation, acl_table, apply_acls
from nexuscore._broker import LocalKafka, ensure_kafka_jars
from nexuscore._demo import decider_args, projector_args
from nexuscore._devkeys import dev_keys
from nexuscore._services import Services
from nexuscore._synthetic import publish, synthetic_requests
from nexuscore.kernel.errors import BrokerError
from nexuscore.policy import DEFAULT_POLICY_PATH, default_policy
from nexuscore.projections import EvidenceStore
from nexuscore.schemas import AvroCodec, InferenceRequested
from nexuscore.transport import (
    KafkaLogin,
    Topics,
    login_from_env,
    new_producer,
    start_client,
    wanted_configs,
)
from tests.waiting import eventually

pytestmark = pytest.mark.integration

OP_TIMEOUT_S = 15.0
TOPICS = Topics()
TABLE = acl_table(TOPICS)
EVERY_TOPIC = TOPICS.all + TOPICS.changelogs
# Kafka error codes in CreateTopics answers.
TOPIC_AUTHORIZATION_FAILED, TOPIC_ALREADY_EXISTS = 29, 36


# -- helpers ----------------------------------------------------------------------------------------


def granted(principal: str, op: Operation, topic: str) -> bool:
    """What the table says: does ``principal`` hold ``op`` on ``topic``?"""
    return any(
        g.resource == "topic"
        and op in g.operations
        and (g.name == topic or (g.prefixed and topic.startswith(g.name)))
        for g in TABLE[principal]
    )


@asynccontextmanager
async def producer(kafka: LocalKafka, user: str, idempotent: bool = True) -> AsyncIterator[AIOKafkaProducer]:
    """An acks=all producer, idempotent as every NexusCore producer is (streams/_kafka.py)."""
    client = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        acks="all",
        enable_idempotence=idempotent,
        **kafka.client_config(user),
    )
    try:
        await asyncio.wait_for(client.start(), OP_TIMEOUT_S)
    except BaseException:
        await client.stop()  # a refused start leaves its connections open
        raise
    try:
        yield client
    finally:
        await client.stop()


@asynccontextmanager
async def admin(kafka: LocalKafka, user: str) -> AsyncIterator[AIOKafkaAdminClient]:
    client = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, **kafka.client_config(user))
    await asyncio.wait_for(client.start(), OP_TIMEOUT_S)
    try:
        yield client
    finally:
        await client.close()


async def send(client: AIOKafkaProducer, topic: str) -> None:
    await asyncio.wait_for(client.send_and_wait(topic, b"acl-test", key=b"acl"), OP_TIMEOUT_S)


async def read_first(kafka: LocalKafka, user: str, topic: str) -> bytes:
    """The first record of partition 0, read as ``user`` with an assign()ed consumer (no group).

    Raises TopicAuthorizationFailedError when the broker refuses: in its metadata answer for a
    topic ``user`` may not even describe (aiokafka would otherwise wait for a leader forever), or
    in its fetch answer for a topic ``user`` may describe but not read.
    """
    async with admin(kafka, user) as client:
        (described,) = await asyncio.wait_for(client.describe_topics([topic]), OP_TIMEOUT_S)
    if described["error_code"] == TOPIC_AUTHORIZATION_FAILED:
        raise TopicAuthorizationFailedError(topic)
    assert described["error_code"] == 0, described
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap, enable_auto_commit=False, **kafka.client_config(user)
    )
    await asyncio.wait_for(consumer.start(), OP_TIMEOUT_S)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        async with asyncio.timeout(OP_TIMEOUT_S):
            await consumer.seek_to_beginning(tp)
            while not (batch := await consumer.getmany(tp, timeout_ms=500)):
                pass
        value: bytes = batch[tp][0].value
        return value
    finally:
        await consumer.stop()


async def commit_in_group(kafka: LocalKafka, user: str, group: str, topic: str) -> None:
    """Commit offset 0 of ``topic``'s partition 0 for ``group``, as the projector commits (assign, no join)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap,
        group_id=group,
        enable_auto_commit=False,
        **kafka.client_config(user),
    )
    await asyncio.wait_for(consumer.start(), OP_TIMEOUT_S)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await asyncio.wait_for(consumer.commit({tp: 0}), OP_TIMEOUT_S)
    finally:
        await consumer.stop()


async def create_topic(kafka: LocalKafka, user: str, name: str) -> int:
    """CreateTopics as ``user``: the broker's error code for ``name`` (0: created)."""
    async with admin(kafka, user) as client:
        response = await asyncio.wait_for(client.create_topics([NewTopic(name, 1, 1)]), OP_TIMEOUT_S)
    ((topic, code, *_),) = response.topic_errors
    assert topic == name
    return int(code)


async def prepare(kafka: LocalKafka) -> None:
    """As admin: every topic with the settings ensure_topics gives it (the broker's time; changelogs
    compacted), one record on partition 0 of each, then the ACL table."""
    configs = wanted_configs(TOPICS)
    new = [NewTopic(t, 4, 1, topic_configs=configs[t]) for t in EVERY_TOPIC]
    async with admin(kafka, "admin") as client:
        response = await asyncio.wait_for(client.create_topics(new), OP_TIMEOUT_S)
    assert {code for _, code, *_ in response.topic_errors} == {0}
    async with producer(kafka, "admin") as client:
        for topic in EVERY_TOPIC:
            await asyncio.wait_for(
                client.send_and_wait(topic, b"seed", key=b"seed", partition=0), OP_TIMEOUT_S
            )
    await apply_acls(kafka.bootstrap, TABLE, kafka.client_config("admin"), timeout_s=OP_TIMEOUT_S)


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kafka() -> Iterator[LocalKafka]:
    """A SASL broker with authorization on, the topics created and the ACL table applied."""
    broker = LocalKafka(ensure_kafka_jars(), sasl_users={p: f"{p}-secret" for p in PRINCIPALS})
    broker.start()
    try:
        asyncio.run(prepare(broker))
        yield broker
    finally:
        broker.stop()


# -- the producer credential ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_producer_can_publish_requests(kafka: LocalKafka) -> None:
    async with producer(kafka, "producer") as client:
        sent = await asyncio.wait_for(client.send_and_wait(TOPICS.requests, b"r", key=b"acme"), OP_TIMEOUT_S)
    assert sent.topic == TOPICS.requests and sent.offset >= 0


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "topic",
    [TOPICS.governance, TOPICS.reviews, TOPICS.decisions, TOPICS.dispatch, TOPICS.outcomes, TOPICS.circuits],
)
async def test_producer_is_refused_on_control_topics(kafka: LocalKafka, topic: str) -> None:
    async with producer(kafka, "producer") as client:
        with pytest.raises(TopicAuthorizationFailedError):
            await send(client, topic)
        await send(client, TOPICS.requests)  # the refusal is per topic: the login still works


@pytest.mark.asyncio
@pytest.mark.parametrize("topic", [TOPICS.decisions, TOPICS.outcomes, TOPICS.requests])
async def test_producer_cannot_read_answers_or_requests(kafka: LocalKafka, topic: str) -> None:
    # decisions/outcomes: not even visible to it; requests: visible (WRITE implies DESCRIBE), not readable.
    with pytest.raises(TopicAuthorizationFailedError):
        await read_first(kafka, "producer", topic)


@pytest.mark.asyncio
async def test_producer_cannot_grant_itself_acls(kafka: LocalKafka) -> None:
    grab = {"producer": (Grant("topic", TOPICS.governance, ("WRITE",), "attempted"),)}
    with pytest.raises(BrokerError, match="refused"):
        await apply_acls(kafka.bootstrap, grab, kafka.client_config("producer"), timeout_s=OP_TIMEOUT_S)
    async with producer(kafka, "producer") as client:
        with pytest.raises(TopicAuthorizationFailedError):
            await send(client, TOPICS.governance)


@pytest.mark.asyncio
async def test_operator_can_write_governance_but_not_requests(kafka: LocalKafka) -> None:
    async with producer(kafka, "operator") as client:
        await send(client, TOPICS.governance)
        with pytest.raises(TopicAuthorizationFailedError):
            await send(client, TOPICS.requests)


# -- the whole table --------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_writes_are_exactly_the_tables(kafka: LocalKafka, principal: str) -> None:
    expected = {t: granted(principal, "WRITE", t) for t in EVERY_TOPIC}
    writer = any(expected.values())
    if not writer:
        # An idempotent producer needs WRITE on some topic (KIP-679): without, it cannot even start.
        with pytest.raises(ClusterAuthorizationFailedError):
            async with producer(kafka, principal):
                pass
    outcome: dict[str, bool] = {}
    async with producer(kafka, principal, idempotent=writer) as client:
        for topic in EVERY_TOPIC:
            try:
                await send(client, topic)
            except TopicAuthorizationFailedError:
                outcome[topic] = False
            else:
                outcome[topic] = True
    assert outcome == expected


@pytest.mark.asyncio
@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_reads_are_exactly_the_tables(kafka: LocalKafka, principal: str) -> None:
    outcome: dict[str, bool] = {}
    for topic in EVERY_TOPIC:
        try:
            assert await read_first(kafka, principal, topic) == b"seed"
        except TopicAuthorizationFailedError:
            outcome[topic] = False
        else:
            outcome[topic] = True
    assert outcome == {t: granted(principal, "READ", t) for t in EVERY_TOPIC}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("owner", "group", "topic", "intruder"),
    [
        ("decider", TOPICS.group("nexuscore-decider"), TOPICS.requests, "projector"),
        ("worker", TOPICS.group("nexuscore-workers"), TOPICS.dispatch, "projector"),
        ("projector", TOPICS.group("nexuscore-projector"), TOPICS.dispatch, "worker"),
    ],
)
async def test_each_consumer_group_is_its_owners(
    kafka: LocalKafka, owner: str, group: str, topic: str, intruder: str
) -> None:
    await commit_in_group(kafka, owner, group, topic)
    # The intruder may read the topic, so the refusal is the group's.
    assert granted(intruder, "READ", topic)
    with pytest.raises(GroupAuthorizationFailedError):
        await commit_in_group(kafka, intruder, group, topic)


@pytest.mark.asyncio
async def test_only_the_decider_creates_topics_and_only_its_own(kafka: LocalKafka) -> None:
    app = TOPICS.group("nexuscore-decider")
    # faust declares its leader topic (new) and the changelogs (made up front) at start.
    assert await create_topic(kafka, "decider", f"{app}-__assignor-__leader") == 0
    assert await create_topic(kafka, "decider", TOPICS.changelogs[0]) == TOPIC_ALREADY_EXISTS
    assert await create_topic(kafka, "decider", "nexus.extra") == TOPIC_AUTHORIZATION_FAILED
    assert await create_topic(kafka, "producer", f"{app}-sneaky") == TOPIC_AUTHORIZATION_FAILED


async def settings_readable(kafka: LocalKafka, user: str) -> set[str]:
    """The topics whose settings (DescribeConfigs) ``user`` may read."""
    async with admin(kafka, user) as client:
        resources = [ConfigResource(ConfigResourceType.TOPIC, t) for t in EVERY_TOPIC]
        answers = await asyncio.wait_for(client.describe_configs(resources), OP_TIMEOUT_S)
    return {name for answer in answers for code, _m, _t, name, *_ in answer.resources if code == 0}


@pytest.mark.asyncio
async def test_the_decider_and_operator_may_read_every_topics_settings_and_nobody_else(
    kafka: LocalKafka,
) -> None:
    for principal in ("decider", "operator"):
        assert await settings_readable(kafka, principal) == set(EVERY_TOPIC), principal
    for principal in ("producer", "worker", "projector", "reviewer"):
        assert await settings_readable(kafka, principal) == set(), principal


async def transact(kafka: LocalKafka, user: str, transactional_id: str) -> None:
    """One committed transaction of one record on ``nexus.decisions``, as ``user`` under that id."""
    client = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, transactional_id=transactional_id, **kafka.client_config(user)
    )
    try:
        await asyncio.wait_for(client.start(), OP_TIMEOUT_S)
        async with client.transaction():
            await send(client, TOPICS.decisions)
    finally:
        await client.stop()


@pytest.mark.asyncio
async def test_transactional_ids_are_the_deciders_own(kafka: LocalKafka) -> None:
    app = TOPICS.group("nexuscore-decider")
    await transact(kafka, "decider", f"{app}-decider-a")  # what ``--transactional`` names its id
    with pytest.raises(TransactionalIdAuthorizationFailed):
        await transact(kafka, "decider", "someone-else")
    with pytest.raises((TransactionalIdAuthorizationFailed, TopicAuthorizationFailedError)):
        await transact(kafka, "producer", f"{app}-decider-a")


@pytest.mark.asyncio
async def test_analyst_sees_no_topic_at_all(kafka: LocalKafka) -> None:
    assert TABLE["analyst"] == ()
    async with admin(kafka, "analyst") as client:
        visible = await asyncio.wait_for(client.list_topics(), OP_TIMEOUT_S)
    assert visible == []


@pytest.mark.asyncio
async def test_applying_the_table_again_changes_nothing(kafka: LocalKafka) -> None:
    count = await apply_acls(kafka.bootstrap, TABLE, kafka.client_config("admin"), timeout_s=OP_TIMEOUT_S)
    assert count == sum(len(g.operations) for grants in TABLE.values() for g in grants)


# -- the stages, each logged in as its own principal -------------------------------------------------

STAGE_REQUESTS = 30


def login_env(kafka: LocalKafka, user: str, folder: Path) -> dict[str, str]:
    """A stage's Kafka login, as a deployment gives it: a user name and a mounted password file."""
    secret = folder / f"{user}.password"
    secret.write_text(kafka.client_config(user)["sasl_plain_password"] + "\n")
    return {
        "NEXUSCORE_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "NEXUSCORE_KAFKA_USERNAME": user,
        "NEXUSCORE_KAFKA_PASSWORD_FILE": str(secret),
    }


def test_every_stage_works_logged_in_as_its_own_principal(kafka: LocalKafka, tmp_path: Path) -> None:
    """The decider, a worker and the projector, each logged in with its own credential under the
    ACL table (nothing else granted), take requests a producer sent with its own: every request is
    decided once, every dispatch answered, all of it sealed as evidence."""
    keys = dev_keys(tmp_path / "keys", DEFAULT_POLICY_PATH)
    evidence = tmp_path / "evidence"
    common = ["--bootstrap", kafka.bootstrap]
    with Services(tmp_path / "logs") as services:
        provider = services.start("provider", "run", "provider", "--port", "0")
        url = provider.wait_for_line("simulated provider listening on", 30)
        services.start("decider", *decider_args(common, keys), env=login_env(kafka, "decider", tmp_path))
        services.start(
            "worker",
            "run",
            "worker",
            *common,
            "--simulated-url",
            url,
            env=login_env(kafka, "worker", tmp_path),
        )
        services.start(
            "projector", *projector_args(common, keys, evidence), env=login_env(kafka, "projector", tmp_path)
        )
        sent = synthetic_requests(
            default_policy(), STAGE_REQUESTS, seed=11, start=datetime.now(UTC), run="acl"
        )
        login = login_from_env(login_env(kafka, "producer", tmp_path))
        asyncio.run(publish_as(kafka.bootstrap, login, sent))

        ids = "(" + ", ".join(f"'{r.request_id}'" for r in sent) + ")"

        def sealed() -> dict[str, int] | None:
            if not (evidence / "manifest.head.json").exists():
                return None
            with EvidenceStore(evidence) as store:
                counts: dict[str, int] = store.query(
                    f"SELECT (SELECT count(*) FROM requests WHERE request_id IN {ids}) AS requests, "  # noqa: S608
                    f"(SELECT count(*) FROM decisions WHERE request_id IN {ids}) AS decisions, "
                    f"(SELECT count(*) FROM rejections WHERE request_id IN {ids}) AS rejections, "
                    f"(SELECT count(*) FROM decisions WHERE request_id IN {ids} AND verdict = 'dispatch') "
                    f"AS dispatched, (SELECT count(*) FROM outcomes WHERE request_id IN {ids}) AS outcomes"
                ).to_pylist()[0]
            decided = counts["decisions"] + counts["rejections"] == counts["requests"] == STAGE_REQUESTS
            return counts if decided and counts["outcomes"] == counts["dispatched"] > 0 else None

        counts = eventually(
            sealed, "every request decided, dispatched ones answered, all sealed", 120, services
        )
        decider_log = services.started[1].log_path.read_text(encoding="utf-8")
    assert counts["decisions"] + counts["rejections"] == STAGE_REQUESTS
    assert "cannot be read" not in decider_log  # it checked every topic's settings at start


async def publish_as(bootstrap: str, login: KafkaLogin, requests: list[InferenceRequested]) -> None:
    producer = new_producer(bootstrap, login=login)
    await start_client(producer, bootstrap)
    try:
        await publish(producer, TOPICS, AvroCodec(), requests)
    finally:
        await producer.stop()
