"""The HTTP side of billing profiles: the client's own (GET/PUT /v1/billing-profile) and any account's for
the operator (GET/PUT /admin/accounts/{account}/billing-profile); and the feature (features.py), whose
start checks the tax rule table (tax.py) and keeps it for the documents that will use it."""

from __future__ import annotations

from aiohttp import web

from ..config import Settings
from ..features import Feature, Running
from ..wallet_api import WALLET_OPS, _json
from .profiles import Profiles
from .tax import TaxTable

PROFILES = web.AppKey("billing_profiles", Profiles)
TAX_TABLE = web.AppKey("tax_table", TaxTable)


async def start(app: web.Application, running: Running) -> None:
    app[TAX_TABLE] = TaxTable.of(running.settings)  # checked at load too (config.py); kept for documents
    app[PROFILES] = Profiles(running.services.store.pool)


def routes(app: web.Application, settings: Settings) -> None:
    async def account(request: web.Request) -> str:
        return (await request.config_dict[WALLET_OPS].caller(request)).account

    async def get(request: web.Request) -> web.Response:
        return _json(await request.config_dict[PROFILES].get(await account(request)))

    async def put(request: web.Request) -> web.Response:
        who = await account(request)
        return _json(await request.config_dict[PROFILES].put(who, await request.read()))

    app.router.add_get("/v1/billing-profile", get)
    app.router.add_put("/v1/billing-profile", put)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    async def get(request: web.Request) -> web.Response:
        return _json(await request.config_dict[PROFILES].get(request.match_info["account"]))

    async def put(request: web.Request) -> web.Response:
        raw = await request.read()
        return _json(await request.config_dict[PROFILES].put(request.match_info["account"], raw))

    admin.router.add_get("/accounts/{account}/billing-profile", get)
    admin.router.add_put("/accounts/{account}/billing-profile", put)


FEATURE = Feature("billing-profiles", routes=routes, admin_routes=admin_routes, start=start)
