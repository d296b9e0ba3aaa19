"""What credits cost: the packages and top-up tiers of `GET /v1/credits/packages`, a package's price, and the
credits a custom amount buys. Pure (Decimal and int only, no I/O): config.py checks the settings with it.

A price is `credits` × `credit_price` in the currency's minor unit (cents for usd, yen for jpy); it must
come out a whole number of minor units, and a custom amount must buy a whole number of micro-credits."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from ..errors import BadRequest, ConfigError
from ..money import MAX_GRANT, MICRO, format_credits
from .settings import PaymentSettings

# Digits of the minor unit, where they are not 2 (ISO 4217, as Stripe uses them); 'usdc' is x402's.
MINOR_DIGITS: dict[str, int] = {
    **dict.fromkeys(
        ("bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv",
         "xaf", "xof", "xpf"),
        0,
    ),
    **dict.fromkeys(("bhd", "jod", "kwd", "omr", "tnd"), 3),
    "usdc": 6,
}  # fmt: skip


def minor_digits(currency: str) -> int:
    return MINOR_DIGITS.get(currency.lower(), 2)


@dataclass(frozen=True, slots=True)
class Package:
    package_id: str
    name: str
    credits: int  # micro-credits
    price_minor: int

    def view(self, currency: str) -> dict[str, Any]:
        return {
            "id": self.package_id,
            "name": self.name,
            "credits": format_credits(self.credits),
            "credits_micro": self.credits,
            "price_minor": self.price_minor,
            "currency": currency,
        }


def _decimal(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except (InvalidOperation, ValueError, TypeError):
        return None
    return value if value.is_finite() else None


def credit_price_of(settings: PaymentSettings) -> Decimal:
    """`credit_price` as a positive Decimal of the currency's major unit (a ConfigError naming it)."""
    price = _decimal(settings.credit_price)
    if price is None or price <= 0:
        raise ConfigError(
            f"credit_price must be a positive decimal, got {settings.credit_price!r}.", param="credit_price"
        )
    return price


def price_minor(credits: int, credit_price: Decimal, currency: str) -> int | None:
    """`credits` micro-credits × `credit_price` in minor units; None when it is not a whole number."""
    num, den = credit_price.as_integer_ratio()
    whole, rest = divmod(credits * num * 10 ** minor_digits(currency), den * MICRO)
    return None if rest else whole


def credits_for(amount_minor: int, credit_price: Decimal, currency: str) -> int | None:
    """The micro-credits `amount_minor` buys at `credit_price`; None when it is not a whole number."""
    num, den = credit_price.as_integer_ratio()
    whole, rest = divmod(amount_minor * MICRO * den, num * 10 ** minor_digits(currency))
    return None if rest else whole


def packages_of(settings: PaymentSettings) -> dict[str, Package]:
    """The configured packages, priced; a bad one is a ConfigError naming `packages.<id>.credits`."""
    price = credit_price_of(settings)
    out: dict[str, Package] = {}
    for package_id, config in settings.packages.items():
        where = f"packages.{package_id}.credits"
        credits = _decimal(config.credits)
        micro = None if credits is None else credits * MICRO
        if micro is None or micro != micro.to_integral_value() or not 0 < micro <= MAX_GRANT:
            raise ConfigError(
                f"{where} must be a positive decimal of at most 6 decimals and at most "
                f"{format_credits(MAX_GRANT)} credits, got {config.credits!r}.",
                param=where,
            )
        cost = config.price_minor
        if cost is None:
            cost = price_minor(int(micro), price, settings.currency)
        if cost is None or cost <= 0:
            raise ConfigError(
                f"{where} × credit_price ({config.credits} × {settings.credit_price} {settings.currency}) "
                "is not a whole positive number of minor units: change the credits, or give price_minor.",
                param=where,
            )
        out[package_id] = Package(package_id, config.name or package_id, int(micro), cost)
    return out


def check_payment_settings(settings: PaymentSettings) -> None:
    """The payment settings at startup (config._check): the credit price, the packages, the top-up range."""
    packages_of(settings)
    if settings.top_up_min_minor > settings.top_up_max_minor:
        raise ConfigError("top_up_min_minor is above top_up_max_minor.", param="top_up_min_minor")
    for amount in settings.top_up_amounts:
        if not settings.top_up_min_minor <= amount <= settings.top_up_max_minor:
            raise ConfigError(
                f"top_up_amounts: {amount} is outside top_up_min_minor..top_up_max_minor.",
                param="top_up_amounts",
            )


def catalog(settings: PaymentSettings) -> dict[str, Any]:
    """The body of GET /v1/credits/packages."""
    currency = settings.currency
    return {
        "object": "credits.packages",
        "currency": currency,
        "credit_price": settings.credit_price,
        "packages": [p.view(currency) for p in packages_of(settings).values()],
        "top_up_amounts": list(settings.top_up_amounts),
        "top_up_min_minor": settings.top_up_min_minor,
        "top_up_max_minor": settings.top_up_max_minor,
    }


@dataclass(frozen=True, slots=True)
class Purchase:
    """What a checkout sells: the package (None: a custom amount), the micro-credits and the price."""

    package: str | None
    credits: int
    amount_minor: int
    name: str


def purchase_of(settings: PaymentSettings, package: str | None, amount: int | None) -> Purchase:
    """A checkout body's `package` or `amount` (minor units), checked; a BadRequest names the field."""
    if (package is None) == (amount is None):
        raise BadRequest("Give exactly one of `package` or `amount` (minor units).", param="package")
    if package is not None:
        found = packages_of(settings).get(package)
        if found is None:
            known = ", ".join(settings.packages) or "none"
            raise BadRequest(f"No package {package!r} (packages: {known}).", param="package")
        return Purchase(package, found.credits, found.price_minor, found.name)
    assert amount is not None
    low, high = settings.top_up_min_minor, settings.top_up_max_minor
    if not low <= amount <= high:
        raise BadRequest(f"amount must be between {low} and {high} minor units.", param="amount")
    credits = credits_for(amount, credit_price_of(settings), settings.currency)
    if credits is None or not 0 < credits <= MAX_GRANT:
        raise BadRequest(
            f"amount {amount} does not buy a whole number of micro-credits at {settings.credit_price}.",
            param="amount",
        )
    return Purchase(None, credits, amount, f"{format_credits(credits)} credits")
