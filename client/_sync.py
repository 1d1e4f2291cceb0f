"""``SyncNexusClient``: the async client on its own event loop in a background thread, for code
that is not async. Every call blocks until the coroutine it runs is done."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from nexuscore.client._build import RequestSpec
from nexuscore.client._client import NexusClient, Sent
from nexuscore.client._results import Result

T = TypeVar("T")


class SyncNexusClient:
    """The same options and methods as ``NexusClient``, blocking."""

    def __init__(self, bootstrap: str, **options: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nexus-client", daemon=True)
        self._thread.start()
        self.client = NexusClient(bootstrap, **options)
        try:
            self._run(self.client.start())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def send(
        self, spec: RequestSpec, *, request_id: str | None = None, traceparent: str | None = None
    ) -> Sent:
        return self._run(self.client.send(spec, request_id=request_id, traceparent=traceparent))

    def submit(
        self,
        spec: RequestSpec,
        *,
        request_id: str | None = None,
        traceparent: str | None = None,
        timeout_s: float = 60.0,
        through_escalation: bool = False,
    ) -> Result:
        return self._run(
            self.client.submit(
                spec, request_id=request_id, traceparent=traceparent, timeout_s=timeout_s,
                through_escalation=through_escalation,
            )
        )  # fmt: skip

    def result(
        self, tenant_id: str, request_id: str, timeout_s: float = 60.0, *, through_escalation: bool = True
    ) -> Result:
        return self._run(
            self.client.result(tenant_id, request_id, timeout_s, through_escalation=through_escalation)
        )

    def peek(self, tenant_id: str, request_id: str) -> Result | None:
        return self.client.peek(tenant_id, request_id)

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self.client.close())
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> SyncNexusClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
