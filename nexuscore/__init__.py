"""NexusCore: a governed LLM gateway built as an event-sourced pipeline on Kafka."""

from nexuscore.errors import NexusError

__all__ = ["NexusError", "__version__"]
__version__ = "0.1.0"
