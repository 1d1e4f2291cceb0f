"""An operator's set-up steps: the topics a deployment creates up front, before its stages start."""

from __future__ import annotations

import asyncio

from nexuscore._broker import wait_for_broker
from nexuscore.transport import Topics, ensure_topics, login_options


def init_topics(bootstrap: str, namespace: str = "", partitions: int = 4, wait_s: float = 60.0) -> int:
    """Wait up to ``wait_s`` for the broker, create the namespace's missing topics (and the decider's
    changelogs, with as many partitions as their sources), and say how many topics it has."""
    topics = Topics(namespace)

    async def main() -> None:
        await wait_for_broker(bootstrap, wait_s, login_options())
        await ensure_topics(bootstrap, topics, partitions)

    asyncio.run(main())
    return len(topics.all) + len(topics.changelogs)
