"""The vault's routes: the client's own keys (`/v1/account/llm-keys`, by its API key or the account
header) and the operator's of any account (`/admin/accounts/{account}/llm-keys`). The Vault itself is
built by app.py before the gateway (which reads it) and kept at VAULT."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

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


def _add(router: web.UrlDispatcher, base: str, account_of: Callable[[web.Request], Awaitable[str]]) -> None:
    """The three routes under `base`, each acting for the account `account_of` reads off the request."""

    async def post(request: web.Request) -> web.Response:
        return await _put(request, await account_of(request))

    async def get(request: web.Request) -> web.Response:
        return await _list(request, await account_of(request))

    async def delete(request: web.Request) -> web.Response:
        return await _delete(request, await account_of(request))

    router.add_post(base, post)
    router.add_get(base, get)
    router.add_delete(base + "/{key_id}", delete)


async def _caller(request: web.Request) -> str:
    """The client's own account, by its key (or the account header)."""
    return (await request.config_dict[WALLET_OPS].caller(request)).account


async def _named(request: web.Request) -> str:
    """The account the admin's path names."""
    return request.match_info["account"]


def routes(app: web.Application, settings: Settings) -> None:
    _add(app.router, "/v1/account/llm-keys", _caller)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    _add(admin.router, "/accounts/{account}/llm-keys", _named)


FEATURE = Feature("vault", routes=routes, admin_routes=admin_routes)
