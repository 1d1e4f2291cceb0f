"""Every exception NexusCore raises on purpose.

NexusError                      base: the CLI prints its message as one line, never a traceback
├── PolicyError                 a policy file that cannot be read or is invalid (names file and field)
│   └── PolicyRefused           a policy refused for use: unsigned, untrusted, revoked, expired... (.reason)
├── DecodeError                 bytes off a topic that are not a valid event (reason kept for the dead letter)
├── BrokerError                 no Kafka broker could be reached or started
├── ProviderError               a model provider answered with an error or not at all
├── EvidenceError               the evidence store is missing or cannot answer a query
├── SignatureError              a signing or verification key that cannot be used
└── KeyStoreError               the tenants' content keys cannot be read, created or erased
"""

from __future__ import annotations


class NexusError(Exception):
    """Base of every deliberate NexusCore error; its message is meant for a person."""


class PolicyError(NexusError):
    """A routing policy file is unreadable or invalid."""


class PolicyRefused(PolicyError):
    """A policy that must not be used; ``reason`` is one of the codes in ``nexuscore.policy``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class DecodeError(NexusError):
    """Bytes that do not decode to a known, valid event."""


class BrokerError(NexusError):
    """The Kafka broker is unreachable, or the local broker could not start."""


class ProviderError(NexusError):
    """A model provider call failed.

    ``retryable`` is true for failures worth another attempt (HTTP 429, 5xx, timeouts, refused
    connections); ``status_code`` is the HTTP status when there was one.
    """

    def __init__(self, message: str, *, retryable: bool, status_code: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status_code = status_code


class EvidenceError(NexusError):
    """The evidence store is missing or a query over it failed."""


class SignatureError(NexusError):
    """A signing key or public key is missing, unreadable or of the wrong kind."""


class KeyStoreError(NexusError):
    """The keystore holding the tenants' content keys is unreadable or cannot be changed."""
