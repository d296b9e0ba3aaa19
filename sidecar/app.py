"""``create_app(settings)``: the aiohttp application, its clients' lifecycles and its background tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .admin import ADMIN_OPS, admin_app
from .cache import CachePolicy, ResponseCache
from .config import Settings
from .credits_api import credit_routes
from .drift import DriftState
from .features import EVENTS, Running, features
from .flusher import Flusher
from .health import READINESS, Readiness, ReadinessCheck, healthz, readiness_response, readyz
from .metrics import METRICS, Metrics, metrics_handler, metrics_response
from .observe import RequestRecord, log_request, request_observer
from .payments.landing import PAYMENTS, Payments
from .payments.manual import add_manual_routes
from .payments.orders import OrderStore
from .payments.referrals import add_referral_routes, referral_bonus
from .payments.routes import admin_payment_routes, payment_routes
from .payments.x402_topup import add_x402_routes
from .pipeline.handler import Gateway
from .pricing import PriceTable
from .reconcile import complete_money_in, inspect, stale_after_ms
from .redis_guard import check_redis
from .repair import repair_all
from .responses import error_middleware
from .routing_metrics import RoutingCollector
from .services import Services as Services
from .services import connect_redis as connect_redis
from .services import services as services
from .settlements import PendingSettlement
from .supervisor import Supervisor
from .upstream import create_session, upstreams_from
from .vault.api import VAULT
from .vault.store import Vault
from .wallet_api import WALLET_OPS, WalletOps, add_admin_routes, add_routes
from .wire import ROUTES

log = logging.getLogger("creditgate.app")
SETTLE_RETRY_SECONDS = 5.0  # how often settlements Redis did not take are sent again


def create_app(
    settings: Settings, *, demo_upstream_url: str | None = None, node_tasks: bool = True
) -> web.Application:
    """The sidecar's API listener. ``redis_url`` and ``database_url`` must be set (the CLI starts embedded
    servers). /admin/* is routed only when the admin API is on (`admin_api`); /healthz, /readyz and
    /metrics only when there is no ops listener (`ops_listen_port`), else `create_ops_app` serves them.
    Without `node_tasks` (every worker but the first, workers.py) the node's flusher, reconciler and hold
    reaper do not run here; lease renewal and settlement retry (this process's own requests) always do."""
    prices = PriceTable.from_settings(settings)
    flushing = settings.flusher_enabled and node_tasks
    reconciling = settings.reconcile_interval_seconds > 0 and node_tasks
    # No flusher (reconciler) series where no flusher (reconciler) runs (metrics.py).
    metrics = Metrics(flushing=flushing, reconciling=reconciling)

    def report(rec: RequestRecord) -> None:
        metrics.observe_request(rec)
        if settings.log_requests:
            log_request(rec)

    app = web.Application(
        middlewares=[request_observer(report), error_middleware], client_max_size=settings.max_body_bytes
    )
    app[METRICS] = metrics

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        async with services(settings) as svc:
            await check_redis(svc.redis)  # an evicting policy refused (exit 2), no maxmemory warned about
            upstreams = upstreams_from(settings, demo_upstream_url)
            # The BYOK vault: a master key that does not open its records stops startup (ConfigError).
            vault = app[VAULT] = await Vault.opened(
                settings, svc, {u.vault_provider for u in upstreams.values()}
            )
            session = create_session(settings)
            cache = (
                ResponseCache(CachePolicy.of(settings), svc.redis, svc.keys)
                if settings.cache_enabled
                else None
            )
            proxy = Gateway(
                settings, prices, svc.balances, svc.accounts, upstreams, session, cache, own_keys=vault
            )
            app[PROXY], app[SERVICES], app[ADMIN_OPS] = proxy, svc, svc.admin
            app[PAYMENTS] = Payments(OrderStore(svc.store.pool), app[ADMIN_OPS], svc.balances)
            app[PAYMENTS].on_purchase.append(referral_bonus(app[ADMIN_OPS]))  # payments/referrals.py
            # keys, caps, estimates (wallet_api.py)
            app[WALLET_OPS] = WalletOps(
                svc.redis,
                svc.keys,
                svc.accounts,
                svc.store.pool,
                prices,
                proxy.admit_policy,
                own_keys=vault,
                providers=proxy.providers,
            )
            flusher = svc.flusher()
            app[FLUSHER] = flusher
            drift = app[DRIFT] = DriftState()
            app[READINESS] = Readiness(
                svc.balances, settings.readiness_grace_seconds, checks_redis=settings.readiness_redis
            )
            svc.balances.on_script = metrics.observe_script
            flusher.on_batch = metrics.observe_flush
            metrics.sources.holds_active = lambda: len(proxy.in_flight)
            metrics.sources.rows_written = lambda: flusher.stats.rows
            metrics.sources.flush_failures = lambda: flusher.stats.failures
            metrics.sources.dead_letters = lambda: flusher.stats.dead_letters
            metrics.sources.settlements_expired = lambda: proxy.pending.expired
            metrics.sources.settle_unreplicated = lambda: (
                svc.balances.replicas.short if svc.balances.replicas else 0
            )
            metrics.sources.drift = lambda: (drift.accounts, drift.total)
            metrics.sources.reconcile = lambda: drift.stats
            metrics.sources.backlog = flusher.backlog
            metrics.registry.register(RoutingCollector(proxy.router.stats))  # routing_metrics.py

            async def reap() -> None:
                released = await svc.balances.expire_holds(int(time.time() * 1000))
                if released:
                    log.warning("released %d micro-credits of expired holds", released)

            stale_hold_ms = stale_after_ms(settings.reaper_interval_seconds)

            async def check_drift() -> None:
                started = time.perf_counter()
                if settings.reconcile_repair:
                    report = await repair_all(
                        svc.redis, svc.keys, svc.store, svc.balances, stale_hold_ms=stale_hold_ms
                    )
                else:
                    await complete_money_in(svc.store, svc.balances, older_than_seconds=60)
                    report = await inspect(svc.redis, svc.keys, svc.store, stale_hold_ms=stale_hold_ms)
                await app[PAYMENTS].complete(older_than_seconds=60)  # orders and reversals half-way
                app[DRIFT].update(report, time.perf_counter() - started)

            async def write_ledger(item: PendingSettlement) -> None:  # a settlement past its window
                await svc.store.insert_usage([item.ledger_row()])

            proxy.pending.write_ledger = write_ledger

            async def retry_settlements() -> None:
                if proxy.pending.pending:
                    await proxy.pending.retry()

            async def renew_leases() -> None:
                await svc.balances.renew(
                    [(ex.account, ex.request_id) for ex in list(proxy.exchanges.values())],
                    int(time.time() * 1000) + settings.hold_lease_seconds * 1000,
                )

            tasks = Supervisor()
            tasks.every("lease-renewal", settings.hold_lease_seconds / 3, renew_leases)
            if node_tasks:
                tasks.every("hold-reaper", settings.reaper_interval_seconds, reap)
                tasks.every("wallet-sweeper", settings.wallet_sweep_interval_seconds, svc.balances.sweep)
            tasks.every("settlement-retry", SETTLE_RETRY_SECONDS, retry_settlements)
            if reconciling:
                tasks.every("reconciler", settings.reconcile_interval_seconds, check_drift)
            if flushing:
                tasks.start("flusher", flusher.run(), on_stop=flusher.stop)
            running = Running(settings, svc, tasks, session, app[PAYMENTS], proxy, flusher, node_tasks)
            app[EVENTS] = running.events
            for feature in features():  # features.py
                if feature.start is not None:
                    await feature.start(app, running)
            log.info("background tasks: %s", ", ".join(tasks.names))
            try:
                yield
            finally:  # the order of shutdown: supervisor.py
                await proxy.finish(0)  # normally done already, by on_shutdown
                await tasks.stop()
                for close in reversed(running.closers):
                    await close()
                if proxy.pending.pending:  # a last try, before the outbox's final flush
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(settings.shutdown_flush_seconds):
                            await proxy.pending.retry()
                    proxy.pending.log_lost()
                await session.close()
                if cache is not None:
                    cache.close()
                if flushing:
                    await final_flush(flusher, settings.shutdown_flush_seconds)

    app.cleanup_ctx.append(lifecycle)

    async def on_shutdown(app: web.Application) -> None:
        """The listening socket is closed: finish the requests in flight (up to the grace period)."""
        app[READINESS].stopping = True
        await app[PROXY].finish(settings.shutdown_grace_seconds)

    app.on_shutdown.append(on_shutdown)

    async def metered(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle_metered(request)

    async def models(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle_models(request)

    for path in ROUTES:
        app.router.add_post(path, metered)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{id}", models)
    add_routes(app)  # /v1/credits: keys, caps, time zone, estimate (wallet_api.py)
    add_referral_routes(app)  # /v1/credits/referrals
    if settings.ops_listen_port is None:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", metrics_handler)

    async def ledger_status(request: web.Request) -> web.Response:
        flusher, drift = request.config_dict[FLUSHER], request.config_dict[DRIFT]
        pending = request.config_dict[PROXY].pending
        backlog, oldest = await flusher.backlog()
        return web.json_response(
            {
                "outbox_backlog": backlog,
                "outbox_oldest_seconds": round(oldest, 3),
                "flushed_rows": flusher.stats.rows,
                "flush_failures": flusher.stats.failures,
                "outbox_dead_letters": flusher.stats.dead_letters,
                "drifting_accounts": drift.accounts,
                "drift_micro_credits": drift.total,
                "drift_checked_at": drift.checked_at or None,
                "drift_by_kind": {
                    k: {"items": n, "microcredits": m} for k, (n, m) in drift.stats.drift.items()
                },
                "settlements_waiting_for_redis": len(pending.pending),
                "settlements_retried": pending.settled,
                "settlements_dropped": pending.dropped,
                "settlements_expired": pending.expired,
            }
        )

    async def ledger_dead_letters(request: web.Request) -> web.Response:
        """Outbox entries parked as dead letters (never written to the ledger), for an operator."""
        total, letters = await request.config_dict[FLUSHER].dead_letters()
        return web.json_response({"total": total, "dead_letters": letters})

    credit_routes(app, SERVICES, PROXY)  # /v1/credits/*, and under /admin/accounts/{id}/credits/
    payment_routes(app, settings)  # packages, checkout, /webhooks/* (payments/routes.py)
    add_x402_routes(app, settings, PROXY)  # POST /v1/credits/topup (payments/x402_topup.py)
    for feature in features():
        if feature.routes is not None:
            feature.routes(app, settings)
    if settings.admin_api:
        admin = admin_app(settings.admin_token)
        credit_routes(admin, SERVICES, PROXY, admin=True)
        admin.router.add_get("/ledger", ledger_status)
        admin.router.add_get("/ledger/dead-letters", ledger_dead_letters)
        add_admin_routes(admin)  # keys, caps, time zone (wallet_api.py)
        admin_payment_routes(admin)  # refunds of orders
        add_referral_routes(admin, admin=True)
        add_manual_routes(admin, settings.packages, settings.currency, list(settings.payment_webhooks))
        for feature in features():
            if feature.admin_routes is not None:
                feature.admin_routes(admin, settings)
        app.add_subapp("/admin/", admin)
    return app


def create_ops_app(api: web.Application) -> web.Application:
    """The ops listener: /healthz, /readyz and /metrics of the API app `api`, and nothing else (never /v1,
    never /admin). It runs beside `api` in the same loop, is up before `api` has started (/readyz: 503
    "starting") and after `api` has stopped listening (/readyz: 503 "shutting down" while it drains)."""
    return ops_app(lambda: api.get(READINESS), api[METRICS])


def ops_app(readiness: Callable[[], ReadinessCheck | None], metrics: Metrics) -> web.Application:
    """/healthz, /readyz (what `readiness()` returns; None: still starting) and /metrics (`metrics`):
    the ops listener of `creditgate serve` (create_ops_app) and of `creditgate flush` (flush_process.py)."""
    ops = web.Application(middlewares=[error_middleware])

    async def ready(request: web.Request) -> web.Response:
        return await readiness_response(readiness())

    async def scrape(request: web.Request) -> web.Response:
        return await metrics_response(metrics)

    ops.router.add_get("/healthz", healthz)
    ops.router.add_get("/readyz", ready)
    ops.router.add_get("/metrics", scrape)
    return ops


async def final_flush(flusher: Flusher, seconds: float) -> None:
    """Write the outbox to Postgres before the pools close; what does not fit in time stays in Redis."""
    try:
        async with asyncio.timeout(seconds):
            written = await flusher.drain(claim_idle_ms=flusher.claim_idle_ms)
        log.info("final flush wrote %d ledger rows", written)
    except Exception as exc:
        log.error("final flush incomplete (%r); the rest waits in Redis for the next flusher", exc)


PROXY = web.AppKey("proxy", Gateway)
SERVICES = web.AppKey("services", Services)
FLUSHER = web.AppKey("flusher", Flusher)
DRIFT = web.AppKey("drift", DriftState)
