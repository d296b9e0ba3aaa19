"""Manual settlement: an operator records an order paid outside any payment provider (a bank transfer, a
purchase order). ``POST /admin/accounts/{id}/orders`` makes a pending order (provider ``manual``; with a
`reference`, once per reference), ``POST /admin/orders/{id}/paid`` lands it as a `purchase` grant once
(`Payments.land`: its grant id is the order id), ``GET /admin/orders/{id}`` and
``GET /admin/accounts/{id}/orders`` read them. The CLI's ``order`` verbs call the same methods."""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any

import asyncpg
import msgspec
from aiohttp import web

from ..admin import grant_amount, storable
from ..config import ACCOUNT_ID
from ..errors import BadRequest, Conflict, NotFound
from ..money import MAX_MICRO
from .landing import PAYMENTS, Payments
from .orders import Order
from .settings import PackageConfig

PROVIDER = "manual"
CURRENCY = re.compile(r"[a-z]{3,4}")  # ISO 4217 in lower case, or 'usdc'
ORDER_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_LIST = 500


class ManualOrderBody(msgspec.Struct, forbid_unknown_fields=True):
    """A pending manual order: one of `package` or `credits` (a decimal), the money it is for."""

    amount_minor: Annotated[int, msgspec.Meta(ge=0, le=MAX_MICRO)]
    package: str | None = None
    credits: str | None = None
    currency: str | None = None
    reference: str | None = None  # the invoice, transfer or PO number: one order per reference
    note: str | None = None
    # 'manual' (paid here, by an operator), or a provider of `payment_webhooks`, whose signed webhook
    # then reports it paid (POST /webhooks/<name>)
    provider: str = PROVIDER


class PaidBody(msgspec.Struct, forbid_unknown_fields=True):
    payment_ref: str


def _text(value: str | None, name: str, limit: int) -> None:
    if value is not None and not (0 < len(value) <= limit and storable(value)):
        raise BadRequest(f"{name} must be 1-{limit} characters of UTF-8 text.", param=name)


def _order_view(order: Order) -> dict[str, Any]:
    return {**order.view(), "reference": order.provider_ref}


class ManualSettlement:
    def __init__(
        self,
        payments: Payments,
        packages: Mapping[str, PackageConfig],
        currency: str,
        providers: Collection[str] = (),
    ) -> None:
        self.providers = providers  # the generic webhooks' names (payment_webhooks)
        self.payments = payments
        self.orders = payments.orders
        self.packages = packages
        self.currency = currency

    async def create(self, account: str, body: ManualOrderBody) -> tuple[dict[str, Any], bool]:
        """(the order's view, made now): checked first; with a reference seen before, that order (when it
        is the same order) and False."""
        if not ACCOUNT_ID.match(account):
            raise NotFound(f"No account {account!r}.", param="account")
        if (body.package is None) == (body.credits is None):
            raise BadRequest("Give exactly one of `package` or `credits` (decimal).", param="package")
        if body.package is not None:
            config = self.packages.get(body.package)
            if config is None:
                known = ", ".join(self.packages) or "none"
                raise BadRequest(f"No package {body.package!r} (packages: {known}).", param="package")
            credits = grant_amount(None, config.credits)
        else:
            credits = grant_amount(None, body.credits)
        if not 0 <= body.amount_minor <= MAX_MICRO:
            raise BadRequest(f"amount_minor must be between 0 and {MAX_MICRO}.", param="amount_minor")
        currency = (body.currency or self.currency).lower()
        if not CURRENCY.fullmatch(currency):
            raise BadRequest("currency must be an ISO 4217 code (3 letters) or 'usdc'.", param="currency")
        _text(body.reference, "reference", 200)
        _text(body.note, "note", 1000)
        if body.provider != PROVIDER and body.provider not in self.providers:
            names = ", ".join([PROVIDER, *self.providers])
            raise BadRequest(f"provider must be one of {names} (payment_webhooks).", param="provider")
        try:
            order = await self.orders.create(
                account,
                body.provider,
                credits=credits,
                amount_minor=body.amount_minor,
                currency=currency,
                package=body.package,
                provider_ref=body.reference,
                note=body.note,
            )
        except asyncpg.UniqueViolationError:  # this reference was recorded before
            assert body.reference is not None
            found = await self.orders.by_ref(body.provider, body.reference)
            assert found is not None  # orders are never deleted
            asked = (account, body.package, credits, body.amount_minor, currency)
            if (found.account, found.package, found.credits, found.amount_minor, found.currency) != asked:
                raise Conflict(
                    f"Reference {body.reference!r} is recorded for another order ({found.order_id}).",
                    param="reference",
                ) from None
            return _order_view(found), False
        return _order_view(order), True

    async def order(self, order_id: str) -> Order:
        found = await self.orders.get(order_id) if ORDER_ID.fullmatch(order_id) else None
        if found is None:
            raise NotFound(f"No order {order_id!r}.", param="order_id")
        return found

    async def paid(self, order_id: str, payment_ref: str) -> dict[str, Any]:
        """Land a manual order as its purchase grant, once: a retry (or many at once) credits nothing more.
        An order of another provider, or one failed, expired or canceled, is refused."""
        _text(payment_ref, "payment_ref", 200)
        order = await self.order(order_id)
        if order.provider != PROVIDER:
            raise Conflict(
                f"Order {order_id} is a {order.provider} order: only manual orders are settled by hand.",
                param="order_id",
                code="not_a_manual_order",
            )
        if order.status not in ("pending", "paid"):
            raise Conflict(
                f"Order {order_id} is {order.status}: it cannot be paid.",
                param="order_id",
                code="order_not_payable",
            )
        if order.status == "paid" and order.payment_ref not in (None, payment_ref):
            raise Conflict(
                f"Order {order_id} was paid with payment_ref {order.payment_ref!r}.", param="payment_ref"
            )
        return await self.payments.land(order, payment_ref)

    async def get(self, order_id: str) -> dict[str, Any]:
        return _order_view(await self.order(order_id))

    async def orders_of(self, account: str, limit: int = 100) -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST:
            raise BadRequest(f"limit must be between 1 and {MAX_LIST}.", param="limit")
        exists = ACCOUNT_ID.match(account) and await self.orders.pool.fetchval(
            "SELECT true FROM accounts WHERE id = $1", account
        )
        if not exists:
            raise NotFound(f"No account {account!r}.", param="account")
        orders = await self.orders.orders_of(account, limit)
        return {"object": "list", "account": account, "data": [_order_view(o) for o in orders]}


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid request body: {exc}", param=_field(str(exc))) from None
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"Invalid request body: {exc}") from None


def _field(message: str) -> str | None:
    found = re.search(r"at `\$\.([a-z_]+)`|field `([a-z_]+)`", message)
    return None if found is None else found.group(1) or found.group(2)


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


def add_manual_routes(
    admin: web.Application,
    packages: Mapping[str, PackageConfig],
    currency: str,
    providers: Collection[str] = (),
) -> None:
    """The manual-settlement routes on the /admin sub-app (behind its token); orders may also be made for
    the generic webhooks' `providers`."""

    def settlement(request: web.Request) -> ManualSettlement:
        return ManualSettlement(request.config_dict[PAYMENTS], packages, currency, providers)

    async def create(request: web.Request) -> web.Response:
        body = _decode(await request.read(), ManualOrderBody)
        view, made = await settlement(request).create(request.match_info["account"], body)
        return _json(view, status=201 if made else 200)

    async def paid(request: web.Request) -> web.Response:
        body = _decode(await request.read(), PaidBody)
        return _json(await settlement(request).paid(request.match_info["order_id"], body.payment_ref))

    async def get(request: web.Request) -> web.Response:
        return _json(await settlement(request).get(request.match_info["order_id"]))

    async def list_orders(request: web.Request) -> web.Response:
        raw = request.query.get("limit", "100")
        if not re.fullmatch(r"[0-9]{1,6}", raw):
            raise BadRequest("limit must be a whole number.", param="limit")
        return _json(await settlement(request).orders_of(request.match_info["account"], int(raw)))

    admin.router.add_post("/accounts/{account}/orders", create)
    admin.router.add_get("/accounts/{account}/orders", list_orders)
    admin.router.add_post("/orders/{order_id}/paid", paid)
    admin.router.add_get("/orders/{order_id}", get)
