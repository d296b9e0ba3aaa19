"""The vault's routes: the client's own keys (`/v1/account/llm-keys`, by its API key or the account
header) and the operator's of any account (`/admin/accounts/{account}/llm-keys`). The Vault itself is
built by app.py before the gateway (which reads it) and kept at VAULT."""

from __future__ import annotations

from aiohttp import web

from .. import bodies
from ..config import Settings
from ..features import Feature
from ..wallet_api import WALLET_OPS, _json
from .records import KeyBody
from .store import Vault

VAULT = web.AppKey("vault", Vault)


def _vault(request: web.Request) -> Vault:
    return request.config_dict[VAULT]


async def _put(request: web.Request, account: str) -> web.Response:
    body = bodies.decode(await request.read(), KeyBody)
    shown, created = await _vault(request).put(account, body)
    return _json(shown, status=201 if created else 200)


async def _list(request: web.Request, account: str) -> web.Response:
    return _json({"object": "list", "data": await _vault(request).list(account)})


async def _delete(request: web.Request, account: str) -> web.Response:
    return _json(await _vault(request).delete(account, request.match_info["key_id"]))


def routes(app: web.Application, settings: Settings) -> None:
    async def caller(request: web.Request) -> str:
        return (await request.config_dict[WALLET_OPS].caller(request)).account

    async def post(request: web.Request) -> web.Response:
        return await _put(request, await caller(request))

    async def get(request: web.Request) -> web.Response:
        return await _list(request, await caller(request))

    async def delete(request: web.Request) -> web.Response:
        return await _delete(request, await caller(request))

    app.router.add_post("/v1/account/llm-keys", post)
    app.router.add_get("/v1/account/llm-keys", get)
    app.router.add_delete("/v1/account/llm-keys/{key_id}", delete)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    async def post(request: web.Request) -> web.Response:
        return await _put(request, request.match_info["account"])

    async def get(request: web.Request) -> web.Response:
        return await _list(request, request.match_info["account"])

    async def delete(request: web.Request) -> web.Response:
        return await _delete(request, request.match_info["account"])

    admin.router.add_post("/accounts/{account}/llm-keys", post)
    admin.router.add_get("/accounts/{account}/llm-keys", get)
    admin.router.add_delete("/accounts/{account}/llm-keys/{key_id}", delete)


FEATURE = Feature("vault", routes=routes, admin_routes=admin_routes)
