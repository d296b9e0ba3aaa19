"""Liveness and readiness.

``/healthz`` answers from the event loop alone: it never touches Redis, Postgres or the upstream, so a
dependency's trouble never gets the pod restarted. ``/readyz`` checks that Redis answers and still has
the money scripts (reloading them if Redis forgot them, e.g. after a restart), within a short timeout.
A blip does not take the pod out of its Service: it reports not-ready only once Redis has been failing
for longer than ``readiness_grace_seconds`` (meanwhile requests that need Redis get a 503 each). From
shutdown on it reports not-ready. In sidecar mode (``readiness_checks_redis`` unset or false) it reports
the process only, so that a blip of the shared Redis does not take every app pod out of its Service.

``creditgate flush`` (a flusher process of its own, flush_process.py) has a readiness of its own,
``FlushReadiness``: ready while its flusher loop runs and both Redis and Postgres answer. No traffic is
routed by it (it only gates rollouts), so it reports each failure at once, with no grace period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from .balances import Balances
from .ledger_store import LedgerStore
from .redis_client import RedisClient

log = logging.getLogger("creditgate.health")

CHECK_TIMEOUT = 1.0  # seconds one readiness check may take


class Readiness:
    def __init__(self, balances: Balances, grace_seconds: float, checks_redis: bool = True) -> None:
        self.balances = balances
        self.checks_redis = checks_redis
        self.grace = grace_seconds
        self.failing_since: float | None = None
        self.stopping = False

    async def check(self) -> tuple[bool, str]:
        """(ready, reason)."""
        if self.stopping:
            return False, "shutting down"
        if not self.checks_redis:
            return True, "ok (Redis not checked: readiness_checks_redis is off)"
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                if self.balances.pipeline is not None:  # the request path's own connection answers too
                    await self.balances.pipeline.execute("PING")
                if not await self.balances.scripts_loaded():
                    log.warning("Redis lost the money scripts; loading them again")
                    await self.balances.load_scripts()
        except (RedisError, OSError, TimeoutError) as exc:
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
                log.warning("readiness: Redis check failed (%r)", exc)
            failing = now - self.failing_since
            if failing > self.grace:
                return False, f"Redis failing for {failing:.1f} s ({type(exc).__name__})"
            return True, f"Redis failing for {failing:.1f} s, within readiness_grace_seconds"
        if self.failing_since is not None:
            log.info("readiness: Redis answers again")
        self.failing_since = None
        return True, "ok"


class ReadinessCheck(Protocol):
    stopping: bool

    async def check(self) -> tuple[bool, str]: ...


class FlushReadiness:
    """Readiness of `creditgate flush`: its flusher loop runs (`running`), Redis and Postgres answer."""

    def __init__(self, redis: RedisClient, store: LedgerStore, running: Callable[[], bool]) -> None:
        self.redis, self.store, self.running = redis, store, running
        self.stopping = False

    async def check(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if not self.running():
            return False, "the flusher loop is not running"
        for name, probe in (("Redis", self.redis.ping), ("Postgres", self._select_one)):
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    await probe()
            except (RedisError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
                return False, f"{name} does not answer ({type(exc).__name__})"
        return True, "ok"

    async def _select_one(self) -> None:
        await self.store.pool.fetchval("SELECT 1")


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    return await readiness_response(request.config_dict.get(READINESS))


async def readiness_response(readiness: ReadinessCheck | None) -> web.Response:
    """The /readyz answer; None: the app has not started yet (the ops listener is up before it)."""
    ready, reason = (False, "starting") if readiness is None else await readiness.check()
    return web.json_response(
        {"status": "ready" if ready else "not ready", "reason": reason}, status=200 if ready else 503
    )
