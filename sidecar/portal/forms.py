"""The portal's form fields, read and checked: each malformed value is a BadRequest naming its field, so
the page shows what is wrong beside it and nothing changes. Pure: text in, integers out (money in exact
decimals, never a float)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from decimal import Decimal

from ..errors import BadRequest
from ..money import MAX_MICRO, MICRO
from ..payments.packages import minor_digits

MAX_FIELD_CHARS = 1000


def text(form: Mapping[str, str], name: str, *, required: bool = False, longest: int = 200) -> str | None:
    """A text field, trimmed (None when empty and not required)."""
    value = form.get(name, "")
    if not isinstance(value, str) or len(value) > MAX_FIELD_CHARS:
        raise BadRequest(f"{name} is too long.", param=name)
    value = value.strip()
    if not value:
        if required:
            raise BadRequest(f"{name} is required.", param=name)
        return None
    if len(value) > longest or "\x00" in value or not value.isprintable():
        raise BadRequest(f"{name} must be 1-{longest} printable characters.", param=name)
    return value


def _scaled(raw: str, name: str, what: str, factor: int) -> Decimal:
    """`raw` as an exact decimal times `factor` (a unit's subdivisions); a BadRequest naming `name`."""
    cleaned = raw.replace(",", "").replace("_", "").strip()
    try:
        value = Decimal(cleaned) * factor
    except (ArithmeticError, ValueError):  # InvalidOperation, or Overflow past the context ("1e999999")
        raise BadRequest(f"{name} must be {what}, e.g. 12.5.", param=name) from None
    if not value.is_finite():
        raise BadRequest(f"{name} must be {what}, e.g. 12.5.", param=name)
    return value


def credits(form: Mapping[str, str], name: str, *, positive: bool = True) -> int:
    """A number of credits (a decimal, at most 6 places) as micro-credits; 0 only when not `positive`."""
    raw = text(form, name, required=True, longest=40)
    assert raw is not None
    exact = _scaled(raw, name, "a number of credits", MICRO)
    if exact != exact.to_integral_value():
        raise BadRequest(f"{name} has more than 6 decimals.", param=name)
    micro = int(exact)
    low = 1 if positive else 0
    if not low <= micro <= MAX_MICRO:
        raise BadRequest(
            f"{name} must be {'more than 0' if positive else 'at least 0'} and at most "
            f"{MAX_MICRO // MICRO:,} credits.",
            param=name,
        )
    return micro


def money(form: Mapping[str, str], name: str, currency: str) -> int:
    """An amount of the currency in its major unit ('25.00') as minor units (2500 for usd)."""
    raw = text(form, name, required=True, longest=40)
    assert raw is not None
    exact = _scaled(raw, name, f"an amount of {currency.upper()}", 10 ** minor_digits(currency))
    if exact != exact.to_integral_value() or exact <= 0:
        places = minor_digits(currency)
        raise BadRequest(f"{name} must be a positive amount with at most {places} decimals.", param=name)
    return int(exact)


def whole(form: Mapping[str, str], name: str, low: int, high: int) -> int:
    raw = text(form, name, required=True, longest=12) or ""
    if not (raw.isascii() and raw.isdigit()) or not low <= int(raw) <= high:
        raise BadRequest(f"{name} must be a whole number from {low} to {high}.", param=name)
    return int(raw)


def choice(form: Mapping[str, str], name: str, options: tuple[str, ...]) -> str:
    value = form.get(name, "")
    if value not in options:
        raise BadRequest(f"{name} must be one of {', '.join(options)}.", param=name)
    return value


def checkbox(form: Mapping[str, str], name: str) -> bool:
    return form.get(name) in ("on", "1", "true")


def day(form: Mapping[str, str], name: str) -> dt.date | None:
    """A date field (YYYY-MM-DD, as <input type=date> sends it), or None when empty."""
    raw = text(form, name, longest=10)
    if raw is None:
        return None
    try:
        return dt.date.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a date (YYYY-MM-DD).", param=name) from None


def end_of_day_iso(day: dt.date) -> str:
    """The instant a key that 'expires on' `day` stops working: the next midnight, UTC."""
    return (dt.datetime.combine(day, dt.time(), dt.UTC) + dt.timedelta(days=1)).isoformat()
