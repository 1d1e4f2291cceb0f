"""The kernel: what every layer above may use and that imports nothing of ours — the errors
NexusCore raises on purpose, time as an injected dependency, and Ed25519 signing primitives.

Its modules are public (``nexuscore.kernel.errors``, ``.clock``, ``.signing``, and ``.lazy``: how a
package exports names without importing their modules at start-up); the names most callers need
are re-exported here.
"""

from nexuscore.kernel import clock, errors, signing
from nexuscore.kernel.clock import Clock, FixedClock, SystemClock
from nexuscore.kernel.errors import (
    BrokerError,
    DecodeError,
    EvidenceError,
    KeyStoreError,
    NexusError,
    PolicyError,
    PolicyRefused,
    ProviderError,
    SignatureError,
)

__all__ = [
    "BrokerError",
    "Clock",
    "DecodeError",
    "EvidenceError",
    "FixedClock",
    "KeyStoreError",
    "NexusError",
    "PolicyError",
    "PolicyRefused",
    "ProviderError",
    "SignatureError",
    "SystemClock",
    "clock",
    "errors",
    "signing",
]
