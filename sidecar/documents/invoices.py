"""The issued documents as the API shows them, their payments, and the documents money in and money back
cause: a receipt for every top-up (each landing of a paid order, whatever its provider) and a credit note
for every refund, referring to that top-up's receipt.

A document's body never changes; its `status` is derived from its payments each time it is read: an
invoice is `open` until its payments cover its gross, then `paid` (`overdue` tells an open one past its
due date); receipts and credit notes are `paid` when issued. Paying an invoice in full grants its
credits back to the account once (grant `invoice:<document id>`): the usage it billed was accrued
against the credit limit, which the payment restores.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from ..errors import BadRequest, Conflict, NotFound
from ..money import format_credits
from ..payments.orders import Order
from ..wallet import GrantTerms
from .issuing import KINDS, Draft, Issuer, Line, Payment, iso, issue, record_payment, to_dt

Grant = Callable[..., Awaitable[dict[str, Any]]]  # AdminOps.grant
MAX_PAGE = 100


def receipt_draft(order: Order) -> Draft | None:
    """The receipt of a paid order (None for a free one: nothing was paid)."""
    if order.amount_minor <= 0:
        return None
    package = f", package {order.package}" if order.package else ""
    what = f"{format_credits(order.credits)} credits{package}"
    paid_ms = (order.paid_at or order.created_at) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return Draft(
        kind="receipt",
        account=order.account,
        source=f"order:{order.order_id}",
        currency=order.currency,
        lines=(Line(f"Credit top-up: {what} (order {order.order_id})", 1, "top-up", order.credits,
                    order.amount_minor),),
        credits=order.credits,
        inclusive=True,
        payment=Payment(f"order:{order.order_id}", order.amount_minor, order.provider,
                        paid_ms // dt.timedelta(milliseconds=1)),
    )  # fmt: skip


class Invoices:
    """Reads, payments and the money-caused documents, over the documents tables."""

    def __init__(self, pool: asyncpg.Pool, issuer: Issuer, grant: Grant) -> None:
        self.pool, self.issuer, self.grant = pool, issuer, grant

    async def issue(self, draft: Draft) -> dict[str, Any]:
        async with self.pool.acquire() as conn:
            doc_id, _ = await issue(conn, self.issuer, draft)
        return await self.view(doc_id)

    # ---- what money in and money back cause (Payments hooks: each runs again on a retry) ------------

    async def on_purchase(self, order: Order) -> None:
        await self.receipt(order)

    async def receipt(self, order: Order) -> dict[str, Any] | None:
        draft = receipt_draft(order)
        return None if draft is None else await self.issue(draft)

    async def credit_note(self, order: Order, reversal_id: str, amount_minor: int) -> dict[str, Any] | None:
        """The credit note of `amount_minor` given back for `order` (its reversal `reversal_id`), referring
        to the order's receipt (issued first if it was not: an order paid before receipts existed)."""
        if amount_minor <= 0:
            return None
        receipt = await self.receipt(order)
        if receipt is None:
            return None
        credited = await self.pool.fetchval(
            "SELECT coalesce(sum(gross_minor), 0) FROM documents WHERE refers_to = $1 AND source <> $2",
            receipt["id"],
            f"refund:{reversal_id}",
        )
        amount = min(amount_minor, receipt["totals"]["gross_minor"] - int(credited))
        if amount <= 0:
            return None
        taken = await self.pool.fetchval(
            "SELECT coalesce(taken, 0) FROM payment_reversals WHERE reversal_id = $1", reversal_id
        )
        draft = Draft(
            kind="credit_note",
            account=order.account,
            source=f"refund:{reversal_id}",
            currency=order.currency,
            lines=(Line(f"Refund for order {order.order_id} ({receipt['number']})", 1, "refund",
                        int(taken or 0), amount),),
            credits=int(taken or 0),
            inclusive=True,
            refers_to=receipt["id"],
        )  # fmt: skip
        return await self.issue(draft)

    # ---- reads ----------------------------------------------------------------------------------------

    async def view(self, doc_id: str, account: str | None = None) -> dict[str, Any]:
        """The document with its status and payments; a 404 when there is none (or, with `account`, when
        it is another account's: a client sees only its own)."""
        row = await self.pool.fetchrow(
            "SELECT body FROM documents WHERE id = $1 AND ($2::text IS NULL OR account_id = $2)",
            doc_id,
            account,
        )
        if row is None:
            raise NotFound(f"No document {doc_id!r}.", param="id")
        paid = await self.pool.fetch(
            "SELECT payment_id, amount_minor, method, paid_at FROM document_payments WHERE document_id = $1"
            " ORDER BY paid_at, payment_id",
            doc_id,
        )
        return self._viewed(json.loads(row["body"]), paid)

    def _viewed(self, body: dict[str, Any], paid: list[asyncpg.Record]) -> dict[str, Any]:
        payments = [
            {
                "id": p["payment_id"],
                "amount_minor": p["amount_minor"],
                "method": p["method"],
                "at": iso(p["paid_at"]),
            }
            for p in paid
        ]
        gross = body["totals"]["gross_minor"]
        settled = sum(p["amount_minor"] for p in payments)
        status = "paid" if body["kind"] != "invoice" or settled >= gross else "open"
        now = to_dt(self.issuer.clock())
        due = body.get("due_at")
        overdue = status == "open" and due is not None and dt.datetime.fromisoformat(due) < now
        return {**body, "status": status, "overdue": overdue, "amount_paid_minor": settled,
                "amount_due_minor": max(0, gross - settled) if body["kind"] == "invoice" else 0,
                "payments": payments}  # fmt: skip

    async def page(
        self, account: str | None, kind: str | None, limit: int, starting_after: str | None
    ) -> dict[str, Any]:
        """Newest first, `limit` at a time after the document `starting_after` (Stripe's list shape)."""
        if kind is not None and kind not in KINDS:
            raise BadRequest(f"kind must be one of {', '.join(KINDS)}.", param="kind")
        if not 1 <= limit <= MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {MAX_PAGE}.", param="limit")
        after = (None, None)  # (issued_at, seq) of `starting_after`: the page starts below it
        if starting_after is not None:
            found = await self.pool.fetchrow(
                "SELECT issued_at, seq FROM documents WHERE id = $1"
                " AND ($2::text IS NULL OR account_id = $2)",
                starting_after,
                account,
            )
            if found is None:
                raise BadRequest(f"starting_after: no document {starting_after!r}.", param="starting_after")
            after = (found["issued_at"], found["seq"])
        rows = await self.pool.fetch(
            "SELECT id, body FROM documents WHERE ($1::text IS NULL OR account_id = $1)"
            " AND ($2::text IS NULL OR kind = $2)"
            " AND ($3::timestamptz IS NULL OR (issued_at, seq) < ($3, $4))"
            " ORDER BY issued_at DESC, seq DESC LIMIT $5",
            account, kind, after[0], after[1], limit + 1,
        )  # fmt: skip
        shown = rows[:limit]
        paid = await self.pool.fetch(  # the page's payments in one query, not one per document
            "SELECT document_id, payment_id, amount_minor, method, paid_at FROM document_payments"
            " WHERE document_id = ANY($1::text[]) ORDER BY paid_at, payment_id",
            [r["id"] for r in shown],
        )
        by_doc: dict[str, list[asyncpg.Record]] = {}
        for payment in paid:
            by_doc.setdefault(payment["document_id"], []).append(payment)
        data = [self._viewed(json.loads(r["body"]), by_doc.get(r["id"], [])) for r in shown]
        return {"object": "list", "data": data, "has_more": len(rows) > limit}

    # ---- payments of invoices ---------------------------------------------------------------------

    async def pay(self, doc_id: str, payment: Payment) -> dict[str, Any]:
        """Record a payment of an invoice, once per payment id; when the invoice is paid in full, its
        credits are granted back (once: grant `invoice:<id>`, ledger row first)."""
        async with self.pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT kind, gross_minor, account_id, credits, number FROM documents"
                " WHERE id = $1 FOR UPDATE",  # one payment of a document at a time (no row change)
                doc_id,
            )
            if row is None:
                raise NotFound(f"No document {doc_id!r}.", param="id")
            if row["kind"] != "invoice":
                raise Conflict(f"Document {doc_id} is a {row['kind']}: only invoices are paid.", param="id")
            other = await conn.fetchval(
                "SELECT document_id FROM document_payments WHERE payment_id = $1", payment.payment_id
            )
            if other is not None and other != doc_id:
                raise Conflict(f"Payment {payment.payment_id!r} paid another document.", param="payment_id")
            paid = await conn.fetchval(
                "SELECT coalesce(sum(amount_minor), 0) FROM document_payments WHERE document_id = $1", doc_id
            )
            if other is None:
                if paid >= row["gross_minor"]:
                    raise Conflict(f"Invoice {row['number']} is paid already.", param="id")
                if payment.amount_minor > row["gross_minor"] - paid:
                    raise BadRequest(
                        f"amount_minor: at most {row['gross_minor'] - paid} is due on invoice "
                        f"{row['number']}.",
                        param="amount_minor",
                    )
                if await record_payment(conn, doc_id, payment):
                    paid += payment.amount_minor
        if paid >= row["gross_minor"] and row["credits"] > 0:
            terms = GrantTerms(kind="purchase", effective_ms=self.issuer.clock())
            await self.grant(
                row["account_id"], row["credits"], f"invoice:{doc_id}", "purchase",
                f"invoice {row['number']} paid", terms=terms, payment_ref=payment.payment_id,
            )  # fmt: skip
        return await self.view(doc_id)

    async def pay_by_webhook(
        self, doc_id: str, payment_id: str, amount_minor: int, currency: str, method: str
    ) -> str:
        """A payment webhook's report (Payments.pay_document): the outcome the event is recorded with."""
        row = await self.pool.fetchrow("SELECT kind, currency FROM documents WHERE id = $1", doc_id)
        if row is None or row["kind"] != "invoice":
            return "unknown_invoice"
        if currency.lower() != row["currency"] or amount_minor <= 0:
            return "amount_mismatch"
        before = await self.pool.fetchval(
            "SELECT document_id FROM document_payments WHERE payment_id = $1", payment_id
        )
        if before is not None:
            return "already_paid" if before == doc_id else "amount_mismatch"
        try:
            paid = await self.pay(doc_id, Payment(payment_id, amount_minor, method, self.issuer.clock()))
        except (BadRequest, Conflict):  # more than is due, or paid already: nothing recorded
            return "amount_mismatch"
        return "paid" if paid["status"] == "paid" else "partly_paid"

    async def finish_paid(self) -> int:
        """Grant back what paid invoices' grants did not yet (a pay that stopped between its commit and
        its grant); the grant key makes this a no-op for the rest. Returns how many it looked at."""
        rows = await self.pool.fetch(
            "SELECT d.id FROM documents d WHERE d.kind = 'invoice' AND d.credits > 0"
            " AND (SELECT coalesce(sum(p.amount_minor), 0) FROM document_payments p"
            " WHERE p.document_id = d.id) >= d.gross_minor AND NOT EXISTS (SELECT 1 FROM money_in_keys k"
            " WHERE k.account_id = d.account_id"
            " AND k.idempotency_id = 'in:' || d.account_id || ':invoice:' || d.id)"
        )
        for r in rows:
            last = await self.pool.fetchrow(
                "SELECT payment_id, amount_minor, method FROM document_payments WHERE document_id = $1"
                " ORDER BY paid_at DESC LIMIT 1",
                r["id"],
            )
            assert last is not None  # (paid in full: it has payments)
            await self.pay(r["id"], Payment(last[0], last[1], last[2], 0))
        return len(rows)
