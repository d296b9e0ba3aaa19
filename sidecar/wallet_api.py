"""The HTTP side of key management, spend-cap configuration and estimates, for a client (its own account,
by its API key or the account header, under /v1/credits) and the admin (any account, under /admin).

`add_routes(app)` registers the client routes, `add_admin_routes(admin)` the admin ones; both find their
`WalletOps` at `WALLET_OPS` in the app (set in the app's lifecycle, like the proxy).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from typing import Any

import msgspec
from aiohttp import web

from .accounts import AccountDirectory
from .caller import Caller
from .caps import CapBody, CapOps, TimeZoneBody
from .credit_lines import AVAILABLE
from .credit_lines import available as credit_available
from .errors import BadRequest
from .keys import KeySpace
from .keys_api import KeyBody, KeyOps
from .metering.operation_api import estimate_operation
from .money import format_credits
from .own_keys import OwnKeys
from .pipeline import admit
from .pricing import PriceTable
from .redis_client import RedisClient
from .wallet_store import WalletStore
from .wire import ROUTES, Route

ROUTE_KINDS: dict[str, Route] = {route.kind: route for route in ROUTES.values()}


class WalletOps:
    def __init__(
        self,
        redis: RedisClient,
        keys: KeySpace,
        accounts: AccountDirectory,
        pool: Any,
        prices: PriceTable,
        policy: admit.AdmitPolicy,
        *,
        own_keys: OwnKeys | None = None,
        providers: Mapping[str, str] | None = None,
    ) -> None:
        store = WalletStore(pool)
        # The accounts' stored provider keys and each upstream's provider: an estimate is figured with the
        # keys the request would go out with (a vault key is charged at the BYOK multiplier).
        self.own_keys, self.providers = own_keys, providers or admit.NO_KEYS
        self.redis, self.keys, self.accounts, self.prices, self.policy = redis, keys, accounts, prices, policy
        self.key_ops = KeyOps(accounts, store)
        self.caps = CapOps(redis, keys, store, prices)

    async def caller(self, request: web.Request) -> Caller:
        return await admit.authenticate(request.headers, self.accounts, self.policy)

    async def estimate(self, caller: Caller, kind: str, body: bytes, headers: Any) -> dict[str, Any]:
        """The worst case a request would hold, and whether the account's available credits cover it
        now; nothing is held, no model is called."""
        route = ROUTE_KINDS.get(kind)
        if route is None:
            raise BadRequest(f"route must be one of {', '.join(ROUTE_KINDS)}.", param="route")
        identified = admit.identify(body, self.prices)
        adm = admit.plan(
            "est_" + secrets.token_hex(8),
            caller.account,
            route,
            body,
            identified,
            headers,
            self.prices,
            self.policy,
            key_id=caller.key_id,
            own_keys=await self.own_keys.keys_of(caller.account) if self.own_keys else admit.NO_KEYS,
            providers=self.providers,
        )
        fields = await self.redis.hmget(self.keys.account(caller.account).balance, AVAILABLE)
        available = credit_available(caller.account, fields)  # with the credit line (invoice mode)
        return {
            "object": "credits.estimate",
            "model": adm.price.model,
            "route": route.kind,
            "hold": adm.hold,
            "hold_credits": format_credits(adm.hold),
            "available": available,
            "available_credits": format_credits(available),
            "fits": adm.hold <= available,
        }


WALLET_OPS = web.AppKey("wallet_ops", WalletOps)


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        found = re.search(r"at `\$\.([A-Za-z_]+)|unknown field `([^`]+)`", message)
        field = (found.group(1) or found.group(2)) if found else None
        raise BadRequest(f"Invalid request body: {message}", param=field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _cap_target(request: web.Request, body: bytes) -> tuple[str, str]:
    """(scope, period) of a DELETE: from the query, else the body."""
    if "scope" in request.query or "period" in request.query:
        return request.query.get("scope", ""), request.query.get("period", "")
    cap = _decode(body, CapBody)
    return cap.scope, cap.period


def add_routes(app: web.Application) -> None:
    """The client's own: /v1/credits/keys, /keys/{key_id}, /caps, /time-zone and /estimate."""

    def ops(request: web.Request) -> WalletOps:
        return request.config_dict[WALLET_OPS]

    async def list_keys(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        return _json(await ops(request).key_ops.list_keys(caller.account))

    async def update_key(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        body = _decode(await request.read(), KeyBody)
        key_id = request.match_info["key_id"]
        return _json(await ops(request).key_ops.update_key(key_id, body, account=caller.account))

    async def list_caps(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        return _json(await ops(request).caps.list_caps(caller.account))

    async def set_cap(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        return _json(await ops(request).caps.set_cap(caller.account, _decode(await request.read(), CapBody)))

    async def delete_cap(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        scope, period = _cap_target(request, await request.read())
        return _json(await ops(request).caps.delete_cap(caller.account, scope, period))

    async def get_zone(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        return _json(await ops(request).caps.time_zone(caller.account))

    async def set_zone(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        body = _decode(await request.read(), TimeZoneBody)
        return _json(await ops(request).caps.set_time_zone(caller.account, body.time_zone))

    async def estimate(request: web.Request) -> web.Response:
        caller = await ops(request).caller(request)
        kind = request.query.get("route", "chat")
        body = await request.read()
        operation = await estimate_operation(request, caller, body)  # {operation, units}: an operation's
        if operation is not None:
            return _json(operation)
        return _json(await ops(request).estimate(caller, kind, body, request.headers))

    app.router.add_get("/v1/credits/keys", list_keys)
    app.router.add_patch("/v1/credits/keys/{key_id}", update_key)
    app.router.add_get("/v1/credits/caps", list_caps)
    app.router.add_put("/v1/credits/caps", set_cap)
    app.router.add_delete("/v1/credits/caps", delete_cap)
    app.router.add_get("/v1/credits/time-zone", get_zone)
    app.router.add_put("/v1/credits/time-zone", set_zone)
    app.router.add_post("/v1/credits/estimate", estimate)


def add_admin_routes(admin: web.Application) -> None:
    """Any account's: /admin/accounts/{account}/keys (GET), /caps, /time-zone; /admin/keys/{key_id} PATCH."""

    def ops(request: web.Request) -> WalletOps:
        return request.config_dict[WALLET_OPS]

    async def list_keys(request: web.Request) -> web.Response:
        return _json(await ops(request).key_ops.list_keys(request.match_info["account"]))

    async def update_key(request: web.Request) -> web.Response:
        body = _decode(await request.read(), KeyBody)
        return _json(await ops(request).key_ops.update_key(request.match_info["key_id"], body))

    async def list_caps(request: web.Request) -> web.Response:
        return _json(await ops(request).caps.list_caps(request.match_info["account"]))

    async def set_cap(request: web.Request) -> web.Response:
        body = _decode(await request.read(), CapBody)
        return _json(await ops(request).caps.set_cap(request.match_info["account"], body))

    async def delete_cap(request: web.Request) -> web.Response:
        scope, period = _cap_target(request, await request.read())
        return _json(await ops(request).caps.delete_cap(request.match_info["account"], scope, period))

    async def get_zone(request: web.Request) -> web.Response:
        return _json(await ops(request).caps.time_zone(request.match_info["account"]))

    async def set_zone(request: web.Request) -> web.Response:
        body = _decode(await request.read(), TimeZoneBody)
        return _json(await ops(request).caps.set_time_zone(request.match_info["account"], body.time_zone))

    admin.router.add_get("/accounts/{account}/keys", list_keys)
    admin.router.add_patch("/keys/{key_id}", update_key)
    admin.router.add_get("/accounts/{account}/caps", list_caps)
    admin.router.add_put("/accounts/{account}/caps", set_cap)
    admin.router.add_delete("/accounts/{account}/caps", delete_cap)
    admin.router.add_get("/accounts/{account}/time-zone", get_zone)
    admin.router.add_put("/accounts/{account}/time-zone", set_zone)
