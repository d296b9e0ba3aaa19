"""The meters' HTTP side: /v1/meters for a client key (its own account) and /admin/accounts/{account}/
meters for the admin (any account), and the feature's start (the charge worker on the supervisor).

A meter is created once per (account, resource id): the same resource id with the same body returns the
existing meter (200), with another body a 409. A new meter is refused with a 402 when the account's
available credits do not cover its first period; otherwise its first period is charged at once."""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from .. import bodies
from ..config import Settings
from ..errors import BadRequest, Conflict, InsufficientCredits, NotFound
from ..features import Running
from ..money import MAX_CHARGE
from ..wallet_api import WALLET_OPS
from . import meters_periods as periods
from . import meters_store as store
from .meters_charges import MeterCharges
from .meters_store import Meter

ResourceId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class MeterBody(msgspec.Struct, forbid_unknown_fields=True):
    resource_id: ResourceId
    kind: Literal["period", "one_time"] | None = None
    price: Annotated[int, msgspec.Meta(gt=0)] | None = None  # micro-credits per unit per period
    price_name: str | None = None  # a recurring_prices entry, instead of price, period and kind
    period: str | int | None = None  # 'hour', 'day', 'month' or seconds
    quantity: Annotated[int, msgspec.Meta(ge=1)] = 1


def decode_body(raw: bytes) -> MeterBody:
    """The body, or a 400 naming the offending field (bodies.decode)."""
    body: MeterBody = bodies.decode(raw, MeterBody)
    return body


def terms_of(body: MeterBody, settings: Settings) -> dict[str, Any]:
    """The meter's normalised terms (what a replay must match), or a 400 naming the offending field."""
    kind, price, period = body.kind, body.price, body.period
    if body.price_name is not None:
        named = settings.recurring_prices.get(body.price_name)
        if named is None:
            known = ", ".join(sorted(settings.recurring_prices)) or "none"
            raise BadRequest(f"Unknown price_name (the recurring_prices are: {known}).", param="price_name")
        for field, value in (("price", price), ("period", period), ("kind", kind)):
            if value is not None:
                raise BadRequest(f"{field} comes from the named price: give one or the other.", param=field)
        kind, price, period = named.kind, named.price, named.period
    if price is None:
        raise BadRequest("price (micro-credits per period) or price_name is required.", param="price")
    try:
        canonical = periods.period_of(period if period is not None else "day")
    except ValueError as exc:
        raise BadRequest(f"{exc}.", param="period") from None
    if price * body.quantity > MAX_CHARGE:
        raise BadRequest(f"price × quantity must be at most {MAX_CHARGE} micro-credits.", param="quantity")
    return {
        "resource_id": body.resource_id,
        "kind": kind or "period",
        "price": price,
        "price_name": body.price_name,
        "period": canonical,
        "quantity": body.quantity,
    }


class Meters:
    """What the routes call; the charge worker's clock is theirs too (a controlled one in tests)."""

    def __init__(self, charges: MeterCharges, settings: Settings) -> None:
        self.charges, self.settings = charges, settings

    @property
    def pool(self) -> Any:
        return self.charges.pool

    async def create(self, account: str, raw: bytes) -> tuple[dict[str, Any], int]:
        terms = terms_of(decode_body(raw), self.settings)
        async with self.pool.acquire() as conn:
            existing = await store.by_resource(conn, account, terms["resource_id"])
        if existing is not None:
            return _replayed(existing, terms), 200
        amount = terms["price"] * terms["quantity"]
        available = await self.charges.balances.available(account)
        if available < amount:
            raise InsufficientCredits(available, amount, self.settings.top_up_url)
        now = self.charges.clock()
        new = Meter(
            meter_id="mtr_" + secrets.token_hex(12),
            account=account,
            status="running",
            started_ms=now,
            body=terms,
            **{k: terms[k] for k in ("resource_id", "kind", "price", "price_name", "period", "quantity")},
        )
        async with self.pool.acquire() as conn:
            created = await store.insert(conn, new)
            if created is None:  # created meanwhile by a concurrent request
                found = await store.by_resource(conn, account, terms["resource_id"])
                assert found is not None
                return _replayed(found, terms), 200
        await self.charges.catch_up(created.meter_id, now)  # the first period, in advance
        return await self.view(account, created.meter_id), 201

    async def view(self, account: str, meter_id: str) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            m = await store.get(conn, meter_id, account)
        if m is None:
            raise NotFound(f"No meter {meter_id!r}.", param="id")
        return m.view()

    async def list(self, account: str) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            meters = await store.of_account(conn, account)
        return {"object": "list", "data": [m.view() for m in meters]}

    async def stop(self, account: str, meter_id: str) -> dict[str, Any]:
        """Stop the meter: the periods due by now are charged first; none after."""
        async with self.pool.acquire() as conn:
            m = await store.get(conn, meter_id, account)
        if m is None:
            raise NotFound(f"No meter {meter_id!r}.", param="id")
        now = self.charges.clock()
        if m.status != "stopped":
            await self.charges.catch_up(meter_id, now)
            async with self.pool.acquire() as conn:
                await store.stop(conn, m, now)
        return await self.view(account, meter_id)


def _replayed(existing: Meter, terms: dict[str, Any]) -> dict[str, Any]:
    if existing.body != terms:
        raise Conflict(
            f"resource_id {terms['resource_id']!r} has a meter with other terms: {existing.meter_id}.",
            param="resource_id",
        )
    return existing.view()


METERS = web.AppKey("meters", Meters)


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def _add(router: web.UrlDispatcher, prefix: str, account_of: Any) -> None:
    async def create(request: web.Request) -> web.Response:
        account = await account_of(request)
        view, status = await request.config_dict[METERS].create(account, await request.read())
        return _json(view, status)

    async def listed(request: web.Request) -> web.Response:
        return _json(await request.config_dict[METERS].list(await account_of(request)))

    async def one(request: web.Request) -> web.Response:
        meter_id = request.match_info["meter_id"]
        return _json(await request.config_dict[METERS].view(await account_of(request), meter_id))

    async def stop(request: web.Request) -> web.Response:
        meter_id = request.match_info["meter_id"]
        return _json(await request.config_dict[METERS].stop(await account_of(request), meter_id))

    router.add_post(prefix, create)
    router.add_get(prefix, listed)
    router.add_get(prefix + "/{meter_id}", one)
    router.add_post(prefix + "/{meter_id}/stop", stop)


def routes(app: web.Application, settings: Settings) -> None:
    async def caller_account(request: web.Request) -> str:
        return (await request.config_dict[WALLET_OPS].caller(request)).account

    _add(app.router, "/v1/meters", caller_account)


def admin_routes(admin: web.Application, settings: Settings) -> None:
    async def path_account(request: web.Request) -> str:
        account = request.match_info["account"]
        async with request.config_dict[METERS].pool.acquire() as conn:
            if not await conn.fetchval("SELECT true FROM accounts WHERE id = $1", account):
                raise NotFound(f"No account {account!r}.", param="account")
        return account

    _add(admin.router, "/accounts/{account}/meters", path_account)


async def start(app: web.Application, running: Running) -> None:
    s = running.settings
    svc = running.services
    charges = MeterCharges(
        svc.balances, svc.store.pool, running.events, marker_ms=s.meter_marker_seconds * 1000
    )
    app[METERS] = Meters(charges, s)
    if running.node_tasks and s.meter_charge_interval_seconds > 0:
        running.tasks.every("meter-charges", s.meter_charge_interval_seconds, charges.step)
