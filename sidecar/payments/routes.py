"""Where the payment routes are registered (app.py calls `payment_routes` and, on the /admin sub-app,
`admin_payment_routes`), with the Stripe client's lifecycle and the webhook rejections' metric."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from ..metrics import METRICS
from .checkout import checkout, packages
from .context import PAYMENT_CONTEXT, PaymentContext
from .refunds import refund_route
from .settings import PaymentSettings
from .stripe_adapter import StripeAdapter
from .webhooks import generic_webhook, stripe_webhook


def payment_routes(app: web.Application, settings: PaymentSettings) -> None:
    """/v1/credits/packages and /v1/credits/checkout (a client key), /webhooks/* (a signature)."""
    ctx = app[PAYMENT_CONTEXT] = PaymentContext(settings)
    app[METRICS].registry.register(ctx.rejections)

    async def stripe_client(app: web.Application) -> AsyncIterator[None]:
        if settings.stripe_api_key:
            ctx.stripe = StripeAdapter(settings.stripe_api_key, settings.stripe_api_base)
        try:
            yield
        finally:
            if ctx.stripe is not None:
                await ctx.stripe.close()
                ctx.stripe = None

    app.cleanup_ctx.append(stripe_client)
    app.router.add_get("/v1/credits/packages", packages)
    app.router.add_post("/v1/credits/checkout", checkout)
    app.router.add_post("/webhooks/stripe", stripe_webhook)
    app.router.add_post("/webhooks/{name}", generic_webhook)


def admin_payment_routes(admin: web.Application) -> None:
    admin.router.add_post("/orders/{order_id}/refund", refund_route)
