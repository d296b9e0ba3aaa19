"""An account's saved payment method at Stripe (migration 012 `payment_methods`), for off-session payments
(auto-reload): saved by a checkout that asked for it, or set by the operator. Never shown back: views
say only whether one is saved."""

from __future__ import annotations

import re
from typing import NamedTuple

import asyncpg

from ..errors import BadRequest

_ID = re.compile(r"[A-Za-z0-9_]{5,200}\Z")
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy | asyncpg.Pool


class SavedMethod(NamedTuple):
    customer: str
    payment_method: str


def checked(customer: str, payment_method: str) -> SavedMethod:
    """Stripe ids, as Stripe writes them (a customer 'cus_...', a payment method 'pm_...' or an older
    'card_...'); a BadRequest naming the field otherwise."""
    if not _ID.fullmatch(customer) or not customer.startswith("cus_"):
        raise BadRequest("stripe_customer must be a Stripe customer id ('cus_...').", param="stripe_customer")
    if not _ID.fullmatch(payment_method) or not payment_method.startswith(("pm_", "card_")):
        raise BadRequest(
            "stripe_payment_method must be a Stripe payment method id ('pm_...').",
            param="stripe_payment_method",
        )
    return SavedMethod(customer, payment_method)


async def save(conn: Connection, account: str, method: SavedMethod) -> None:
    await conn.execute(
        "INSERT INTO payment_methods (account_id, customer, payment_method) VALUES ($1, $2, $3)"
        " ON CONFLICT (account_id) DO UPDATE SET customer = $2, payment_method = $3, saved_at = now()",
        account,
        method.customer,
        method.payment_method,
    )


async def saved(conn: Connection, account: str) -> SavedMethod | None:
    row = await conn.fetchrow(
        "SELECT customer, payment_method FROM payment_methods WHERE account_id = $1", account
    )
    return SavedMethod(row["customer"], row["payment_method"]) if row else None
