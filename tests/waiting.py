"""Waiting for a condition, never for a fixed time: a test that sleeps either waits too long or
flakes. ``eventually`` polls a condition until a deadline and fails with what it waited for."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

from nexuscore._services import Service, Services

T = TypeVar("T")


def eventually(
    condition: Callable[[], T], what: str, timeout_s: float = 60.0, services: Services | None = None
) -> T:
    """The condition's first truthy value, polled until ``timeout_s``; the services are checked on
    every poll, so a stage that died fails the test at once, not at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        if services is not None:
            services.check()
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        time.sleep(0.05)


async def eventually_async(condition: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    """``eventually`` inside a running event loop: the loop keeps running (the consumers and stages
    of the test go on) while the condition is polled."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {what}")
        await asyncio.sleep(0.05)


def logged(service: Service, text: str) -> int:
    """How many lines of the service's log contain ``text``."""
    return service.log_path.read_text(encoding="utf-8", errors="replace").count(text)


def service(services: Services, name: str) -> Service:
    return next(s for s in services.started if s.name == name)
