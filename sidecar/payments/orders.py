"""Payment orders in Postgres: orders, the webhook events received, reversals (payments/landing.py lands
and reverses them)."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any, Literal, cast

import asyncpg

from ..errors import UnknownAccount

ReversalReason = Literal["refund", "dispute", "operator_refund"]
_ORDER_COLUMNS = (
    "order_id, account_id, provider, status, package, credits, amount_minor, currency, provider_ref,"
    " payment_ref, refunded_credits, refunded_minor, created_at, paid_at"
)

_ORDER_COLUMNS_OF_O = ", ".join(f"o.{c.strip()}" for c in _ORDER_COLUMNS.split(","))


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    account: str
    provider: str
    status: str  # pending, paid, failed, expired, canceled
    package: str | None
    credits: int  # micro-credits it grants
    amount_minor: int
    currency: str
    provider_ref: str | None
    payment_ref: str | None
    refunded_credits: int
    refunded_minor: int
    created_at: dt.datetime
    paid_at: dt.datetime | None

    @classmethod
    def of(cls, row: asyncpg.Record) -> Order:
        return cls(*row.values())

    def view(self) -> dict[str, Any]:
        """The order as the API shows it."""
        return {
            "id": self.order_id,
            "account": self.account,
            "provider": self.provider,
            "status": self.status,
            "package": self.package,
            "credits": self.credits,
            "amount_minor": self.amount_minor,
            "currency": self.currency,
            "payment_ref": self.payment_ref,
            "refunded_credits": self.refunded_credits,
            "refunded_minor": self.refunded_minor,
            "created_at": _iso(self.created_at),
            "paid_at": _iso(self.paid_at),
        }


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.isoformat().replace("+00:00", "Z")


class OrderStore:
    """The payment tables of migration 007."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def create(
        self,
        account: str,
        provider: str,
        *,
        credits: int,
        amount_minor: int,
        currency: str,
        package: str | None = None,
        provider_ref: str | None = None,
        note: str | None = None,
        order_id: str | None = None,
    ) -> Order:
        """A new pending order (raises UnknownAccount). With `order_id` (one derived from its cause), an
        order made before under that id is returned as it is."""
        if order_id is not None and (made := await self.get(order_id)) is not None:
            return made
        order_id = order_id or f"ord_{secrets.token_hex(12)}"
        try:
            row = await self.pool.fetchrow(
                "INSERT INTO payment_orders (order_id, account_id, provider, status, package, credits,"
                " amount_minor, currency, provider_ref, note) VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7,"
                f" $8, $9) RETURNING {_ORDER_COLUMNS}",
                order_id, account, provider, package, credits, amount_minor, currency, provider_ref, note,
            )  # fmt: skip
        except asyncpg.ForeignKeyViolationError:
            raise UnknownAccount(account) from None
        except asyncpg.UniqueViolationError:  # made meanwhile under the same derived id
            if (made := await self.get(order_id)) is None:
                raise
            return made
        assert row is not None
        return Order.of(row)

    async def claim_ref(
        self,
        account: str,
        provider: str,
        provider_ref: str,
        *,
        credits: int,
        amount_minor: int,
        currency: str,
        note: str | None = None,
    ) -> tuple[Order, bool]:
        """The order of (provider, provider_ref), made now if there is none: (order, made now). The
        order found may belong to another account: the caller checks."""
        async with self.pool.acquire() as conn, conn.transaction():
            try:
                row = await conn.fetchrow(
                    "INSERT INTO payment_orders (order_id, account_id, provider, status, credits,"
                    " amount_minor, currency, provider_ref, note) VALUES ($1, $2, $3, 'pending', $4, $5, $6,"
                    f" $7, $8) ON CONFLICT (provider, provider_ref) DO NOTHING RETURNING {_ORDER_COLUMNS}",
                    f"ord_{secrets.token_hex(12)}", account, provider, credits, amount_minor, currency,
                    provider_ref, note,
                )  # fmt: skip
            except asyncpg.ForeignKeyViolationError:
                raise UnknownAccount(account) from None
            if row is not None:
                return Order.of(row), True
        found = await self.by_ref(provider, provider_ref)
        assert found is not None  # orders are never deleted
        return found, False

    async def set_provider_ref(self, order_id: str, provider_ref: str) -> None:
        await self.pool.execute(
            "UPDATE payment_orders SET provider_ref = $2 WHERE order_id = $1", order_id, provider_ref
        )

    async def get(self, order_id: str) -> Order | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE order_id = $1", order_id
        )
        return None if row is None else Order.of(row)

    async def by_ref(self, provider: str, provider_ref: str) -> Order | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE provider = $1 AND provider_ref = $2",
            provider,
            provider_ref,
        )
        return None if row is None else Order.of(row)

    async def by_payment_ref(self, provider: str, payment_ref: str) -> Order | None:
        row = await self.pool.fetchrow(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE provider = $1 AND payment_ref = $2"
            " ORDER BY created_at LIMIT 1",
            provider,
            payment_ref,
        )
        return None if row is None else Order.of(row)

    async def orders_of(self, account: str, limit: int = 100) -> list[Order]:
        rows = await self.pool.fetch(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders WHERE account_id = $1"
            " ORDER BY created_at DESC, order_id LIMIT $2",
            account,
            limit,
        )
        return [Order.of(r) for r in rows]

    async def set_status(self, order_id: str, status: Literal["failed", "expired", "canceled"]) -> bool:
        """End a pending order without payment; False when it is not pending (paid ones stay paid)."""
        done = await self.pool.execute(
            "UPDATE payment_orders SET status = $2 WHERE order_id = $1 AND status = 'pending'",
            order_id,
            status,
        )
        return bool(done == "UPDATE 1")

    async def mark_paid(self, order_id: str, payment_ref: str | None) -> Order:
        """The order marked paid (once: a later call keeps its first time and reference), as it is now."""
        row = await self.pool.fetchrow(
            "UPDATE payment_orders SET status = 'paid', paid_at = coalesce(paid_at, now()),"
            f" payment_ref = coalesce(payment_ref, $2) WHERE order_id = $1 RETURNING {_ORDER_COLUMNS}",
            order_id,
            payment_ref,
        )
        assert row is not None  # orders are never deleted
        return Order.of(row)

    async def record_event(
        self, provider: str, event_id: str, type: str, order_id: str | None, outcome: str
    ) -> bool:
        """Keep a verified webhook event once; True the first time its (provider, id) is seen."""
        done = await self.pool.execute(
            "INSERT INTO payment_events (provider, event_id, type, order_id, outcome)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            provider, event_id, type, order_id, outcome,
        )  # fmt: skip
        return bool(done == "INSERT 0 1")

    async def open_reversal(
        self, order: Order, reversal_id: str, reason: ReversalReason, credits: int, amount_minor: int
    ) -> tuple[str, int, int]:
        """The reversal's (status, asked, taken), written 'pending' the first time. What it asks is at
        most what the order's other reversals left of its credits (a refund and a dispute of the same
        charge never take it back twice)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SELECT 1 FROM payment_orders WHERE order_id = $1 FOR UPDATE", order.order_id)
            row = await conn.fetchrow(
                "SELECT status, asked, coalesce(taken, 0) FROM payment_reversals WHERE reversal_id = $1",
                reversal_id,
            )
            if row is not None:
                return row[0], row[1], row[2]
            others = await conn.fetchval(
                "SELECT coalesce(sum(asked), 0) FROM payment_reversals WHERE order_id = $1", order.order_id
            )
            asked = min(credits, order.credits - int(others))
            if asked <= 0:
                return "debited", 0, 0
            await conn.execute(
                "INSERT INTO payment_reversals (reversal_id, order_id, account_id, reason, asked,"
                " amount_minor, status) VALUES ($1, $2, $3, $4, $5, $6, 'pending')",
                reversal_id, order.order_id, order.account, reason, asked, amount_minor,
            )  # fmt: skip
        return "pending", asked, 0

    async def close_reversal(self, reversal_id: str, taken: int) -> None:
        """Record what the debit took (once: a pending reversal only) on the reversal and its order."""
        await self._then_order(
            "UPDATE payment_reversals SET status = 'debited', taken = $2, applied_at = now()"
            " WHERE reversal_id = $1 AND status = 'pending' RETURNING order_id",
            (reversal_id, taken),
            "refunded_credits",
            taken,
        )

    async def _then_order(self, update: str, args: tuple[Any, ...], column: str, amount: int) -> None:
        """Run `update` on a reversal (RETURNING its order id, none when it did not apply) and, when it
        applied, add `amount` to the order's `column`, in one transaction."""
        async with self.pool.acquire() as conn, conn.transaction():
            order_id = await conn.fetchval(update, *args)
            if order_id is not None:
                add = f"UPDATE payment_orders SET {column} = {column} + $2 WHERE order_id = $1"
                await conn.execute(add, order_id, amount)

    async def reversal_taken(self, reversal_id: str) -> int | None:
        """What a reversal took back (None: none with this id, or not debited yet)."""
        taken = await self.pool.fetchval(
            "SELECT taken FROM payment_reversals WHERE reversal_id = $1 AND status <> 'pending'", reversal_id
        )
        return None if taken is None else int(taken)

    async def stuck(
        self, older_than_seconds: float
    ) -> tuple[list[Order], list[tuple[str, Order, ReversalReason, int]]]:
        """What stopped half-way over `older_than_seconds` ago: orders still pending whose purchase grant
        is in the ledger (a landing that died before marking them paid) or whose x402 payment settled
        (its transaction recorded, the landing not done), and reversals still pending
        (reversal id, order, reason, asked: one that died around its debit)."""
        since = "now() - make_interval(secs => $1)"
        orders = await self.pool.fetch(
            f"SELECT {_ORDER_COLUMNS} FROM payment_orders o WHERE status = 'pending' AND (EXISTS (SELECT 1"
            f" FROM grants g WHERE g.account_id = o.account_id AND g.grant_id = o.order_id"
            f" AND g.created_at <= {since}) OR (provider = 'x402' AND payment_ref IS NOT NULL"
            f" AND created_at <= {since}))",
            older_than_seconds,
        )
        reversals = await self.pool.fetch(
            f"SELECT r.reversal_id, r.reason, r.asked, {_ORDER_COLUMNS_OF_O} FROM payment_reversals r"
            f" JOIN payment_orders o USING (order_id) WHERE r.status = 'pending' AND r.created_at <= {since}"
            " ORDER BY r.created_at",
            older_than_seconds,
        )
        found = [(r[0], Order(*list(r.values())[3:]), cast(ReversalReason, r[1]), r[2]) for r in reversals]
        return [Order.of(o) for o in orders], found

    async def mark_refunded(self, reversal_id: str, provider_ref: str, amount_minor: int) -> None:
        """The money of an operator's refund went back through the provider (its refund id)."""
        await self._then_order(
            "UPDATE payment_reversals SET status = 'refunded', provider_ref = $2, amount_minor = $3"
            " WHERE reversal_id = $1 AND status = 'debited' RETURNING order_id",
            (reversal_id, provider_ref, amount_minor),
            "refunded_minor",
            amount_minor,
        )
