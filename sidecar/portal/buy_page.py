"""Buy credits: the packages and a custom amount (the catalog of GET /v1/credits/packages), bought
through the checkout of POST /v1/credits/checkout (`start_checkout`): a pending order, then the browser
is sent to the provider's hosted page. Nothing is credited on the way back; the order lands when the
provider's signed webhook says it was paid, and this page then lists it paid."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..errors import CreditgateError, UpstreamUnavailable
from ..payments.checkout import CheckoutBody, start_checkout
from ..payments.packages import catalog
from ..responses import status_of
from . import forms
from .edge import desk, viewer
from .pages import form_data, form_error, page

ORDERS_SHOWN = 10


async def buy_view(request: web.Request, *, status: int = 200, **extra: Any) -> web.Response:
    d = desk(request)
    account = viewer(request).of()
    orders = await d.payments.orders.orders_of(account, ORDERS_SHOWN)
    context: dict[str, Any] = {"form": {}, **extra}
    return await page(
        request,
        "buy.html",
        active="buy",
        title="Buy credits",
        status=status,
        shop=catalog(d.payment_context.settings),
        checkout_on=d.payment_context.stripe is not None,
        orders=orders,
        **context,
    )


async def buy(request: web.Request) -> web.StreamResponse:
    return await buy_view(request)


async def checkout(request: web.Request) -> web.StreamResponse:
    """The form's package (its button) or custom amount in the currency's major unit; 303 to the
    provider's page."""
    d = desk(request)
    account = viewer(request).of()
    form = await form_data(request)
    ctx = d.payment_context
    try:
        ctx.stripe_on()
        package = forms.text(form, "package", longest=100)
        amount = None if package else forms.money(form, "amount", ctx.settings.currency)
        body = CheckoutBody(package=package, amount=amount, save_payment_method=forms.checkbox(form, "save"))
        started = await start_checkout(ctx, d.payments.orders, account, body)
    except CreditgateError as err:
        return await buy_view(request, status=status_of(err), form=form, **form_error(err))
    url = started["url"]
    if not isinstance(url, str) or not url.startswith("https://"):
        raise UpstreamUnavailable("The payment provider gave no https checkout page.", code="stripe_error")
    raise web.HTTPSeeOther(url)
