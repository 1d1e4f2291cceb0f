"""Topic names and their creation.

Topics are created up front with explicit partition counts: a faust Table's changelog must have as
many partitions as its source topics. A namespace lets several pipelines (tests, demos) share one
broker without reading each other's history: namespace ``acme`` names the topics ``acme.nexus.requests``
and the groups ``acme.nexuscore-decider`` (the empty namespace: ``nexus.requests``).
"""

from __future__ import annotations

import contextlib
import logging
import re
from enum import IntEnum, StrEnum

import msgspec
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from nexuscore.kernel.errors import BrokerError, NexusError
from nexuscore.transport._kafka import login_options, start_client
from nexuscore.transport._login import KafkaLogin

DEFAULT_PARTITIONS = 4
# The decider's inputs (requests, outcomes, signed human acts) take the broker's clock as each
# record's timestamp: an act's freshness is judged, and a decision timed, against a time no producer
# can set, and the same input decided again gives the same decision. Governance has one partition,
# so every reader folds its acts in the same order.
# Every topic of the namespace: a record's time is when the broker took it, never a producer's
# clock. Inputs need it (a decision's time is its input's); on outputs it makes every figure read
# off the topics (latency, the fault run's stalls) include a broker that was slow or away.
_BROKER_TIME = {"message.timestamp.type": "LogAppendTime"}


class DeciderTable(StrEnum):
    """The decider's faust Tables (their changelog topics are created up front, from this list)."""

    BUDGETS = "budgets"  # budget totals per tenant
    RESERVATIONS = "reservations"  # open reservations per request
    ESCALATIONS = "escalations"  # escalations awaiting review, and resolved markers
    LATENCY = "latency"  # latency windows per (partition, deployment, strategy)
    ANSWERS = "answers"  # the offline answer cache
    DECIDED = "decided"  # each request's decision as it went out


DECIDER_TABLES: tuple[str, ...] = tuple(t.value for t in DeciderTable)
# Changelogs are compacted, and compaction only runs on closed segments: by default a segment
# closes after 1 GB or 7 days, so a decider's restore read every change ever made. Segments close
# every 5 minutes here, and tombstones (rows the decider forgot) go 10 minutes later: a restore
# reads roughly the live rows plus the last minutes of changes.
_CHANGELOG = {
    "cleanup.policy": "compact",
    "segment.ms": "300000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "600000",
}


# A namespace is one word of Kafka's topic characters, without dots (the dot joins it to the name);
# one trailing dot is accepted (``acme.`` is ``acme``), as the earlier spelling of a namespace.
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.?")


def check_namespace(namespace: str) -> str:
    """``namespace`` if it is valid (see ``Topics``), else NexusError naming the rule."""
    if namespace and not _NAMESPACE.fullmatch(namespace):
        raise NexusError(
            f"invalid namespace {namespace[:80]!r}: use 1 to 64 letters, digits, '_' or '-', "
            "starting with a letter or digit (it prefixes every topic and group, joined with '.')"
        )
    return namespace


# A static group member's id (also part of the transactional decider's transactional id): Kafka's
# own characters for names, bounded so that the ids built from it stay under Kafka's 249.
_INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_instance_id(instance_id: str | None) -> str | None:
    """``instance_id`` if it is valid (or None: no static membership), else NexusError naming the rule."""
    if instance_id is not None and not _INSTANCE_ID.fullmatch(instance_id):
        raise NexusError(
            f"invalid instance id {instance_id[:80]!r}: use 1 to 128 letters, digits, '.', '_' or '-', "
            "one per decider or worker"
        )
    return instance_id


class Topics(msgspec.Struct, frozen=True):
    """The pipeline's topics, under an optional namespace (NexusError if it is not valid)."""

    namespace: str = ""

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    @property
    def prefix(self) -> str:
        """What every topic and group name starts with: ``"<namespace>."``, or nothing."""
        return f"{self.namespace.removesuffix('.')}." if self.namespace else ""

    @property
    def requests(self) -> str:  # keyed by tenant
        return f"{self.prefix}nexus.requests"

    @property
    def decisions(self) -> str:  # keyed by tenant: decisions, rejections, settlements
        return f"{self.prefix}nexus.decisions"

    @property
    def dispatch(self) -> str:  # keyed by request
        return f"{self.prefix}nexus.dispatch"

    @property
    def attempts(self) -> str:  # keyed by tenant
        return f"{self.prefix}nexus.attempts"

    @property
    def outcomes(self) -> str:  # keyed by tenant
        return f"{self.prefix}nexus.outcomes"

    @property
    def deadletter(self) -> str:  # keyed by source topic
        return f"{self.prefix}nexus.deadletter"

    @property
    def governance(self) -> str:  # policy stage changes and kill switches, in one ordered partition
        return f"{self.prefix}nexus.governance"

    @property
    def reviews(self) -> str:  # keyed by tenant: people's reviews of escalations, and timeouts
        return f"{self.prefix}nexus.reviews"

    @property
    def circuits(self) -> str:  # keyed by deployment: circuit breaker state changes
        return f"{self.prefix}nexus.circuits"

    @property
    def all(self) -> tuple[str, ...]:
        return (
            self.requests,
            self.decisions,
            self.dispatch,
            self.attempts,
            self.outcomes,
            self.deadletter,
            self.governance,
            self.reviews,
            self.circuits,
        )

    @property
    def changelogs(self) -> tuple[str, ...]:
        """The decider's Table changelogs, named as faust names them (``<app id>-<table>-changelog``).

        Created up front with the source topics' partition count: left to faust, a decider can
        write its first change before the new topic is in its metadata, and its agent crashes
        (PartitionsMismatch) with the request in hand.
        """
        app = self.group("nexuscore-decider")
        return tuple(f"{app}-{table}-changelog" for table in DECIDER_TABLES)

    def group(self, name: str) -> str:
        """A consumer group (or faust app id) private to this namespace."""
        return f"{self.prefix}{name}"


log = logging.getLogger(__name__)


class _Source(IntEnum):
    """Where a described config's value comes from (Kafka's DescribeConfigs ``config_source``)."""

    DYNAMIC_TOPIC = 1


def wanted_configs(topics: Topics) -> dict[str, dict[str, str]]:
    """The settings every topic of ``topics`` must carry, by topic."""
    return {**{t: _BROKER_TIME for t in topics.all}, **{t: _CHANGELOG for t in topics.changelogs}}


async def ensure_topics(
    bootstrap: str,
    topics: Topics,
    partitions: int = DEFAULT_PARTITIONS,
    timeout_s: float = 30.0,
    *,
    login: KafkaLogin | None = None,
) -> None:
    """Create every topic of ``topics`` that does not exist yet, and give those that do the
    settings this version needs (``wanted_configs``): a topic created by an earlier version (or by
    hand) keeps its configs otherwise, and a topic whose records carry the producer's time lets a
    producer choose the time a decision or an act is judged at. BrokerError when a topic's record
    time cannot be made the broker's; other settings that cannot be changed are logged."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **login_options(login)
    )
    await start_client(admin, bootstrap, timeout_s)
    try:
        existing = set(await admin.list_topics())
        await _align_configs(admin, {t: c for t, c in wanted_configs(topics).items() if t in existing})
        wanted = [
            NewTopic(
                name=t,
                num_partitions=1 if t == topics.governance else partitions,
                replication_factor=1,
                topic_configs=_BROKER_TIME,
            )
            for t in topics.all
            if t not in existing
        ] + [
            NewTopic(
                name=t,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs=_CHANGELOG,
            )
            for t in topics.changelogs
            if t not in existing
        ]
        if wanted:
            # Another process may create them between list and create.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(wanted)
    except KafkaError as exc:
        raise BrokerError(f"cannot create topics on {bootstrap}: {exc}") from exc
    finally:
        await admin.close()


async def _align_configs(admin: AIOKafkaAdminClient, wanted: dict[str, dict[str, str]]) -> None:
    """Alter the existing topics whose configs differ from ``wanted``. AlterConfigs replaces a
    topic's whole set of overrides, so each is sent with the overrides it already had: an
    operator's own settings (retention, say) stay."""
    if not wanted:
        return
    described = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in wanted])
    changes: dict[str, dict[str, str]] = {}
    for response in described:
        for error_code, _message, _type, name, entries, *_ in response.resources:
            if error_code:
                log.warning("topic %s: its settings cannot be read (error code %s)", name, error_code)
                continue
            current = {e[0]: e[1] for e in entries}
            differ = {k: v for k, v in wanted[name].items() if current.get(k) != v}
            if differ:
                overrides = {
                    e[0]: e[1] for e in entries if e[3] == _Source.DYNAMIC_TOPIC and e[1] is not None
                }
                changes[name] = {**overrides, **wanted[name]}
                log.info("topic %s: setting %s (was %s)", name, differ, {k: current.get(k) for k in differ})
    if not changes:
        return
    answers = await admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, t, c) for t, c in changes.items()]
    )
    for response in answers:
        for error_code, message, _type, name, *_ in response.resources:
            if not error_code:
                continue
            why = f"{message or 'error code ' + str(error_code)}"
            if "message.timestamp.type" in wanted.get(name, {}):
                raise BrokerError(
                    f"topic {name} must record the broker's time (message.timestamp.type=LogAppendTime) "
                    f"and cannot be changed: {why}"
                )
            log.warning("topic %s keeps its old settings (%s): %s", name, why, changes[name])


async def partition_counts(
    bootstrap: str, names: tuple[str, ...], timeout_s: float = 30.0, *, login: KafkaLogin | None = None
) -> dict[str, int]:
    """How many partitions each topic has; a missing topic is an error that names it."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **login_options(login)
    )
    await start_client(admin, bootstrap, timeout_s)
    try:
        described = await admin.describe_topics(list(names))
    except KafkaError as exc:
        raise BrokerError(f"cannot describe topics on {bootstrap}: {exc}") from exc
    finally:
        await admin.close()
    counts = {d["topic"]: len(d["partitions"]) for d in described if d.get("partitions")}
    missing = [n for n in names if n not in counts]
    if missing:
        raise BrokerError(f"topics {', '.join(missing)} do not exist on {bootstrap}")
    return counts
