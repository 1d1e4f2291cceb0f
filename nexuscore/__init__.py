"""NexusCore: a governed LLM gateway built as an event-sourced pipeline on Kafka.

This package is the application at the top of the layers (CLI, demo, local broker launcher); the
library packages beneath it (``nexuscore.kernel``, ``.schemas``, ``.policy``, ``.core``, ...)
never import it. Its ``__init__`` imports nothing, so loading any of them costs nothing here.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
