"""How a paid order lands (a purchase grant, once) and how money that went back leaves again (a reversal,
once). Every provider's path (Stripe, x402, manual settlement, a generic webhook) ends in `Payments.land`
or `Payments.reverse`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..admin import AdminOps
from ..balances import Balances
from ..wallet import GrantTerms
from .orders import Order, OrderStore, ReversalReason


@dataclass(frozen=True, slots=True)
class Reversal:
    taken: int  # micro-credits the debit took back
    created: bool  # False: this reversal id was applied before


PurchaseHook = Callable[[Order], Awaitable[None]]
FailureHook = Callable[[Order, str], Awaitable[None]]  # the order, the provider's reason (a decline code)
RefundHook = Callable[[Order, str, int], Awaitable[Any]]  # the order, the reversal id, the money back (minor)
# Records a payment of an issued invoice: (document id, payment id, amount_minor, currency, method) -> the
# outcome ("paid", "partly_paid", "already_paid", "unknown_invoice", "amount_mismatch").
DocumentPayer = Callable[[str, str, int, str, str], Awaitable[str]]


class Payments:
    """Where every payment lands and every reversal leaves."""

    def __init__(self, orders: OrderStore, ops: AdminOps, balances: Balances) -> None:
        self.orders = orders
        self.ops = ops
        self.balances = balances
        # Run after each landing of a purchase (again on a retried one: each must be idempotent).
        self.on_purchase: list[PurchaseHook] = []
        # Run when a provider says an order's payment failed (again on a repeated event: idempotent).
        self.on_failure: list[FailureHook] = []
        # Run when money went back to the customer (a refund), again on a retried one: idempotent.
        self.on_refund: list[RefundHook] = []
        # Set by the invoices feature: how a payment webhook pays an issued invoice.
        self.pay_document: DocumentPayer | None = None

    async def refunded(self, order: Order, reversal_id: str, amount_minor: int) -> None:
        """`amount_minor` of `order`'s payment went back to the customer, under `reversal_id` (the credits
        it took back, if any, were reversed under that id): the hooks run (a credit note)."""
        for hook in self.on_refund:
            await hook(order, reversal_id, amount_minor)

    async def fail(self, order: Order, reason: str) -> bool:
        """A pending order's payment failed: it ends 'failed' and the hooks run; False when it was not
        pending (a paid order stays paid)."""
        ended = await self.orders.set_status(order.order_id, "failed")
        if ended:
            for hook in self.on_failure:
                await hook(order, reason)
        return ended

    async def land(self, order: Order, payment_ref: str | None = None) -> dict[str, Any]:
        """The order's purchase grant, once (its grant id is the order id): the ledger row first, then
        Redis, then applied (AdminOps.grant), taking effect now by the wallet's clock in both; then the
        order is marked paid and the hooks run."""
        ref = payment_ref or order.payment_ref
        granted = await self.ops.grant(
            order.account,
            order.credits,
            order.order_id,
            "purchase",
            f"order {order.order_id} ({order.provider})",
            terms=GrantTerms(kind="purchase", effective_ms=self.balances.wallet.clock()),
            payment_ref=ref,
        )
        paid = await self.orders.mark_paid(order.order_id, ref)
        for hook in self.on_purchase:
            await hook(paid)
        return {**granted, "order": paid.view()}

    async def reverse(
        self,
        order: Order,
        reversal_id: str,
        reason: ReversalReason,
        credits: int,
        *,
        only_grant: bool = False,
        amount_minor: int = 0,
    ) -> Reversal:
        """Take back up to `credits` micro-credits of the order's account because its money went back,
        once per `reversal_id`: recorded pending in Postgres, then the debit script (from the order's
        grant first; with `only_grant` only from it; never below a zero balance), then recorded taken.
        A retry after a crash between the two finds the pending row and the debit's marker."""
        if credits <= 0:
            return Reversal(0, created=False)
        status, asked, taken = await self.orders.open_reversal(
            order, reversal_id, reason, credits, amount_minor
        )
        if status != "pending":
            return Reversal(taken, created=False)
        debit = await self.balances.debit(
            order.account, reversal_id, asked, grant_id=order.order_id, only_grant=only_grant
        )
        await self.orders.close_reversal(reversal_id, debit.taken)
        return Reversal(debit.taken, created=debit.now)

    async def restore(self, order: Order, reversal_id: str) -> int:
        """Give back what a reversal took (a dispute the merchant won), once: a `refund` grant of that
        amount, its idempotency key `restore:<reversal id>`. Returns the micro-credits given back now (0
        when nothing was taken, or when they were given back before)."""
        taken = await self.orders.reversal_taken(reversal_id)
        if not taken:
            return 0
        granted = await self.ops.grant(
            order.account,
            taken,
            f"restore:{reversal_id}",
            "refund",
            f"{reversal_id} reversed (order {order.order_id})",
            terms=GrantTerms(kind="refund", effective_ms=self.balances.wallet.clock()),
            payment_ref=order.payment_ref,
        )
        return taken if granted["credited"] else 0

    async def complete(self, older_than_seconds: float = 60) -> int:
        """Finish what stopped half-way (the reconciler's, each pass): a landing whose order was not marked
        paid, a reversal left pending around its debit (the debit's marker says what it took). Returns
        how many were finished."""
        orders, reversals = await self.orders.stuck(older_than_seconds)
        for order in orders:
            await self.land(order)
        for reversal_id, order, reason, asked in reversals:
            # an operator's refund takes only from the order's grant, also when finished here
            only = reason == "operator_refund"
            await self.reverse(order, reversal_id, reason, asked, only_grant=only)
        return len(orders) + len(reversals)


PAYMENTS = web.AppKey("payments", Payments)
