"""The HTTP side of operation holds (README "Operations beyond tokens"), for a client on its own account
(its API key, or the account header): POST /v1/holds, GET /v1/holds/{id}, POST /v1/holds/{id}/settle,
/release and /extend; and the operation branch of POST /v1/credits/estimate (`estimate_operation`).
`OPERATIONS` holds the app's `Operations`, set when the app starts (`start`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from ..accounts import AccountDirectory
from ..caller import Caller
from ..config import Settings
from ..errors import BadRequest
from ..features import Running
from ..pipeline import admit
from .operations import Operations

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HoldsApi:
    ops: Operations
    accounts: AccountDirectory
    policy: admit.AdmitPolicy

    async def caller(self, request: web.Request) -> Caller:
        """Who the request acts for (its key's account, or the account header's): only its own holds."""
        return await admit.authenticate(request.headers, self.accounts, self.policy)


OPERATIONS = web.AppKey("operations", HoldsApi)


class HoldBody(msgspec.Struct, forbid_unknown_fields=True):
    operation: str
    units: int
    idempotency_key: str


class SettleBody(msgspec.Struct, forbid_unknown_fields=True):
    units: int


class EstimateBody(msgspec.Struct, forbid_unknown_fields=True):
    operation: str
    units: int


_FIELD = re.compile(r"at `\$\.([A-Za-z_]+)|(?:unknown|missing required) field `([^`]+)`")


def decode(body: bytes, kind: type[T]) -> T:
    """The body as `kind`, else a 400 naming the field (missing, unknown, of the wrong type)."""
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        found = _FIELD.search(str(exc))
        field = (found.group(1) or found.group(2)) if found else None
        raise BadRequest(f"Invalid request body: {exc}", param=field) from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from None


def is_operation_body(body: bytes) -> bool:
    """Whether an estimate's body asks about an operation (a JSON object with an "operation" field)."""
    try:
        parsed = msgspec.json.decode(body or b"{}")
    except msgspec.DecodeError:
        return False
    return isinstance(parsed, dict) and "operation" in parsed


async def estimate_operation(request: web.Request, caller: Caller, body: bytes) -> dict[str, Any] | None:
    """The estimate of `{operation, units}` (None when the body is not about an operation)."""
    api = request.config_dict.get(OPERATIONS)
    if api is None or not is_operation_body(body):
        return None
    asked = decode(body, EstimateBody)
    return await api.ops.estimate(caller.account, asked.operation, asked.units)


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def add_routes(app: web.Application, settings: Settings) -> None:
    async def caller(request: web.Request) -> tuple[Operations, Caller]:
        api = request.config_dict[OPERATIONS]
        return api.ops, await api.caller(request)

    async def create(request: web.Request) -> web.Response:
        ops, who = await caller(request)
        body = decode(await request.read(), HoldBody)
        view = await ops.hold(who, body.operation, body.units, body.idempotency_key)
        return _json(view.body())

    async def show(request: web.Request) -> web.Response:
        ops, who = await caller(request)
        return _json((await ops.view(who.account, request.match_info["hold_id"])).body())

    async def settle(request: web.Request) -> web.Response:
        ops, who = await caller(request)
        body = decode(await request.read(), SettleBody)
        return _json((await ops.settle(who.account, request.match_info["hold_id"], body.units)).body())

    async def release(request: web.Request) -> web.Response:
        ops, who = await caller(request)
        return _json((await ops.release(who.account, request.match_info["hold_id"])).body())

    async def extend(request: web.Request) -> web.Response:
        ops, who = await caller(request)
        return _json((await ops.extend(who.account, request.match_info["hold_id"])).body())

    app.router.add_post("/v1/holds", create)
    app.router.add_get("/v1/holds/{hold_id}", show)
    app.router.add_post("/v1/holds/{hold_id}/settle", settle)
    app.router.add_post("/v1/holds/{hold_id}/release", release)
    app.router.add_post("/v1/holds/{hold_id}/extend", extend)


async def start(app: web.Application, running: Running) -> None:
    s, svc = running.settings, running.services
    ops = Operations(svc.balances, s.operations, lease_seconds=s.hold_lease_seconds, top_up_url=s.top_up_url)
    app[OPERATIONS] = HoldsApi(ops, svc.accounts, running.proxy.admit_policy)
