"""What x402 top-ups add to the order store: one payment at a time per order, and the settled transaction
kept on the order before it lands (so a retry after a crash lands it without settling again)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg


class X402Orders:
    def __init__(self, pool: asyncpg.Pool, locks: asyncpg.Pool) -> None:
        self.pool = pool  # the orders' pool
        self.locks = locks  # connections that only hold order locks

    @asynccontextmanager
    async def locked(self, order_id: str) -> AsyncIterator[None]:
        """Hold the order's lock (a transaction-scoped advisory lock on its id) while the body runs: the
        same payment presented twice at once is verified and settled by one request; the other waits and
        then finds the order paid. Not SELECT ... FOR UPDATE: landing updates the order's row from other
        connections (OrderStore.mark_paid), which a row lock held here would block. The lock's connection
        comes from a pool of its own: waiters holding all of the main pool would starve the holder."""
        async with self.locks.acquire() as conn, conn.transaction():
            # Scoped to the schema, like the ledger's locks: ledgers sharing a database never wait on
            # each other's.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(current_schema() || ':x402:' || $1, 0))",
                order_id,
            )
            yield

    async def record_settled(self, order_id: str, transaction: str) -> None:
        """The facilitator settled the order's payment in `transaction`: kept before the grant lands."""
        await self.pool.execute(
            "UPDATE payment_orders SET payment_ref = $2 WHERE order_id = $1 AND status = 'pending'",
            order_id,
            transaction,
        )
