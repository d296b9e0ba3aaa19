"""`creditgate order refund ORDER_ID --idempotency-key K [--credits D]`: an operator refund (refunds.py)
from the command line, against the same Redis, Postgres and Stripe as the sidecar; cli.py registers it."""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

from ..admin import grant_amount
from ..services import Services
from .context import stripe_off
from .landing import Payments
from .orders import OrderStore
from .refunds import operator_refund
from .stripe_adapter import StripeAdapter

Call = Callable[[Services], Awaitable[Any]]


def add_parsers(order: Any) -> None:
    """`order`: the `order` verb's subcommands (manual_cli.add_parsers)."""
    refund = order.add_parser("refund", help="refund a paid Stripe order's unused credits, once per key")
    refund.add_argument("order_id")
    refund.add_argument("--idempotency-key", required=True)
    refund.add_argument("--credits", help="decimal credits; default: all of the order's unused credits")


async def _refund(svc: Services, args: argparse.Namespace) -> dict[str, Any]:
    s = svc.settings
    if not s.stripe_api_key:
        raise stripe_off()
    stripe = StripeAdapter(s.stripe_api_key, s.stripe_api_base)
    try:
        return await operator_refund(
            Payments(OrderStore(svc.store.pool), svc.admin, svc.balances),
            stripe,
            args.order_id,
            args.idempotency_key,
            None if args.credits is None else grant_amount(None, args.credits),
            now=dt.datetime.now(dt.UTC),
            window_days=s.refund_window_days,
        )
    finally:
        await stripe.close()


def calls(args: argparse.Namespace) -> dict[tuple[str, str | None], Call]:
    return {("order", "refund"): lambda svc: _refund(svc, args)}
