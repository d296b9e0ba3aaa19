"""``create_app(settings)``: the aiohttp application, its clients' lifecycles and its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis

from .accounts import AccountStore
from .admin import ADMIN_OPS, AdminOps, admin_app
from .config import Settings
from .errors import error_middleware
from .keys import KeySpace
from .ledger import RedisLedger
from .pricing import PriceTable
from .proxy import Proxy
from .upstream import create_session, upstreams_from
from .wire import ROUTES

log = logging.getLogger("creditgate.app")

PROXY = web.AppKey("proxy", Proxy)
LEDGER = web.AppKey("ledger", RedisLedger)


def connect_redis(url: str) -> Redis:
    # redis-py retries timed-out and dropped commands by itself; every money script is idempotent by id.
    return Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)


def build_ops(settings: Settings, redis: Redis) -> tuple[AccountStore, RedisLedger]:
    keys = KeySpace(settings.key_prefix, settings.partitions)
    ledger = RedisLedger(redis, keys, settled_marker_ms=settings.settled_marker_seconds * 1000)
    accounts = AccountStore(redis, keys, cache_seconds=settings.auth_cache_seconds)
    return accounts, ledger


async def reap_expired_holds(ledger: RedisLedger, interval: float) -> None:
    """Release the holds of requests whose sidecar died before settling them."""
    while True:
        await asyncio.sleep(interval)
        try:
            released = await ledger.expire_holds(int(time.time() * 1000))
            if released:
                log.warning("released %d micro-credits of expired holds", released)
        except Exception:
            log.exception("hold reaper pass failed; retrying next interval")


def create_app(settings: Settings, *, demo_upstream_url: str | None = None) -> web.Application:
    """The sidecar. ``settings.redis_url`` must be set (the CLI starts an embedded Redis when it is not)."""
    if settings.redis_url is None:
        raise ValueError("create_app needs settings.redis_url")
    redis_url = settings.redis_url
    prices = PriceTable.from_settings(settings)
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        redis = connect_redis(redis_url)
        accounts, ledger = build_ops(settings, redis)
        await ledger.load_scripts()
        session = create_session(settings)
        proxy = Proxy(
            settings, prices, ledger, accounts, upstreams_from(settings, demo_upstream_url), session
        )
        app[PROXY], app[LEDGER], app[ADMIN_OPS] = proxy, ledger, AdminOps(accounts, ledger)
        reaper = asyncio.create_task(
            reap_expired_holds(ledger, settings.reaper_interval_seconds), name="creditgate-hold-reaper"
        )
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            if proxy.in_flight:
                await asyncio.wait(set(proxy.in_flight))
            await session.close()
            await redis.aclose()

    app.cleanup_ctx.append(lifecycle)

    async def metered(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle_metered(request)

    async def models(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle_models(request)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    for path in ROUTES:
        app.router.add_post(path, metered)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{tail:.+}", models)
    app.router.add_get("/healthz", healthz)

    app.add_subapp("/admin/", admin_app(settings.admin_token))
    return app
