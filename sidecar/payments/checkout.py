"""`GET /v1/credits/packages` (what credits cost) and `POST /v1/credits/checkout` (buy them with Stripe
Checkout), for a client key on its own account. A checkout records a pending order, then the hosted
session (its id the order's provider_ref); nothing is credited here, nor on the success redirect: the
order lands when Stripe's signed webhook says it was paid (webhooks.py)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from aiohttp import web

from ..admin import _decode as decode_body  # the admin API's body decoder
from ..money import format_credits
from ..wallet_api import WALLET_OPS
from .context import PAYMENT_CONTEXT, PaymentContext
from .landing import PAYMENTS
from .orders import OrderStore
from .packages import catalog, purchase_of


class CheckoutBody(msgspec.Struct, forbid_unknown_fields=True):
    package: str | None = None
    amount: Annotated[int, msgspec.Meta(ge=0)] | None = None  # minor units
    save_payment_method: bool = False  # keep the card at Stripe for auto-reload (off-session payments)


async def packages(request: web.Request) -> web.Response:
    await request.config_dict[WALLET_OPS].caller(request)
    return web.json_response(catalog(request.config_dict[PAYMENT_CONTEXT].settings))


async def checkout(request: web.Request) -> web.Response:
    caller = await request.config_dict[WALLET_OPS].caller(request)
    ctx = request.config_dict[PAYMENT_CONTEXT]
    ctx.stripe_on()
    body: CheckoutBody = decode_body(await request.read(), CheckoutBody)
    started = await start_checkout(ctx, request.config_dict[PAYMENTS].orders, caller.account, body)
    return web.json_response(started, status=201)


async def start_checkout(
    ctx: PaymentContext, orders: OrderStore, account: str, body: CheckoutBody
) -> dict[str, Any]:
    """A pending order for `account` and its hosted Checkout Session (the API's checkout and the portal's
    Buy credits): the answer's body, with the session's `url` to send the customer to."""
    stripe = ctx.stripe_on()
    settings = ctx.settings
    purchase = purchase_of(settings, body.package, body.amount)
    order = await orders.create(
        account,
        "stripe",
        credits=purchase.credits,
        amount_minor=purchase.amount_minor,
        currency=settings.currency,
        package=purchase.package,
    )
    session = await stripe.create_session(
        order,
        purchase.name,
        settings.checkout_success_url,
        settings.checkout_cancel_url,
        save_method=body.save_payment_method,
    )
    await orders.set_provider_ref(order.order_id, session.session_id)
    return {
        "order_id": order.order_id,
        "url": session.url,
        "session_id": session.session_id,
        "credits": format_credits(order.credits),
        "credits_micro": order.credits,
        "amount_minor": order.amount_minor,
        "currency": order.currency,
    }
