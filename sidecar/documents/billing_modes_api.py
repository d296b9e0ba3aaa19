"""The HTTP side of billing modes: the operator's PUT/GET /admin/accounts/{account}/billing and its
block/unblock, the client's own GET /v1/billing; and the feature (features.py) that keeps the
`BillingModes` the lead's overdue worker calls (`set_blocked`) under BILLING_MODES."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..features import Feature, Running
from ..wallet_api import WALLET_OPS, _json
from .billing_modes import BillingBody, BillingModes, BlockBody
from .billing_modes import decode as _decode

BILLING_MODES = web.AppKey("billing_modes", BillingModes)


async def start(app: web.Application, running: Running) -> None:
    svc = running.services
    app[BILLING_MODES] = BillingModes(svc.store.pool, svc.redis, svc.keys)


def routes(app: web.Application, settings: Settings) -> None:
    async def own(request: web.Request) -> web.Response:
        account = (await request.config_dict[WALLET_OPS].caller(request)).account
        return _json(await request.config_dict[BILLING_MODES].own(account))

    app.router.add_get("/v1/billing", own)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    def modes(request: web.Request) -> BillingModes:
        return request.config_dict[BILLING_MODES]

    async def get(request: web.Request) -> web.Response:
        return _json(await modes(request).get(request.match_info["account"]))

    async def put(request: web.Request) -> web.Response:
        body = _decode(await request.read(), BillingBody)
        return _json(await modes(request).put(request.match_info["account"], body))

    async def block(request: web.Request) -> web.Response:
        body = _decode(await request.read(), BlockBody)
        done = await modes(request).set_blocked(request.match_info["account"], True, body.reason)
        return _json(done.view())

    async def unblock(request: web.Request) -> web.Response:
        _decode(await request.read(), BlockBody)  # a reason is accepted and not kept
        return _json((await modes(request).set_blocked(request.match_info["account"], False)).view())

    admin.router.add_get("/accounts/{account}/billing", get)
    admin.router.add_put("/accounts/{account}/billing", put)
    admin.router.add_post("/accounts/{account}/billing/block", block)
    admin.router.add_post("/accounts/{account}/billing/unblock", unblock)


FEATURE = Feature("billing-modes", routes=routes, admin_routes=admin_routes, start=start)
