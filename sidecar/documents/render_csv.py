"""An issued document as CSV (the csv module, RFC 4180 lines): header rows naming the document, one row per
line, then the totals. Amounts are exact decimal strings of the currency from its integers ('12.34', no
thousands separator, the currency in its own row); credits are decimal credits. A text cell that a
spreadsheet would run as a formula (starting with = + - @ or a tab/CR) gets a leading apostrophe."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from typing import Any

from . import document_text as text

LINE_HEADER = ("description", "quantity", "unit", "credits", "net", "tax", "gross")
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> str:
    """A free-text cell (a customer's name, a description) made inert for spreadsheets."""
    cell = "" if value is None else str(value)
    return "'" + cell if cell.startswith(_FORMULA) else cell


def csv_text(document: Mapping[str, Any]) -> str:
    """The document as CSV text (CRLF line ends)."""
    currency = str(document["currency"])
    customer = document.get("customer") or {}
    tax = document.get("tax") or {}
    period = document.get("period") or {}
    references = document.get("references") or {}

    def money(minor: int) -> str:
        return text.amount(minor, currency, code=False, grouped=False)

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    header = [
        ("document", document["number"]),
        ("kind", document["kind"]),
        ("id", document.get("id", "")),
        ("currency", currency.upper()),
        ("issued_at", document["issued_at"]),
        ("due_at", document.get("due_at") or ""),
        ("period_start", period.get("start", "")),
        ("period_end", period.get("end", "")),
        ("credits_invoice", references.get("number", "")),
        ("status", document.get("status", "")),
        ("account", document.get("account", "")),
        ("customer_legal_name", _cell(customer.get("legal_name"))),
        ("customer_tax_id", _cell(customer.get("tax_id"))),
        ("customer_country", customer.get("country") or ""),
        ("tax_rule", tax.get("tax_rule", "")),
        ("tax_rate", tax.get("tax_rate", "")),
        ("tax_rate_bp", tax.get("tax_rate_bp", "")),
        ("reverse_charge", "yes" if tax.get("reverse_charge") else "no"),
    ]
    writer.writerows(header)
    writer.writerow(())
    writer.writerow(LINE_HEADER)
    for line in document.get("lines") or []:
        quantity = line.get("quantity")
        writer.writerow(
            (
                _cell(line.get("description")),
                "" if quantity is None else text.integer(quantity),
                _cell(line.get("unit")),
                "" if line.get("credits") is None else text.credits(line["credits"]),
                money(line["net_minor"]),
                money(line["tax_minor"]),
                money(line["gross_minor"]),
            )
        )
    totals = document["totals"]
    writer.writerow(
        ("total", "", "", "", *(money(totals[k]) for k in ("net_minor", "tax_minor", "gross_minor")))
    )
    if document["kind"] == "invoice" and document.get("status") != "void":
        paid = text.paid_minor(document.get("payments"))
        writer.writerow(("paid", "", "", "", "", "", money(paid)))
        writer.writerow(("amount_due", "", "", "", "", "", money(text.integer(totals["gross_minor"]) - paid)))
    return out.getvalue()
