"""A demo upstream behind a shut gate that counts who reaches it, and a client call that keeps the answer:
for tests that hold many requests at the upstream at once (test_concurrency, test_spend_caps)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from yarl import URL

from sidecar.demo import GATE, create_demo_upstream

from .conftest import Upstream


class ArrivalGate(asyncio.Event):
    """The demo upstream's gate; it also tells its listeners of each request that reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived = 0
        self.listeners: list[Callable[[], None]] = []

    async def wait(self) -> Literal[True]:
        self.arrived += 1
        for listener in self.listeners:
            listener()
        return await super().wait()


@dataclass
class Outcome:
    status: int
    headers: dict[str, str]
    body: dict[str, Any]


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Upstream, ArrivalGate]]:
    """A demo upstream whose gate is in place before it starts (an app's state is fixed once started)."""
    app = create_demo_upstream(["test-model"])
    gate = app[GATE] = ArrivalGate()
    server = TestServer(app)
    await server.start_server()
    yield Upstream(server, app, []), gate
    gate.set()
    await server.close()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def fetch(session: aiohttp.ClientSession, url: URL, body: bytes, key: str) -> Outcome:
    async with session.post(url, data=body, headers=bearer(key)) as resp:
        return Outcome(resp.status, dict(resp.headers), await resp.json())


def send_all(
    session: aiohttp.ClientSession,
    url: URL,
    body: bytes,
    key: str,
    gate: ArrivalGate,
    requests: int,
    fit: int,
) -> tuple[list[asyncio.Task[Outcome]], asyncio.Event]:
    """Send `requests` identical requests at once; the event is set once each has either parked at the
    shut gate or come back (or more than `fit` reached the gate): nothing can change until it opens."""
    tasks: list[asyncio.Task[Outcome]] = []
    accounted = asyncio.Event()

    def check() -> None:
        if gate.arrived > fit or gate.arrived + sum(t.done() for t in tasks) >= requests:
            accounted.set()

    gate.listeners.append(check)
    for _ in range(requests):
        task = asyncio.create_task(fetch(session, url, body, key))
        task.add_done_callback(lambda _: check())
        tasks.append(task)
    return tasks, accounted


async def all_accounted(
    accounted: asyncio.Event, gate: ArrivalGate, tasks: list[asyncio.Task[Outcome]], fit: int
) -> None:
    """Wait for `send_all`'s event, at most 10 s: a bound, not a synchronisation (a bug fails, never
    hangs)."""
    try:
        async with asyncio.timeout(10):
            await accounted.wait()
    except TimeoutError:
        done = sum(t.done() for t in tasks)
        pytest.fail(f"{gate.arrived} requests reached the upstream ({fit} fit), {done} came back")
