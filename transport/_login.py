"""How a NexusCore process logs in to Kafka: one login for every client it makes.

A deployment with authorization on gives each role its own SASL user (``nexuscore._acls``: the
decider, the workers, the projector, producers...), so each process says who it is. It does so in
its environment, read once:

- ``NEXUSCORE_KAFKA_SECURITY_PROTOCOL``: ``PLAINTEXT`` (the default), ``SASL_PLAINTEXT``,
  ``SASL_SSL`` or ``SSL``;
- ``NEXUSCORE_KAFKA_SASL_MECHANISM``: ``PLAIN`` (the default), ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``;
- ``NEXUSCORE_KAFKA_USERNAME``, and ``NEXUSCORE_KAFKA_PASSWORD_FILE``: a file that holds the
  password (a mounted secret), never the password itself, which would show in the process list
  and in every child's environment;
- ``NEXUSCORE_KAFKA_CAFILE``: the CA bundle that signs the brokers' certificates (``*SSL``; the
  system's by default).

A setting that cannot be right (an unknown protocol, a SASL protocol without a user, a password
file that cannot be read) is a NexusError in one line, before any connection is tried.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from aiokafka.helpers import create_ssl_context

from nexuscore.kernel.errors import NexusError

PROTOCOLS = ("PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_MAX_PASSWORD_BYTES = 4096
_ENV = "NEXUSCORE_KAFKA_"


class KafkaLogin(msgspec.Struct, frozen=True):
    """Who a process is on the broker, and how it connects (the default: PLAINTEXT, nobody)."""

    protocol: str = "PLAINTEXT"
    mechanism: str = "PLAIN"
    username: str = ""
    password: str = ""
    cafile: str = ""

    def __repr__(self) -> str:
        return f"KafkaLogin({self.protocol}, {self.mechanism}, user {self.username!r})"

    __str__ = __repr__

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.sasl:
            options |= {
                "sasl_mechanism": self.mechanism,
                "sasl_plain_username": self.username,
                "sasl_plain_password": self.password,
            }
        if self.protocol.endswith("SSL"):
            options["ssl_context"] = create_ssl_context(cafile=self.cafile or None)
        return options


def login_from_env(env: Mapping[str, str]) -> KafkaLogin:
    """The login ``env`` describes (see the module), or NexusError naming the setting that is wrong."""
    protocol = env.get(f"{_ENV}SECURITY_PROTOCOL", "PLAINTEXT").strip().upper() or "PLAINTEXT"
    if protocol not in PROTOCOLS:
        raise NexusError(f"{_ENV}SECURITY_PROTOCOL is {protocol[:40]!r}: use one of {', '.join(PROTOCOLS)}")
    mechanism = env.get(f"{_ENV}SASL_MECHANISM", "PLAIN").strip().upper() or "PLAIN"
    if mechanism not in MECHANISMS:
        raise NexusError(f"{_ENV}SASL_MECHANISM is {mechanism[:40]!r}: use one of {', '.join(MECHANISMS)}")
    username = env.get(f"{_ENV}USERNAME", "").strip()
    password_file = env.get(f"{_ENV}PASSWORD_FILE", "").strip()
    cafile = env.get(f"{_ENV}CAFILE", "").strip()
    if not protocol.startswith("SASL_"):
        if username or password_file:
            raise NexusError(
                f"{_ENV}USERNAME and {_ENV}PASSWORD_FILE need a SASL protocol "
                f"({_ENV}SECURITY_PROTOCOL=SASL_SSL or SASL_PLAINTEXT), not {protocol}"
            )
        return KafkaLogin(protocol, mechanism, cafile=_readable(cafile, "CAFILE"))
    if not username or not password_file:
        raise NexusError(
            f"{protocol} needs {_ENV}USERNAME and {_ENV}PASSWORD_FILE (a file holding the password)"
        )
    return KafkaLogin(protocol, mechanism, username, _password(password_file), _readable(cafile, "CAFILE"))


def _password(path: str) -> str:
    try:
        with Path(path).open("rb") as f:
            data = f.read(_MAX_PASSWORD_BYTES + 1)
    except OSError as exc:
        raise NexusError(f"{_ENV}PASSWORD_FILE {path[:200]!r} cannot be read: {exc.strerror}") from None
    if len(data) > _MAX_PASSWORD_BYTES:
        raise NexusError(
            f"{_ENV}PASSWORD_FILE {path[:200]!r} is over {_MAX_PASSWORD_BYTES} bytes: not a password"
        )
    try:
        password = data.decode("utf-8").rstrip("\r\n")  # the newline an editor or `echo` adds
    except UnicodeDecodeError:
        raise NexusError(f"{_ENV}PASSWORD_FILE {path[:200]!r} is not UTF-8 text") from None
    if not password:
        raise NexusError(f"{_ENV}PASSWORD_FILE {path[:200]!r} is empty")
    return password


def _readable(path: str, name: str) -> str:
    if path and not os.access(path, os.R_OK):
        raise NexusError(f"{_ENV}{name} {path[:200]!r} cannot be read")
    return path


@functools.cache
def process_login() -> KafkaLogin:
    """This process's login, from its environment (read once)."""
    return login_from_env(os.environ)


def client_options() -> dict[str, Any]:
    """``process_login()``'s keyword arguments for an aiokafka client."""
    return process_login().client_options()
