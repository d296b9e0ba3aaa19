"""Issuing documents: invoices, receipts and credit notes, each once per cause (its `source`), numbered
gap-free per issuer and immutable once written (migrations/014_documents.sql).

- A number is taken in the issuing transaction under the issuer's row lock (document_series), and the
  source is looked up again under that lock: a second issue of one source finds the first, and a failed
  issue rolls its number back. Numbers therefore follow commit order; the issue time never runs backwards
  (max(now, the last one's)), so a later number is never dated earlier.
- What a document says is fixed when it is issued: the seller, the billing profile (`profile_snapshot`,
  or none), the tax rule (the table's for that profile; a credit note takes its document's) and the
  amounts, computed with one rounding step per line (documents/tax.py). The row's body is that document;
  its payments are recorded beside it (document_payments), and its status is derived from them.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from ..errors import NotFound
from .profiles import profile_snapshot
from .tax import Taxed, TaxTable, compute, compute_inclusive, rule_of_snapshot, tax_snapshot

Kind = Literal["invoice", "receipt", "credit_note"]
KINDS: tuple[Kind, ...] = ("invoice", "receipt", "credit_note")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


def to_dt(ms: int) -> dt.datetime:
    return EPOCH + dt.timedelta(milliseconds=ms)


def iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def number_of(issuer: str, at: dt.datetime, seq: int) -> str:
    """`CG-2026-000123`: the issuer, the (UTC) year of issue and the issuer's sequence number."""
    return f"{issuer}-{at.astimezone(dt.UTC).year}-{seq:06d}"


@dataclass(frozen=True, slots=True)
class Line:
    description: str
    quantity: int
    unit: str
    credits: int  # micro-credits the line accounts for
    amount_minor: int  # the line's net, or its gross when the draft's amounts include the tax


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: str  # once per id
    amount_minor: int
    method: str  # "manual", "stripe", "x402", ...
    paid_at_ms: int


@dataclass(frozen=True)
class Draft:
    kind: Kind
    account: str
    source: str  # what caused it ("order:<id>", "period:<account>:<YYYY-MM>", "refund:<reversal>")
    currency: str
    lines: tuple[Line, ...]
    credits: int  # micro-credits the document accounts for (>= 0)
    inclusive: bool = False  # amounts include the tax (what was paid) or not (an invoice's nets)
    due_days: int | None = None  # an invoice on terms: due this many days after issue
    period: tuple[int, int] | None = None  # [start, end) in ms
    refers_to: str | None = None  # a document id (a credit note's)
    payment: Payment | None = None  # recorded with it (a receipt: what was paid)
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Issuer:
    prefix: str  # document_issuer
    seller: Mapping[str, Any]  # printed on each document
    table: TaxTable
    clock: Callable[[], int]  # ms (the wallet's clock)
    notes: Mapping[str, str] = field(default_factory=dict)


def lines_view(taxed: Taxed, lines: Sequence[Line]) -> list[dict[str, Any]]:
    return [
        {
            "description": line.description,
            "quantity": line.quantity,
            "unit": line.unit,
            "credits": line.credits,
            "net_minor": net,
            "tax_minor": tax,
            "gross_minor": gross,
        }
        for line, (net, tax, gross) in zip(lines, taxed.lines, strict=True)
    ]


async def _customer(conn: Conn, account: str) -> dict[str, Any] | None:
    try:
        return await profile_snapshot(conn, account)
    except NotFound:  # no billing profile (an unknown account fails the documents row's foreign key)
        return None


async def _referenced(conn: Conn, document_id: str) -> dict[str, Any]:
    raw = await conn.fetchval("SELECT body FROM documents WHERE id = $1", document_id)
    if raw is None:
        raise NotFound(f"No document {document_id!r}.", param="document")
    body: dict[str, Any] = json.loads(raw)
    return body


async def issue(conn: Conn, issuer: Issuer, draft: Draft) -> tuple[str, bool]:
    """Issue `draft` once: (its document id, True) the first time, (the id issued before, False) after.
    Runs in a transaction of its own (a savepoint when `conn` is in one)."""
    found = await conn.fetchval("SELECT id FROM documents WHERE source = $1", draft.source)
    if found is not None:
        return found, False
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO document_series (issuer) VALUES ($1) ON CONFLICT DO NOTHING", issuer.prefix
        )
        last = await conn.fetchrow(
            "SELECT last_seq, last_at FROM document_series WHERE issuer = $1 FOR UPDATE", issuer.prefix
        )
        assert last is not None  # (inserted above)
        found = await conn.fetchval("SELECT id FROM documents WHERE source = $1", draft.source)
        if found is not None:  # issued while this one waited for the number
            return found, False
        customer = await _customer(conn, draft.account)
        refers = await _referenced(conn, draft.refers_to) if draft.refers_to else None
        if refers is not None:
            rule = rule_of_snapshot(refers["tax"])
        elif customer is not None:
            rule = issuer.table.rule_for(customer)
        else:
            rule = issuer.table.choose("*", None, b2b=False)
        amounts = [line.amount_minor for line in draft.lines]
        taxed = compute_inclusive(rule, amounts) if draft.inclusive else compute(rule, amounts)
        seq = last["last_seq"] + 1
        at = to_dt(issuer.clock())
        if last["last_at"] is not None and last["last_at"] > at:
            at = last["last_at"]
        doc_id = f"doc_{secrets.token_hex(10)}"
        number = number_of(issuer.prefix, at, seq)
        due = at + dt.timedelta(days=draft.due_days) if draft.due_days is not None else None
        notes = list(draft.notes)
        if rule.reverse_charge:
            notes.append(issuer.notes.get("reverse_charge", REVERSE_CHARGE))
        body = {
            "object": "invoice",
            "id": doc_id,
            "kind": draft.kind,
            "number": number,
            "issuer": issuer.prefix,
            "account": draft.account,
            "currency": draft.currency,
            "issued_at": iso(at),
            "due_at": iso(due),
            "period": None
            if draft.period is None
            else {"start": iso(to_dt(draft.period[0])), "end": iso(to_dt(draft.period[1]))},
            "references": None if refers is None else {"document": refers["id"], "number": refers["number"]},
            "source": draft.source,
            "seller": dict(issuer.seller),
            "customer": customer,
            "tax": tax_snapshot(rule),
            "lines": lines_view(taxed, draft.lines),
            "totals": {"net_minor": taxed.net, "tax_minor": taxed.tax, "gross_minor": taxed.gross},
            "credits": draft.credits,
            "notes": notes,
        }
        await conn.execute(
            "UPDATE document_series SET last_seq = $2, last_at = $3 WHERE issuer = $1", issuer.prefix, seq, at
        )
        await conn.execute(
            "INSERT INTO documents (id, issuer, seq, number, kind, account_id, source, issued_at, due_at,"
            " currency, gross_minor, credits, refers_to, body)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb)",
            doc_id, issuer.prefix, seq, number, draft.kind, draft.account, draft.source, at, due,
            draft.currency, taxed.gross, draft.credits, draft.refers_to, json.dumps(body),
        )  # fmt: skip
        if draft.payment is not None:
            await record_payment(conn, doc_id, draft.payment)
    return doc_id, True


REVERSE_CHARGE = "Reverse charge: the customer accounts for the tax."


async def record_payment(conn: Conn, document_id: str, payment: Payment) -> bool:
    """A payment of a document, once per payment id; False when that id was recorded before."""
    done = await conn.execute(
        "INSERT INTO document_payments (payment_id, document_id, amount_minor, method, paid_at)"
        " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (payment_id) DO NOTHING",
        payment.payment_id,
        document_id,
        payment.amount_minor,
        payment.method,
        to_dt(payment.paid_at_ms),
    )
    return bool(done == "INSERT 0 1")
