"""Operator refunds of unused purchased credits: `POST /admin/orders/{order_id}/refund` with an
Idempotency-Key, body ``{credits?}`` (decimal; default: all the order's credits still unused).

Only a paid Stripe order, within `refund_window_days` of its payment. The credits are taken back first,
only from the order's own grant (never more than it has left): reversal ``operator:<order>:<key>``. The
money back is their share of the price (taken × amount_minor // credits, rounded down), refunded through
Stripe with the reversal id as idempotency key and in the refund's metadata (the `charge.refunded` webhook
it causes then finds the reversal done). A retry with the same key does nothing more; one after a failed
Stripe call makes that call again."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from ..admin import _decode as decode_body  # the admin API's body decoder
from ..admin import grant_amount, storable
from ..errors import BadRequest, Conflict, NotFound
from ..keys import as_text
from ..money import format_credits
from ..wallet import Grant
from .context import PAYMENT_CONTEXT
from .landing import PAYMENTS, Payments
from .orders import Order
from .stripe_adapter import StripeAdapter


class RefundBody(msgspec.Struct, forbid_unknown_fields=True):
    credits: str | None = None


def refundable(order: Order, asked: int | None, *, now: dt.datetime, window_days: int) -> int:
    """The micro-credits an operator may refund of `order` at `now` (`asked`, else all not yet taken
    back); a Conflict when the order cannot be refunded, a BadRequest when `asked` is too much. Pure."""
    if order.provider != "stripe" or order.status != "paid" or order.payment_ref is None:
        raise Conflict(
            f"Order {order.order_id} is not a paid Stripe order (status {order.status}, provider "
            f"{order.provider}).",
            param="order_id",
        )
    if order.paid_at is None or now - order.paid_at > dt.timedelta(days=window_days):
        raise Conflict(
            f"Order {order.order_id} was paid more than refund_window_days ({window_days}) ago.",
            param="order_id",
        )
    left = order.credits - order.refunded_credits
    if left <= 0:
        raise Conflict(f"Order {order.order_id} has no credits left to refund.", param="order_id")
    if asked is not None and asked > left:
        raise BadRequest(
            f"credits: at most {format_credits(left)} of this order's credits are left to refund.",
            param="credits",
        )
    return left if asked is None else asked


@dataclass(frozen=True, slots=True)
class ReversalState:
    status: str
    taken: int
    amount_minor: int
    provider_ref: str | None


async def reversal_state(payments: Payments, reversal_id: str) -> ReversalState | None:
    row = await payments.orders.pool.fetchrow(
        "SELECT status, coalesce(taken, 0), amount_minor, provider_ref FROM payment_reversals"
        " WHERE reversal_id = $1",
        reversal_id,
    )
    return None if row is None else ReversalState(row[0], row[1], row[2], row[3])


async def unused(payments: Payments, order: Order) -> int:
    """What is left of the order's grant in Redis (0: spent, or gone)."""
    b = payments.balances
    raw = await b.redis.hget(b.keys.account(order.account).grants, order.order_id)
    return 0 if raw is None else Grant.parse(order.order_id, as_text(raw)).remaining


async def operator_refund(
    payments: Payments,
    stripe: StripeAdapter,
    order_id: str,
    key: str,
    asked: int | None,
    *,
    now: dt.datetime,
    window_days: int,
) -> dict[str, Any]:
    if not key or len(key) > 200 or not storable(key):
        raise BadRequest("A refund needs an Idempotency-Key of 1-200 characters.", param="Idempotency-Key")
    order = await payments.orders.get(order_id) if storable(order_id) and len(order_id) <= 200 else None
    if order is None:
        raise NotFound(f"No order {order_id!r}.", param="order_id")
    reversal_id = f"operator:{order.order_id}:{key}"
    state = await reversal_state(payments, reversal_id)
    # The first time only: a retry finishes what its key started, whatever the window or the balance.
    credits = order.credits
    if state is None:
        credits = min(
            refundable(order, asked, now=now, window_days=window_days), await unused(payments, order)
        )
        if credits <= 0:  # asking for nothing would still use up what the order's reversals may ask
            raise Conflict(f"Order {order.order_id}'s credits are all used.", param="order_id")
    reversal = await payments.reverse(order, reversal_id, "operator_refund", credits, only_grant=True)
    money = reversal.taken * order.amount_minor // order.credits
    state = await reversal_state(payments, reversal_id)
    refund_id = state.provider_ref if state else None
    if state is not None and state.status == "debited" and money > 0:
        assert order.payment_ref is not None  # refundable() checked it on the first try
        refund_id = await stripe.refund(order.payment_ref, money, reversal_id)
        await payments.orders.mark_refunded(reversal_id, refund_id, money)
    if refund_id is not None:
        await payments.refunded(order, reversal_id, money)
    return {
        "order_id": order.order_id,
        "reversal_id": reversal_id,
        "credits": format_credits(reversal.taken),
        "credits_micro": reversal.taken,
        "amount_minor": money if refund_id else 0,
        "currency": order.currency,
        "refund_id": refund_id,
        "created": reversal.created,
    }


async def refund_route(request: web.Request) -> web.Response:
    ctx = request.config_dict[PAYMENT_CONTEXT]
    stripe = ctx.stripe_on()
    body: RefundBody = decode_body(await request.read(), RefundBody)
    asked = None if body.credits is None else grant_amount(None, body.credits)
    done = await operator_refund(
        request.config_dict[PAYMENTS],
        stripe,
        request.match_info["order_id"],
        request.headers.get("Idempotency-Key", ""),
        asked,
        now=dt.datetime.now(dt.UTC),
        window_days=ctx.settings.refund_window_days,
    )
    return web.json_response(done)
