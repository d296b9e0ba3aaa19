"""Auto-reload: the reloads the flusher's observer requested (alerts.py: one `reloads` row per crossing of
an account's threshold, never speculatively) are started here, by a supervised worker, and end when their
order lands or fails.

A reload's order id derives from its reload id, so a pass that stops half-way and runs again (here or on
another sidecar: rows are claimed FOR UPDATE SKIP LOCKED) makes the same order and, with it as Stripe's
idempotency key, the same payment:
- `stripe`: an off-session payment with the account's saved payment method; the credits arrive by the
  verified `payment_intent.succeeded` webhook (stripe_events.py), never from the create's answer;
- `webhook`: a `reload.requested` event carries the order; the operator charges its customer and settles
  the order (`POST /admin/orders/{id}/paid`), or reports the failure (`POST /admin/reloads/{id}/fail`).
A failure (a declined card, a failed-payment webhook, the operator's report) emits `reload.failed`; after
`reload_max_failures` in a row the account's auto-reload turns off with `reload.disabled`. A landing emits
`reload.succeeded` and resets the count."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import asyncpg

from ..errors import CreditgateError, NotFound
from ..payments.landing import Payments
from ..payments.orders import Order
from ..payments.packages import price_minor
from ..payments.stripe_adapter import PaymentDeclined, StripeAdapter
from .alert_rules import reload_order_id
from .events import RELOAD_DISABLED, RELOAD_FAILED, RELOAD_REQUESTED, RELOAD_SUCCEEDED, Event, EventLog

log = logging.getLogger("creditgate.reloads")
BATCH = 20


class Reloads:
    def __init__(
        self,
        pool: asyncpg.Pool,
        events: EventLog,
        payments: Payments,
        stripe: Callable[[], StripeAdapter | None],
        *,
        credit_price: Decimal,
        currency: str,
        max_failures: int,
    ) -> None:
        self.pool, self.events, self.payments, self.stripe = pool, events, payments, stripe
        self.credit_price, self.currency, self.max_failures = credit_price, currency, max_failures
        payments.on_purchase.append(self.landed)
        payments.on_failure.append(self.order_failed)

    async def run_pass(self) -> int:
        """Start the requested reloads (oldest first); returns how many were started or ended."""
        ids = await self.pool.fetch(
            "SELECT reload_id FROM reloads WHERE status = 'requested' ORDER BY created_at LIMIT $1", BATCH
        )
        done = 0
        for row in ids:
            done += await self.start(row["reload_id"])
        return done

    async def start(self, reload_id: str) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT r.reload_id, r.account_id, r.method, r.credits, s.enabled, m.customer,"
                " m.payment_method FROM reloads r LEFT JOIN reload_settings s USING (account_id)"
                " LEFT JOIN payment_methods m USING (account_id)"
                " WHERE r.reload_id = $1 AND r.status = 'requested' FOR UPDATE OF r SKIP LOCKED",
                reload_id,
            )
            if r is None:
                return 0  # another sidecar has it, or it has moved on
            if not r["enabled"]:
                await self._end(conn, r, "auto-reload was turned off", count=False)
                return 1
            amount = price_minor(r["credits"], self.credit_price, self.currency)
            if amount is None:
                await self._end(conn, r, "the credits have no exact price in the currency", count=True)
                return 1
            order = await self.payments.orders.create(
                r["account_id"], "stripe" if r["method"] == "stripe" else "manual", credits=r["credits"],
                amount_minor=amount, currency=self.currency, note=f"auto-reload {reload_id}",
                order_id=reload_order_id(reload_id),
            )  # fmt: skip
            if r["method"] == "stripe":
                adapter = self.stripe()
                if adapter is None or r["payment_method"] is None:
                    await self._end(
                        conn, r, "Stripe is off, or no payment method is saved", count=True, order=order
                    )
                    return 1
                try:
                    intent = await adapter.charge_saved(order, r["customer"], r["payment_method"])
                except PaymentDeclined as exc:
                    await self._end(conn, r, f"declined: {exc.code}", count=True, order=order)
                    return 1
                except CreditgateError:  # Stripe unreachable: the next pass tries again, same order
                    log.warning("auto-reload %s: Stripe did not answer; retrying next pass", reload_id)
                    return 0
                await self.payments.orders.set_provider_ref(order.order_id, intent)
            await conn.execute("UPDATE reloads SET status = 'charging' WHERE reload_id = $1", reload_id)
            data = {"reload_id": reload_id, "method": r["method"], "credits": r["credits"]}
            data |= {"order_id": order.order_id, "amount_minor": amount, "currency": self.currency}
            await self._emit(conn, RELOAD_REQUESTED, reload_id, r["account_id"], data)
            return 1

    async def landed(self, order: Order) -> None:
        """A hook on every landing: a reload's order paid."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "UPDATE reloads SET status = 'succeeded', finished_at = now(), error = NULL"
                " WHERE order_id = $1 AND status <> 'succeeded' RETURNING reload_id, account_id,"
                " credits",
                order.order_id,
            )
            if r is None:
                return
            await conn.execute(
                "UPDATE reload_settings SET failures = 0 WHERE account_id = $1", r["account_id"]
            )
            data = {"reload_id": r["reload_id"], "credits": r["credits"], "order_id": order.order_id}
            await self._emit(conn, RELOAD_SUCCEEDED, r["reload_id"], r["account_id"], data)

    async def order_failed(self, order: Order, reason: str) -> None:
        """A hook on every failed payment: a reload's order failed."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT reload_id, account_id FROM reloads WHERE order_id = $1"
                " AND status IN ('requested', 'charging') FOR UPDATE",
                order.order_id,
            )
            if r is not None:
                await self._end(conn, r, f"payment failed: {reason}", count=True)

    async def report_failed(self, reload_id: str, reason: str) -> dict[str, Any]:
        """The operator's report that its own charge of a reload failed (method webhook)."""
        async with self.pool.acquire() as conn, conn.transaction():
            r = await conn.fetchrow(
                "SELECT reload_id, account_id, order_id FROM reloads WHERE reload_id = $1"
                " AND status IN ('requested', 'charging') FOR UPDATE",
                reload_id,
            )
            if r is None:
                raise NotFound(f"No open reload {reload_id!r}.", param="reload_id")
            if r["order_id"]:
                await conn.execute(
                    "UPDATE payment_orders SET status = 'failed' WHERE order_id = $1 AND status = 'pending'",
                    r["order_id"],
                )
            await self._end(conn, r, f"reported failed: {reason}"[:500], count=True)
        return {"id": reload_id, "status": "failed"}

    async def _end(
        self, conn: Any, r: asyncpg.Record, error: str, *, count: bool, order: Order | None = None
    ) -> None:
        reload_id, account = r["reload_id"], r["account_id"]
        await conn.execute(
            "UPDATE reloads SET status = 'failed', error = $2, finished_at = now() WHERE reload_id = $1",
            reload_id,
            error,
        )
        if order is not None:
            await conn.execute(
                "UPDATE payment_orders SET status = 'failed' WHERE order_id = $1 AND status = 'pending'",
                order.order_id,
            )
        if not count:
            return
        failures = await conn.fetchval(
            "UPDATE reload_settings SET failures = failures + 1 WHERE account_id = $1 RETURNING failures",
            account,
        )
        await self._emit(
            conn,
            RELOAD_FAILED,
            reload_id,
            account,
            {"reload_id": reload_id, "error": error, "failures": failures},
        )
        if failures is not None and failures >= self.max_failures:
            turned_off = await conn.fetchval(
                "UPDATE reload_settings SET enabled = false, disabled_reason = $2 WHERE account_id = $1"
                " AND enabled RETURNING true",
                account,
                f"{failures} reloads failed in a row",
            )
            if turned_off:
                data = {"reload_id": reload_id, "failures": failures}
                await self._emit(conn, RELOAD_DISABLED, reload_id, account, data)

    async def _emit(self, conn: Any, kind: str, reload_id: str, account: str, data: dict[str, Any]) -> None:
        await self.events.emit(conn, Event(id=f"{kind}:{reload_id}", type=kind, account=account, data=data))
