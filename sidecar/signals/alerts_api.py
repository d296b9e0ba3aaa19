"""The HTTP side of alerts and auto-reload: the client's own (/v1/credits/alerts, /v1/credits/auto-reload)
and any account's for the operator (/admin/accounts/{account}/alerts, .../auto-reload, where the saved
Stripe payment method is set, and /admin/reloads/{id}/fail); and the feature that starts the reload
worker (features.py)."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from ..config import Settings
from ..features import Feature, Running
from ..payments.context import PAYMENT_CONTEXT
from ..payments.packages import credit_price_of
from ..wallet_api import WALLET_OPS, _decode, _json
from .alert_store import AlertsBody, AlertStore, OperatorReloadBody, ReloadBody
from .reloads import Reloads

ALERTS = web.AppKey("alerts", AlertStore)
RELOADS = web.AppKey("reloads", Reloads)


class FailBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = "failed"


async def start(app: web.Application, running: Running) -> None:
    s = running.settings
    app[ALERTS] = AlertStore(running.services.store.pool, s)
    context = app[PAYMENT_CONTEXT]
    reloads = app[RELOADS] = Reloads(
        running.services.store.pool,
        running.events,
        running.payments,
        lambda: context.stripe,
        credit_price=credit_price_of(s),
        currency=s.currency,
        max_failures=s.reload_max_failures,
    )

    async def reload_pass() -> None:
        await reloads.run_pass()

    if running.node_tasks:
        running.tasks.every("auto-reload", s.reload_interval_seconds, reload_pass)


def routes(app: web.Application, settings: Settings) -> None:
    async def account(request: web.Request) -> str:
        return (await request.config_dict[WALLET_OPS].caller(request)).account

    async def get_alerts(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ALERTS].alerts(await account(request)))

    async def set_alerts(request: web.Request) -> web.Response:
        who = await account(request)
        body = _decode(await request.read(), AlertsBody)
        return _json(await request.config_dict[ALERTS].set_alerts(who, body))

    async def get_reload(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ALERTS].reload(await account(request)))

    async def set_reload(request: web.Request) -> web.Response:
        who = await account(request)
        body = _decode(await request.read(), ReloadBody)
        return _json(await request.config_dict[ALERTS].set_reload(who, body))

    app.router.add_get("/v1/credits/alerts", get_alerts)
    app.router.add_put("/v1/credits/alerts", set_alerts)
    app.router.add_get("/v1/credits/auto-reload", get_reload)
    app.router.add_put("/v1/credits/auto-reload", set_reload)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    def store(request: web.Request) -> AlertStore:
        return request.config_dict[ALERTS]

    async def get_alerts(request: web.Request) -> web.Response:
        return _json(await store(request).alerts(request.match_info["account"]))

    async def set_alerts(request: web.Request) -> web.Response:
        body = _decode(await request.read(), AlertsBody)
        return _json(await store(request).set_alerts(request.match_info["account"], body))

    async def get_reload(request: web.Request) -> web.Response:
        return _json(await store(request).reload(request.match_info["account"]))

    async def set_reload(request: web.Request) -> web.Response:
        body = _decode(await request.read(), OperatorReloadBody)
        return _json(await store(request).set_reload(request.match_info["account"], body))

    async def fail_reload(request: web.Request) -> web.Response:
        body: Any = _decode(await request.read(), FailBody)
        reloads = request.config_dict[RELOADS]
        return _json(await reloads.report_failed(request.match_info["reload_id"], body.reason))

    admin.router.add_get("/accounts/{account}/alerts", get_alerts)
    admin.router.add_put("/accounts/{account}/alerts", set_alerts)
    admin.router.add_get("/accounts/{account}/auto-reload", get_reload)
    admin.router.add_put("/accounts/{account}/auto-reload", set_reload)
    admin.router.add_post("/reloads/{reload_id}/fail", fail_reload)


FEATURE = Feature("alerts", routes=routes, admin_routes=admin_routes, start=start)
