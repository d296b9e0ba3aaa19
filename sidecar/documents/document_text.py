"""The words of an issued document (the JSON of GET /v1/invoices/{id}) shared by its PDF and its CSV: the
title by kind, amounts as exact decimal strings of the currency, dates, a party's address lines, the tax
summary. Pure: integers in, strings out; no floats anywhere near an amount."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any

from ..money import format_credits
from ..payments.packages import minor_digits

TITLES = {"invoice": "Invoice", "receipt": "Receipt", "credit_note": "Credit note"}
STATUSES = {"paid": "Paid", "open": "Open", "void": "Void"}
REVERSE_CHARGE_NOTE = "Reverse charge: VAT to be accounted for by the recipient."


def title(document: Mapping[str, Any]) -> str:
    kind = document["kind"]
    return TITLES.get(kind, str(kind).replace("_", " ").capitalize())


def integer(value: Any) -> int:
    """An amount as it must be: an int (a float, a bool or a string is a TypeError, never rounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"an amount is an integer (minor units or micro-credits), not {value!r}")
    return value


def amount(minor: int, currency: str, *, code: bool = True, grouped: bool = True) -> str:
    """`minor` units of `currency` as an exact decimal: 123456 usd -> '1,234.56 USD' (integer divmod by the
    currency's minor unit: 2 digits unless packages.MINOR_DIGITS says otherwise, 0 for jpy)."""
    integer(minor)
    digits = minor_digits(currency)
    whole, frac = divmod(abs(minor), 10**digits)
    text = f"{whole:,}" if grouped else str(whole)
    if digits:
        text += f".{frac:0{digits}d}"
    sign = "-" if minor < 0 else ""
    return f"{sign}{text} {currency.upper()}" if code else f"{sign}{text}"


def credits(micro: int) -> str:
    """Micro-credits as decimal credits: 5_000_000 -> '5', 12_500_000 -> '12.5'."""
    return format_credits(integer(micro))


def quantity(line: Mapping[str, Any]) -> str:
    value, unit = line.get("quantity"), line.get("unit")
    text = "" if value is None else f"{integer(value):,}"
    return f"{text} {unit}" if unit and text else text


def instant(text: str) -> dt.datetime:
    """An ISO 8601 UTC string ('2026-12-01T00:00:00Z') as an aware datetime."""
    moment = dt.datetime.fromisoformat(text)
    return moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)


def day(text: str | None) -> str:
    return instant(text).date().isoformat() if text else ""


def _midnight(moment: dt.datetime) -> bool:
    return moment.time() == dt.time(0, 0)


def period_text(period: Mapping[str, Any] | None) -> str:
    """A period's days, its end inclusive ('2026-11-01 – 2026-11-30' for [Nov 1, Dec 1)); a period that does
    not start and end at midnight UTC shows its instants instead."""
    if not period:
        return ""
    start, end = instant(period["start"]), instant(period["end"])
    if _midnight(start) and _midnight(end) and end > start:
        last = end - dt.timedelta(days=1)
        return f"{start.date().isoformat()} – {last.date().isoformat()}"
    return f"{start:%Y-%m-%d %H:%M} – {end:%Y-%m-%d %H:%M} UTC"


def party_lines(party: Mapping[str, Any] | None) -> list[str]:
    """A seller's or customer's address: street lines, postal code and city, region, country."""
    if not party:
        return []
    lines = [str(line) for line in party.get("address_lines") or [] if line]
    city = " ".join(str(p) for p in (party.get("postal_code"), party.get("city")) if p)
    lines += [p for p in (city, party.get("region"), party.get("country")) if p]
    return lines


def party_name(party: Mapping[str, Any] | None) -> str:
    if not party:
        return ""
    return str(party.get("legal_name") or party.get("name") or "")


def party_email(party: Mapping[str, Any] | None) -> str:
    if not party:
        return ""
    return str(party.get("billing_email") or party.get("email") or "")


def tax_text(tax: Mapping[str, Any] | None) -> str:
    """'Tax: rule eu-b2b-reverse at 0%, reverse charge (DE, b2b)'."""
    if not tax:
        return "Tax: none"
    where = ", ".join(
        str(p) for p in (tax.get("tax_country"), tax.get("tax_region"), tax.get("tax_customer")) if p
    )
    line = f"Tax: rule {tax.get('tax_rule')} at {tax.get('tax_rate')}"
    if tax.get("reverse_charge"):
        line += ", reverse charge"
    return f"{line} ({where})" if where else line


def notes(document: Mapping[str, Any]) -> list[str]:
    """The document's notes; a reverse-charge document always says so, once."""
    found = [str(n) for n in document.get("notes") or [] if n]
    reverse = bool((document.get("tax") or {}).get("reverse_charge"))
    if reverse and not any("reverse charge" in n.casefold() for n in found):
        found.insert(0, REVERSE_CHARGE_NOTE)
    return found


def paid_minor(payments: Sequence[Mapping[str, Any]] | None) -> int:
    return sum(integer(p["amount_minor"]) for p in payments or [])
