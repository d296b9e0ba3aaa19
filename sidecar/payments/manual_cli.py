"""The CLI verbs of manual settlement (``creditgate order create|paid|show|list``); cli.py registers and
dispatches them. They call the same `ManualSettlement` methods as the /admin routes."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

from ..services import Services
from .landing import Payments
from .manual import ManualOrderBody, ManualSettlement
from .orders import OrderStore
from .referrals import referral_bonus

Call = Callable[[Services], Awaitable[Any]]


def add_parsers(sub: Any) -> Any:
    """`sub`: the top-level subcommands (cli._Subparsers). Returns the `order` verb's subcommands (refunds
    are added to them by refund_cli)."""
    order = sub.nested(sub.add_parser("order", help="payment orders: manual settlement, refunds"))
    create = order.add_parser("create", help="record a pending manual order for an account")
    create.add_argument("account")
    what = create.add_mutually_exclusive_group(required=True)
    what.add_argument("--package", help="a package id (its credits)")
    what.add_argument("--credits", help="decimal credits, e.g. 1200")
    create.add_argument("--amount-minor", type=int, required=True, help="the price, in minor units")
    create.add_argument("--currency", help="ISO 4217 (default: the currency setting)")
    create.add_argument("--reference", help="invoice, transfer or PO number (one order per reference)")
    create.add_argument("--note")
    create.add_argument("--provider", default="manual", help="manual, or a payment_webhooks provider")
    paid = order.add_parser("paid", help="record an order paid: its purchase grant, once")
    paid.add_argument("order_id")
    paid.add_argument("--payment-ref", required=True, help="the transfer's or payment's reference")
    show = order.add_parser("show", help="show an order")
    show.add_argument("order_id")
    listed = order.add_parser("list", help="an account's orders, newest first")
    listed.add_argument("account")
    listed.add_argument("--limit", type=int, default=100)
    return order


def settlement(svc: Services) -> ManualSettlement:
    """As the server builds it: Payments with the referral bonus hook."""
    ops = svc.admin
    payments = Payments(OrderStore(svc.store.pool), ops, svc.balances)
    payments.on_purchase.append(referral_bonus(ops))
    s = svc.settings
    return ManualSettlement(payments, s.packages, s.currency, list(s.payment_webhooks))


async def _create(svc: Services, args: argparse.Namespace) -> dict[str, Any]:
    body = ManualOrderBody(**{name: getattr(args, name) for name in ManualOrderBody.__struct_fields__})
    view, made = await settlement(svc).create(args.account, body)
    return {**view, "created": made}


def calls(args: argparse.Namespace) -> dict[tuple[str, str | None], Call]:
    return {
        ("order", "create"): lambda svc: _create(svc, args),
        ("order", "paid"): lambda svc: settlement(svc).paid(args.order_id, args.payment_ref),
        ("order", "show"): lambda svc: settlement(svc).get(args.order_id),
        ("order", "list"): lambda svc: settlement(svc).orders_of(args.account, args.limit),
    }
