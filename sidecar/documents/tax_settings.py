"""The tax settings, a part of `config.Settings` (documented in the README, section "Billing profiles and
tax"). msgspec takes one base with fields per Struct, so this block stands in the chain of bases: Settings
inherits it, it inherits the idempotency settings. The rules are checked by `tax.check_tax_settings`."""

from __future__ import annotations

from typing import Literal

import msgspec

from ..metering.idempotency_settings import IdempotencySettings


class TaxRule(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One row of the rule table: where it applies (country, or "*" for anywhere; optionally a region of
    that country), to whom (b2b: a profile with a tax id; b2c: one without; any), and the rate: basis points
    (2000 = 20%) or an exact decimal percent string ("20.00"). Reverse charge: no tax is charged, the
    document names the rule (the customer accounts for the tax)."""

    name: str
    rate: int | str
    country: str = "*"
    region: str | None = None
    customer: Literal["b2b", "b2c", "any"] = "any"
    reverse_charge: bool = False


def default_tax_rules() -> list[TaxRule]:
    return [TaxRule(name="no-tax", country="*", rate=0)]  # no tax anywhere until the operator says so


class TaxSettings(IdempotencySettings, kw_only=True):
    # The tax rule table (most specific match wins: country+region > country > "*") and the seller's
    # country (ISO 3166-1 alpha-2; a reverse-charge rule cannot apply to it: reverse charge is cross-border).
    tax_rules: list[TaxRule] = msgspec.field(default_factory=default_tax_rules)
    tax_seller_country: str | None = None
