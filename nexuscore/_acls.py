"""Kafka ACLs per principal: what each NexusCore role may do on the broker, and how to apply it.

``acl_table()`` is the single source of truth: a deployment applies it with ``apply_acls`` (logged
in as a super user), ``markdown_table()`` renders it for the README, and
tests/integration/test_acl.py proves it on a real broker with authorization on. Principals are SASL
user names (``User:<name>``); anything the table does not grant is refused, which needs the broker
to run with ``allow.everyone.if.no.acl.found=false`` (``LocalKafka(sasl_users=...)`` does).

What the table relies on (Kafka 4.1):

* READ and WRITE on a topic imply DESCRIBE (metadata, partition counts); DESCRIBE is still listed
  with every write-only grant so the table reads on its own.
* An idempotent producer (every NexusCore producer) needs no cluster ACL: since Kafka 3.0
  (KIP-679) WRITE on any topic implies IDEMPOTENT_WRITE, which older brokers wanted on the cluster.
* READ on a consumer group implies DESCRIBE on it; consumers that ``assign()`` partitions without a
  group (the governance and circuit followers) need only READ on the topic.
* The decider and ``promote`` run ``ensure_topics`` at start: DESCRIBE_CONFIGS on every topic (a
  prefix grant on ``<namespace>.nexus``, which covers ``nexus.*`` and ``nexuscore-*``) lets them check
  that each records the broker's time. Without ALTER_CONFIGS they cannot change one that does not:
  they stop with that reason instead of judging decisions by a producer's clock.
* The transactional decider (``--transactional``) names its transactional id after its app id:
  WRITE and DESCRIBE on that prefix, nobody else's.
* Creating topics is the administrator's job (``ensure_topics`` logged in as ``admin``). The one
  exception is the decider's faust app, which declares its own internal topics (Table changelogs,
  ``<app id>-__assignor-__leader``) at start: it gets CREATE on its prefix.

``apply_acls`` adds bindings and never removes any; re-applying is harmless (Kafka ignores an ACL
that already exists).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from typing import Any, Final, Literal

import msgspec
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import CreateAclsRequest, DescribeAclsRequest

from nexuscore.kernel.errors import BrokerError
from nexuscore.transport import Topics

__all__ = ["PRINCIPALS", "Grant", "Operation", "acl_table", "apply_acls", "bindings", "markdown_table"]

Operation = Literal["READ", "WRITE", "CREATE", "DESCRIBE", "DESCRIBE_CONFIGS"]
Resource = Literal["topic", "group", "transactional_id"]

PRINCIPALS: Final = ("producer", "decider", "worker", "projector", "operator", "reviewer", "analyst")

_WRITE: Final[tuple[Operation, ...]] = ("WRITE", "DESCRIBE")
_READ: Final[tuple[Operation, ...]] = ("READ",)
_READ_WRITE: Final[tuple[Operation, ...]] = ("READ", "WRITE")

# Kafka's wire codes (org.apache.kafka.common.acl / resource): ResourceType, PatternType,
# AclOperation, AclPermissionType.
_RESOURCE_CODE: Final[Mapping[Resource, int]] = {"topic": 2, "group": 3, "transactional_id": 5}
_ANY, _LITERAL, _PREFIXED, _ALLOW = 1, 3, 4, 3
_OPERATION_CODE: Final[Mapping[Operation, int]] = {
    "READ": 3,
    "WRITE": 4,
    "CREATE": 5,
    "DESCRIBE": 8,
    "DESCRIBE_CONFIGS": 10,
}

# (resource type, name, pattern type, principal, host, operation, permission): one Kafka ACL binding.
Binding = tuple[int, str, int, str, str, int, int]


class Grant(msgspec.Struct, frozen=True):
    """Operations allowed on one topic or consumer group (or every name starting with ``name``)."""

    resource: Resource
    name: str
    operations: tuple[Operation, ...]
    why: str
    prefixed: bool = False


def acl_table(
    topics: Topics = Topics(), *, producer_reads_answers: bool = False, decider_bootstrap: bool = True
) -> dict[str, tuple[Grant, ...]]:
    """Every principal's grants, in ``PRINCIPALS`` order; a principal with none has no Kafka access.

    ``producer_reads_answers``: let the producer read ``decisions`` and ``outcomes`` to learn its
    requests' fate. Off by default: Kafka ACLs are per topic, not per key, so that credential would
    read every tenant's decisions and outcomes (responses stay encrypted, their metadata does not).

    ``decider_bootstrap``: let the decider write ``governance``. ``nexuscore run decider`` publishes
    its bootstrap policy there when the log has no active policy yet (it is signature-checked like
    any promotion); once a policy is active, a deployment can drop it (False).
    """
    return {
        "producer": _producer(topics, producer_reads_answers),
        "decider": _decider(topics, decider_bootstrap),
        "worker": _worker(topics),
        "projector": _projector(topics),
        "operator": (
            Grant(
                "topic",
                topics.governance,
                _READ_WRITE,
                "kill switches, promotions (promote reads the log first)",
            ),
            _settings_check(topics),
        ),
        "reviewer": (Grant("topic", topics.reviews, _WRITE, "reviews of escalated requests"),),
        "analyst": (),  # reads the evidence store (Parquet + DuckDB), never Kafka
    }


def _producer(t: Topics, reads_answers: bool) -> tuple[Grant, ...]:
    grants = [Grant("topic", t.requests, _WRITE, "submits inference requests")]
    if reads_answers:
        grants += [
            Grant("topic", t.decisions, _READ, "rejections (deployment choice: every tenant's)"),
            Grant("topic", t.outcomes, _READ, "answers (deployment choice: every tenant's)"),
        ]
    return tuple(grants)


def _decider(t: Topics, bootstrap: bool) -> tuple[Grant, ...]:
    app = t.group("nexuscore-decider")
    return (
        Grant("topic", t.requests, _READ, "agent input"),
        Grant("topic", t.outcomes, _READ_WRITE, "agent input; offline (cached) answers"),
        Grant("topic", t.reviews, _READ_WRITE, "agent input; review timeouts"),
        Grant(
            "topic",
            t.governance,
            _READ_WRITE if bootstrap else _READ,
            "policies, kill switches; writes its bootstrap policy to an empty log"
            if bootstrap
            else "policies, kill switches",
        ),
        Grant(
            "topic",
            t.decisions,
            _READ_WRITE,
            "decisions, rejections, settlements; read back after a crash to decide again in order",
        ),
        Grant("topic", t.dispatch, _WRITE, "approved requests for the workers"),
        Grant("topic", t.deadletter, _WRITE, "undecodable input"),
        Grant("group", app, _READ, "the faust app's consumer group"),
        Grant(
            "topic",
            f"{app}-",
            ("READ", "WRITE", "CREATE", "DESCRIBE"),
            "Table changelogs and faust's leader topic, declared at start",
            prefixed=True,
        ),
        Grant(
            "transactional_id",
            f"{app}-",
            ("WRITE", "DESCRIBE"),
            "its transactional id (`--transactional`: a transaction per batch)",
            prefixed=True,
        ),
        _settings_check(t),
    )


def _settings_check(t: Topics) -> Grant:
    """Reading every topic's settings: the decider and ``promote`` check at start that each records
    the broker's time (``ensure_topics``), and refuse to go on if it cannot be made to (no ALTER)."""
    return Grant(
        "topic",
        f"{t.prefix}nexus",
        ("DESCRIBE_CONFIGS",),
        "checks that every topic records the broker's time",
        prefixed=True,
    )


def _worker(t: Topics) -> tuple[Grant, ...]:
    return (
        Grant("topic", t.dispatch, _READ, "requests to call a model for"),
        Grant("group", t.group("nexuscore-workers"), _READ, "shares dispatch among workers"),
        Grant("topic", t.circuits, _READ_WRITE, "circuit breaker states, its own and the others'"),
        Grant("topic", t.attempts, _WRITE, "each provider call"),
        Grant("topic", t.outcomes, _WRITE, "answers and failures"),
        Grant("topic", t.deadletter, _WRITE, "undecodable dispatches"),
    )


def _projector(t: Topics) -> tuple[Grant, ...]:
    return (
        *(Grant("topic", name, _READ, "the evidence store holds every event") for name in t.all),
        Grant("group", t.group("nexuscore-projector"), _READ, "committed positions"),
    )


def bindings(table: Mapping[str, tuple[Grant, ...]]) -> Iterator[Binding]:
    """The table as Kafka ACL bindings: one ALLOW per principal, resource and operation, any host."""
    for principal, grants in table.items():
        for g in grants:
            pattern = _PREFIXED if g.prefixed else _LITERAL
            for op in g.operations:
                yield (
                    _RESOURCE_CODE[g.resource],
                    g.name,
                    pattern,
                    f"User:{principal}",
                    "*",
                    _OPERATION_CODE[op],
                    _ALLOW,
                )


async def apply_acls(
    bootstrap: str,
    table: Mapping[str, tuple[Grant, ...]],
    client_config: Mapping[str, Any],
    timeout_s: float = 30.0,
) -> int:
    """Create every binding of ``table``; return once the broker enforces them all (their count).

    ``client_config`` logs in as a super user (aiokafka keywords: ``security_protocol``,
    ``sasl_mechanism``, ``sasl_plain_username``, ``sasl_plain_password``); aiokafka has no
    ``create_acls``, so the CreateAcls/DescribeAcls requests go through its protocol layer. The
    controller commits each ACL before it answers; the broker's authorizer takes it up from the
    metadata log a moment later, so this waits until DescribeAcls (answered by that authorizer)
    lists every binding.

    Raises:
        BrokerError: a refused binding (e.g. the login is no super user), or not done in ``timeout_s``.
    """
    wanted = set(bindings(table))
    client = AIOKafkaClient(
        bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000), **client_config
    )
    try:
        async with asyncio.timeout(timeout_s):
            await client.bootstrap()
            # Concurrent: the controller commits them in a few batches rather than one by one. Every
            # request is answered before the first failure is raised (none is left running).
            created = [_create(client, binding) for binding in sorted(wanted)]
            for result in await asyncio.gather(*created, return_exceptions=True):
                if isinstance(result, BaseException):
                    raise result
            while not wanted <= await _described(client):
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise BrokerError(f"the ACLs were not in force on {bootstrap} within {timeout_s:g} s") from None
    except KafkaError as exc:
        raise BrokerError(f"cannot set ACLs on {bootstrap}: {exc}") from exc
    finally:
        await client.close()
    return len(wanted)


async def _create(client: AIOKafkaClient, binding: Binding) -> None:
    response = await client.send(client.get_random_node(), CreateAclsRequest(*binding))
    for code, message in response.creation_responses:
        if code:
            raise BrokerError(f"the broker refused ACL {binding}: error {code} {message or ''}".rstrip())


async def _described(client: AIOKafkaClient) -> set[Binding]:
    """Every ALLOW binding the broker's authorizer holds now."""
    request = DescribeAclsRequest(_ANY, None, _ANY, None, None, _ANY, _ALLOW)
    response = await client.send(client.get_random_node(), request)
    if response.error_code:
        raise BrokerError(f"DescribeAcls failed: error {response.error_code} {response.error_message or ''}")
    return {
        (rtype, name, pattern, principal, host, op, permission)
        for rtype, name, pattern, acls in response.resources
        for principal, host, op, permission in acls
    }


def markdown_table(table: Mapping[str, tuple[Grant, ...]] | None = None) -> str:
    """The table as Markdown (README): one row per principal and grant."""
    rows = ["| Principal | Resource | Operations | Why |", "|---|---|---|---|"]
    for principal, grants in (table if table is not None else acl_table()).items():
        if not grants:
            rows.append(f"| `{principal}` | none | none: no Kafka access at all | |")
        for g in grants:
            name = f"`{g.name}*` (prefix)" if g.prefixed else f"`{g.name}`"
            rows.append(f"| `{principal}` | {g.resource} {name} | {', '.join(g.operations)} | {g.why} |")
    return "\n".join(rows)
