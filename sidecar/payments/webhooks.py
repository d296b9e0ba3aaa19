"""`POST /webhooks/stripe` and `POST /webhooks/{name}` (each entry of `payment_webhooks`): the signature is
checked before the body is parsed (signatures.py); a refused one is a 400, counted by reason, with nothing
done. A verified event is applied (stripe_events.py; for the generic body below) and then recorded once
per (provider, event id). Applying first means a crash in between loses nothing: the provider sends the
event again and the landing and reversal ids make the second pass change nothing.

The generic body: ``{id, type: "payment.succeeded" | "payment.refunded", order_id, amount_minor, currency,
payment_ref, refund_id}`` for an order of that provider; a refund names its `refund_id` and the
`amount_minor` refunded. ``{id, type: "invoice.paid", invoice, amount_minor, currency, payment_ref}``
records a payment of an issued invoice (once per `payment_ref`, else per event id)."""

from __future__ import annotations

import functools
import logging
import time

import msgspec
from aiohttp import web

from ..documents.plan_invoices import invoice_paid
from ..documents.plans_api import PLANS
from ..errors import BadRequest, NotFound
from .context import PAYMENT_CONTEXT
from .landing import PAYMENTS, Payments
from .signatures import SignatureRejected, verify
from .stripe_events import PROVIDER, Outcome, StripeEvents, decode_event, share

log = logging.getLogger("creditgate.webhooks")


class GenericEvent(msgspec.Struct):
    id: str
    type: str
    amount_minor: int
    currency: str
    order_id: str = ""
    invoice: str | None = None  # an invoice.paid event's document id
    payment_ref: str | None = None
    refund_id: str | None = None


async def _verified(request: web.Request, provider: str, header: str, secrets: list[str]) -> bytes:
    """The body, once its signature verifies; else a counted 400."""
    ctx = request.config_dict[PAYMENT_CONTEXT]
    body = await request.read()
    try:
        verify(
            request.headers.get(header),
            body,
            secrets,
            now=int(time.time()),
            tolerance=ctx.settings.webhook_tolerance_seconds,
            header=header,
        )
    except SignatureRejected as exc:
        ctx.rejections.add(provider, exc.reason)
        log.warning("refused a %s webhook: %s", provider, exc.reason)
        raise
    return body


def _bounded(value: str, field: str) -> None:
    if not 0 < len(value) <= 200:
        raise BadRequest(f"{field} must be 1-200 characters.", param=field)


async def _recorded(
    payments: Payments, provider: str, event_id: str, kind: str, done: Outcome
) -> web.Response:
    order_id, outcome = done
    first = await payments.orders.record_event(provider, event_id, kind[:200], order_id, outcome)
    log.info("%s event %s (%s): %s%s", provider, event_id, kind, outcome, "" if first else " (again)")
    return web.json_response({"received": True, "outcome": outcome, "first": first})


async def stripe_webhook(request: web.Request) -> web.Response:
    ctx = request.config_dict[PAYMENT_CONTEXT]
    try:
        body = await _verified(request, PROVIDER, "Stripe-Signature", ctx.settings.stripe_webhook_secrets)
        event = decode_event(body)
        _bounded(event.id, "id")
    except BadRequest as exc:
        if not isinstance(exc, SignatureRejected):
            ctx.rejections.add(PROVIDER, "bad_body")
        raise
    payments = request.config_dict[PAYMENTS]
    plans = request.config_dict.get(PLANS)
    invoices = None if plans is None else functools.partial(invoice_paid, plans)
    done = await StripeEvents(payments, ctx.stripe, invoices).apply(event)
    return await _recorded(payments, PROVIDER, event.id, event.type, done)


async def generic_webhook(request: web.Request) -> web.Response:
    ctx = request.config_dict[PAYMENT_CONTEXT]
    name = request.match_info["name"]
    config = ctx.settings.payment_webhooks.get(name)
    if config is None or name == PROVIDER:
        raise NotFound(f"No payment webhook {name!r}.", param="name")
    body = await _verified(request, name, config.header, config.secrets)
    try:
        event = msgspec.json.decode(body, type=GenericEvent)
        _bounded(event.id, "id")
    except msgspec.MsgspecError as exc:
        ctx.rejections.add(name, "bad_body")
        raise BadRequest(f"Invalid {name} event: {exc}", param="body") from None
    payments = request.config_dict[PAYMENTS]
    done = await _apply_generic(payments, name, event)
    return await _recorded(payments, name, event.id, event.type, done)


async def _apply_generic(payments: Payments, name: str, event: GenericEvent) -> Outcome:
    if event.type == "invoice.paid":
        if not event.invoice or payments.pay_document is None:
            raise BadRequest("An invoice.paid event needs its invoice (a document id).", param="invoice")
        _bounded(event.invoice, "invoice")
        payment_id = f"{name}:{event.payment_ref or event.id}"
        _bounded(payment_id, "payment_ref")
        outcome = await payments.pay_document(
            event.invoice, payment_id, event.amount_minor, event.currency, name
        )
        return None, outcome
    if event.type not in ("payment.succeeded", "payment.refunded"):
        return None, "ignored"
    order = await payments.orders.get(event.order_id) if len(event.order_id) <= 200 else None
    if order is None or order.provider != name:
        return event.order_id, "unknown_order"
    if event.type == "payment.refunded":
        if not event.refund_id:
            raise BadRequest("A payment.refunded event needs its refund_id.", param="refund_id")
        _bounded(event.refund_id, "refund_id")
        credits = share(order, event.amount_minor)
        await payments.reverse(order, f"{name}:{event.refund_id}", "refund", credits)
        await payments.refunded(order, f"{name}:{event.refund_id}", event.amount_minor)
        return order.order_id, "reversed"
    if event.amount_minor != order.amount_minor or event.currency.lower() != order.currency:
        return order.order_id, "amount_mismatch"
    if event.payment_ref is not None:
        _bounded(event.payment_ref, "payment_ref")
    landed = await payments.land(order, event.payment_ref)
    return order.order_id, "landed" if landed["credited"] else "already_landed"
