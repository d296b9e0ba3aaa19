"""Tax: the configured rule table (settings `tax_rules`, `tax_seller_country`), which rule applies to a
billing profile, and the tax of a document's lines, in integer minor units.

Rule choice: of the rules whose country (or "*"), region (when the rule names one) and customer kind
match, the most specific wins: country+region > country > "*", and within one of those a rule for the
customer's kind (b2b: the profile has a tax id; b2c: it has none) over one for "any". The table must hold
a fallback (country "*", customer "any", no region), so every profile has exactly one rule.

Rounding, the one step per line: a line's tax = net × rate_bp / 10000 rounded half-up (a half goes away
from zero: 0.5 → 1, -0.5 → -1); the totals are the sums of the rounded lines. Reverse charge: tax 0 on
every line, the rule named in the result."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .countries import country_of
from .tax_settings import TaxRule, TaxSettings

BP = 10_000  # basis points in 100%
_PERCENT = re.compile(r"(\d{1,3})(?:\.(\d{1,2}))?\Z")


@dataclass(frozen=True)
class Rule:
    name: str
    country: str  # an ISO code, or "*"
    region: str | None
    customer: str  # "b2b" | "b2c" | "any"
    rate_bp: int  # basis points: 2000 = 20%
    reverse_charge: bool

    @property
    def specificity(self) -> int:
        return 0 if self.country == "*" else 2 if self.region is not None else 1

    def matches(self, country: str, region: str | None, b2b: bool) -> bool:
        if self.country not in ("*", country):
            return False
        if self.region is not None and (region is None or _fold(region) != _fold(self.region)):
            return False
        return self.customer == "any" or (self.customer == "b2b") == b2b


def _fold(region: str) -> str:
    return region.strip().casefold()


def rate_bp_of(value: int | str) -> int:
    """Basis points from an integer (0..10000) or an exact percent string with at most two decimals."""
    if isinstance(value, bool):
        raise ValueError("a rate is basis points (an integer) or a percent string such as '20.00'")
    if isinstance(value, int):
        bp = value
    else:
        found = _PERCENT.match(value.strip())
        if found is None:
            raise ValueError(f"{value!r} is not a percent with at most two decimals, such as '20.00'")
        bp = int(found.group(1)) * 100 + int((found.group(2) or "0").ljust(2, "0"))
    if not 0 <= bp <= BP:
        raise ValueError("a rate is between 0 and 10000 basis points (0% to 100%)")
    return bp


def percent_of(rate_bp: int) -> str:
    """The rate as an exact percent string: 2000 → '20.00'."""
    return f"{rate_bp // 100}.{rate_bp % 100:02d}"


@dataclass(frozen=True)
class TaxTable:
    rules: tuple[Rule, ...]
    seller_country: str | None = None

    @classmethod
    def of(cls, settings: TaxSettings) -> TaxTable:
        """The checked table; a ConfigError names the setting (`tax_rules[2].rate`)."""
        return cls.from_rules(settings.tax_rules, settings.tax_seller_country)

    @classmethod
    def from_rules(cls, raw: Sequence[TaxRule], seller_country: str | None = None) -> TaxTable:
        seller = None
        if seller_country is not None:
            try:
                seller = country_of(seller_country)
            except ValueError as exc:
                raise ConfigError(f"tax_seller_country: {exc}.", param="tax_seller_country") from None
        rules: list[Rule] = []
        seen: dict[tuple[str, str | None, str], int] = {}
        for i, entry in enumerate(raw):
            rule = _rule_of(entry, f"tax_rules[{i}]", seller)
            if any(r.name == rule.name for r in rules):
                raise ConfigError(
                    f"tax_rules[{i}].name: {rule.name!r} names another rule too.",
                    param=f"tax_rules[{i}].name",
                )
            key = (rule.country, None if rule.region is None else _fold(rule.region), rule.customer)
            if key in seen:
                raise ConfigError(
                    f"tax_rules[{i}] applies where tax_rules[{seen[key]}] does (same country, region and "
                    "customer): one of them would never apply.",
                    param=f"tax_rules[{i}]",
                )
            seen[key] = i
            rules.append(rule)
        if ("*", None, "any") not in seen:
            raise ConfigError(
                "tax_rules needs a fallback rule: country '*', customer 'any', no region (e.g. 0%).",
                param="tax_rules",
            )
        built = cls(tuple(rules), seller)
        if seller is not None:
            built.check_home(seller)
        return built

    def check_home(self, seller: str) -> None:
        """No reverse-charge rule applies in the seller's own country (reverse charge is cross-border)."""
        for b2b in (False, True):
            chosen = self.choose(seller, None, b2b)
            if chosen.reverse_charge:
                i = self.rules.index(chosen)
                raise ConfigError(
                    f"tax_rules[{i}].country: reverse charge is cross-border, yet this rule would apply in "
                    f"tax_seller_country {seller}: give {seller} a rule of its own.",
                    param=f"tax_rules[{i}].country",
                )

    def choose(self, country: str, region: str | None, b2b: bool) -> Rule:
        """The one rule for a customer in `country` (and `region`); b2b: the profile has a tax id."""
        found = [r for r in self.rules if r.matches(country, region, b2b)]
        return max(found, key=lambda r: (r.specificity, r.customer != "any"))  # the fallback always matches

    def rule_for(self, profile: Mapping[str, Any]) -> Rule:
        """The rule for a billing profile (as `profile_snapshot` gives it)."""
        return self.choose(profile["country"], profile.get("region"), bool(profile.get("tax_id")))


def _rule_of(entry: TaxRule, where: str, seller: str | None) -> Rule:
    def bad(field: str, why: str) -> ConfigError:
        return ConfigError(f"{where}.{field}: {why}.", param=f"{where}.{field}")

    name = entry.name.strip()
    if not name or len(name) > 100:
        raise bad("name", "a rule needs a name of 1 to 100 characters")
    country = entry.country.strip()
    if country != "*":
        try:
            country = country_of(country)
        except ValueError as exc:
            raise bad("country", f"{exc} (or '*' for any country)") from None
    region = entry.region.strip() if entry.region is not None else None
    if region is not None and (not region or country == "*"):
        raise bad("region", "a region is a non-empty name within a rule's country (not with '*')")
    try:
        rate = rate_bp_of(entry.rate)
    except ValueError as exc:
        raise bad("rate", str(exc)) from None
    if entry.reverse_charge and entry.customer != "b2b":
        raise bad("customer", "a reverse-charge rule applies to b2b customers only")
    if entry.reverse_charge and seller is not None and country == seller:
        raise bad("country", "reverse charge is cross-border: not in tax_seller_country")
    return Rule(name, country, region, entry.customer, rate, entry.reverse_charge)


def check_tax_settings(settings: TaxSettings) -> None:
    TaxTable.of(settings)


def line_tax(net: int, rate_bp: int) -> int:
    """net × rate_bp / 10000, rounded half-up (away from zero), in integers only."""
    whole, rest = divmod(abs(net) * rate_bp, BP)
    if 2 * rest >= BP:
        whole += 1
    return -whole if net < 0 else whole


@dataclass(frozen=True)
class Taxed:
    """A document's tax: per line (net, tax, gross) and the totals, sums of the rounded lines."""

    rule: Rule
    lines: tuple[tuple[int, int, int], ...]

    @property
    def net(self) -> int:
        return sum(line[0] for line in self.lines)

    @property
    def tax(self) -> int:
        return sum(line[1] for line in self.lines)

    @property
    def gross(self) -> int:
        return sum(line[2] for line in self.lines)

    def view(self) -> dict[str, Any]:
        return {
            "lines": [{"net": n, "tax": t, "gross": g} for n, t, g in self.lines],
            "net": self.net,
            "tax": self.tax,
            "gross": self.gross,
            **tax_snapshot(self.rule),
        }


def compute(rule: Rule, nets: Sequence[int]) -> Taxed:
    """The tax of lines of `nets` (integer minor units) under `rule`."""
    lines = []
    for net in nets:
        if isinstance(net, bool) or not isinstance(net, int):
            raise TypeError("a line's net is an integer amount in minor units")
        tax = 0 if rule.reverse_charge else line_tax(net, rule.rate_bp)
        lines.append((net, tax, net + tax))
    return Taxed(rule, tuple(lines))


def included_tax(gross: int, rate_bp: int) -> int:
    """The tax inside a tax-inclusive `gross`: gross × rate_bp / (10000 + rate_bp), rounded half-up (away
    from zero), in integers only; the net is what is left (gross - tax)."""
    whole, rest = divmod(abs(gross) * rate_bp, BP + rate_bp)
    if 2 * rest >= BP + rate_bp:
        whole += 1
    return -whole if gross < 0 else whole


def compute_inclusive(rule: Rule, grosses: Sequence[int]) -> Taxed:
    """The tax of lines whose amounts already include it (what a customer paid: a receipt, a credit note
    of money given back): one rounding step per line, the tax; the net is the rest."""
    lines = []
    for gross in grosses:
        if isinstance(gross, bool) or not isinstance(gross, int):
            raise TypeError("a line's gross is an integer amount in minor units")
        tax = 0 if rule.reverse_charge else included_tax(gross, rule.rate_bp)
        lines.append((gross - tax, tax, gross))
    return Taxed(rule, tuple(lines))


def rule_of_snapshot(snapshot: Mapping[str, Any]) -> Rule:
    """The rule a document was taxed by, from its snapshot (a credit note follows its document's rule,
    whatever the table says now)."""
    return Rule(
        name=snapshot["tax_rule"],
        country=snapshot["tax_country"],
        region=snapshot["tax_region"],
        customer=snapshot["tax_customer"],
        rate_bp=snapshot["tax_rate_bp"],
        reverse_charge=snapshot["reverse_charge"],
    )


def tax_snapshot(rule: Rule) -> dict[str, Any]:
    """What a document stores at issue time of the rule it was taxed by (a value: later setting changes
    never alter it)."""
    return {
        "tax_rule": rule.name,
        "tax_rate_bp": rule.rate_bp,
        "tax_rate": percent_of(rule.rate_bp),
        "reverse_charge": rule.reverse_charge,
        "tax_country": rule.country,
        "tax_region": rule.region,
        "tax_customer": rule.customer,
    }
