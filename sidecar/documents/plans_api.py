"""The HTTP side of subscription plans: the catalog and the caller's own subscription (/v1/plans,
/v1/subscription), the operator's start, change and cancel (/admin/accounts/{account}/subscription...),
and the feature that starts the period worker (features.py)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from ..admin import ADMIN_OPS
from ..config import Settings
from ..features import Feature, Running
from ..wallet_api import WALLET_OPS, _decode, _json
from .plans import Plans

PLANS = web.AppKey("plans", Plans)


class PlanBody(msgspec.Struct, forbid_unknown_fields=True):
    plan: str | None = None  # a name of the catalog (settings `plans`)


class StartBody(PlanBody, forbid_unknown_fields=True):
    stripe_subscription: str | None = None  # a provider-billed plan's Stripe subscription (sub_...)


async def start(app: web.Application, running: Running) -> None:
    s, services = running.settings, running.services
    wallet = services.balances
    plans = app[PLANS] = Plans(services.store.pool, app[ADMIN_OPS], s.plans, lambda: wallet.wallet.clock())

    async def period_pass() -> None:
        await plans.run_pass()

    if running.node_tasks and s.plans:
        running.tasks.every("subscription-periods", s.subscription_interval_seconds, period_pass)


def routes(app: web.Application, settings: Settings) -> None:
    async def catalog(request: web.Request) -> web.Response:
        await request.config_dict[WALLET_OPS].caller(request)  # a client key, as on every /v1 route
        return _json(request.config_dict[PLANS].catalog_view())

    async def own(request: web.Request) -> web.Response:
        account = (await request.config_dict[WALLET_OPS].caller(request)).account
        return _json(await request.config_dict[PLANS].view(account))

    app.router.add_get("/v1/plans", catalog)
    app.router.add_get("/v1/subscription", own)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    def plans(request: web.Request) -> Plans:
        return request.config_dict[PLANS]

    async def get(request: web.Request) -> web.Response:
        return _json(await plans(request).view(request.match_info["account"]))

    async def begin(request: web.Request) -> web.Response:
        body = _decode(await request.read(), StartBody)
        started = await plans(request).start(
            request.match_info["account"], body.plan, body.stripe_subscription
        )
        return _json(started, status=201)

    async def change(request: web.Request) -> web.Response:
        body = _decode(await request.read(), PlanBody)
        return _json(await plans(request).change(request.match_info["account"], body.plan))

    async def cancel(request: web.Request) -> web.Response:
        return _json(await plans(request).cancel(request.match_info["account"]))

    admin.router.add_get("/accounts/{account}/subscription", get)
    admin.router.add_post("/accounts/{account}/subscription", begin)
    admin.router.add_post("/accounts/{account}/subscription/change", change)
    admin.router.add_post("/accounts/{account}/subscription/cancel", cancel)


FEATURE = Feature("plans", routes=routes, admin_routes=admin_routes, start=start)
