"""The one owner of the serving process's background tasks: it starts them, names them, and stops them
in a fixed order at shutdown.

Shutdown order (app.py): the listener stops taking connections and the requests in flight finish (or
are cut); then the periodic tasks are asked to stop, in the order they were started (lease renewal,
hold reaper, wallet sweeper, settlement retry, reconciler), then the flusher, and the features' tasks
(features.py) after them; a task still busy after `stop_seconds` is cancelled, and every one is awaited;
then the features' closers run, in reverse start order. Only then do the last settlement retry and the
final flush run, before the Redis and Postgres pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

log = logging.getLogger("creditgate.supervisor")


class Supervisor:
    def __init__(self, *, stop_seconds: float = 5.0) -> None:
        self.stop_seconds = stop_seconds
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self._on_stop: list[Callable[[], None]] = []

    def every(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        """Run `step` every `interval` seconds until stopped; a failing pass is logged and retried."""
        self.start(name, self._every(name, interval, step))

    def start(
        self, name: str, coro: Coroutine[Any, Any, None], on_stop: Callable[[], None] | None = None
    ) -> None:
        """Run `coro` as the task `creditgate-<name>`; `on_stop` asks it to finish when stopping."""
        self.tasks.append(asyncio.create_task(coro, name=f"creditgate-{name}"))
        if on_stop is not None:
            self._on_stop.append(on_stop)

    @property
    def names(self) -> list[str]:
        """The started tasks' names, in start order."""
        return [task.get_name().removeprefix("creditgate-") for task in self.tasks]

    async def stop(self) -> None:
        """Ask every task to finish; cancel the ones still busy after stop_seconds; await them all."""
        self.stopping.set()
        for ask in self._on_stop:
            ask()
        if not self.tasks:
            return
        _, busy = await asyncio.wait(self.tasks, timeout=self.stop_seconds)
        for task in self.tasks:  # in start order
            if task in busy:
                log.warning(
                    "background task %s did not stop in %.0f s; cancelling it",
                    task.get_name(),
                    self.stop_seconds,
                )
                task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _every(self, name: str, interval: float, step: Callable[[], Awaitable[None]]) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)
            if self.stopping.is_set():
                return
            try:
                await step()
            except Exception:
                log.exception("%s pass failed; retrying next interval", name)
