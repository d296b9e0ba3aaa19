"""Tax, pure and table-driven: the rule chosen for every rule of the default table and of an example EU
table (most specific wins; b2b needs a tax id; an unknown country falls to "*"; regions match), the one
rounding step per line (half-up, .5 cases), totals as sums of rounded lines, zero lines, reverse charge,
the exact rate strings, and settings errors that name the offending entry."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.config import load_settings
from sidecar.documents.tax import TaxTable, compute, line_tax, rate_bp_of, tax_snapshot
from sidecar.documents.tax_settings import TaxRule, default_tax_rules
from sidecar.errors import ConfigError

EXAMPLE: list[dict[str, Any]] = [
    {"name": "no-tax", "country": "*", "rate": 0},
    {"name": "fr-vat", "country": "FR", "rate": "20.00"},
    {"name": "de-vat", "country": "DE", "rate": 1900},
    {"name": "de-b2b-reverse", "country": "DE", "customer": "b2b", "rate": 1900, "reverse_charge": True},
    {"name": "us-ca-sales", "country": "US", "region": "CA", "rate": "7.25"},
    {"name": "us-none", "country": "US", "rate": 0},
    {"name": "abroad-b2b-reverse", "country": "*", "customer": "b2b", "rate": 0, "reverse_charge": True},
]


def table(rules: list[dict[str, Any]], seller: str | None = "FR") -> TaxTable:
    settings = load_settings(
        environ={
            "CREDITGATE_TAX_RULES": json.dumps(rules),
            **({"CREDITGATE_TAX_SELLER_COUNTRY": seller} if seller else {}),
        }
    )
    return TaxTable.of(settings)


def test_every_default_rule_is_chosen_where_it_applies() -> None:
    defaults = TaxTable.from_rules(default_tax_rules())
    assert [r.name for r in defaults.rules] == ["no-tax"]  # the default: no tax anywhere
    for rule in defaults.rules:
        for country, b2b in (("FR", False), ("US", True), ("JP", False)):
            chosen = defaults.choose(country, None, b2b)
            assert chosen == rule
            assert compute(chosen, [1000, 1]).view()["tax"] == 0


@pytest.mark.parametrize(
    ("country", "region", "b2b", "expected"),
    [
        ("JP", None, False, "no-tax"),  # an unknown country falls to "*"
        ("FR", None, False, "fr-vat"),
        ("FR", None, True, "fr-vat"),  # a country rule beats "*" b2b
        ("DE", None, False, "de-vat"),
        ("DE", None, True, "de-b2b-reverse"),  # b2b over any within a country
        ("US", "CA", False, "us-ca-sales"),  # country + region beats country
        ("US", " ca ", True, "us-ca-sales"),  # regions match trimmed, case-insensitively
        ("US", "NY", False, "us-none"),
        ("US", None, False, "us-none"),
        ("JP", None, True, "abroad-b2b-reverse"),
        ("JP", "CA", False, "no-tax"),  # a region only counts within its rule's country
    ],
)
def test_most_specific_rule_wins(country: str, region: str | None, b2b: bool, expected: str) -> None:
    assert table(EXAMPLE).choose(country, region, b2b).name == expected


def test_every_example_rule_is_reachable() -> None:
    """The cases above choose each rule of the example table at least once."""
    t = table(EXAMPLE)
    reached = {
        t.choose(c, r, b).name
        for c, r, b in [
            ("JP", None, False),
            ("FR", None, False),
            ("DE", None, False),
            ("DE", None, True),
            ("US", "CA", False),
            ("US", None, False),
            ("JP", None, True),
        ]
    }
    assert reached == {r["name"] for r in EXAMPLE}


def test_a_profile_is_b2b_when_it_has_a_tax_id() -> None:
    t = table(EXAMPLE)
    assert t.rule_for({"country": "DE", "region": None, "tax_id": "DE123456789"}).name == "de-b2b-reverse"
    assert t.rule_for({"country": "DE", "region": None, "tax_id": None}).name == "de-vat"


@pytest.mark.parametrize(
    ("net", "rate_bp", "tax"),
    [
        (1000, 2000, 200),
        (25, 2000, 5),
        (1, 5000, 1),  # 0.5 → 1 (half-up)
        (3, 5000, 2),  # 1.5 → 2
        (2, 2500, 1),  # 0.5 → 1
        (1, 4999, 0),  # 0.4999 → 0
        (15_000, 1, 2),  # 1.5 → 2
        (14_999, 1, 1),  # 1.4999 → 1
        (-1, 5000, -1),  # a half goes away from zero on a credit line too
        (-3, 5000, -2),
        (0, 2000, 0),
        (999, 0, 0),
        (123, 10_000, 123),
        (10**15 + 1, 1900, 190_000_000_000_000),  # big amounts stay exact (0.19 → 0)
    ],
)
def test_line_tax_rounds_half_up_once(net: int, rate_bp: int, tax: int) -> None:
    assert line_tax(net, rate_bp) == tax


def test_totals_are_sums_of_rounded_lines() -> None:
    half = table([{"name": "no-tax", "rate": 0}, {"name": "half", "country": "FR", "rate": 5000}]).choose(
        "FR", None, False
    )
    taxed = compute(half, [1, 1, 1])
    assert [line["tax"] for line in taxed.view()["lines"]] == [1, 1, 1]
    assert (taxed.net, taxed.tax, taxed.gross) == (3, 3, 6)  # not round(1.5) = 2 on the total


def test_zero_lines() -> None:
    view = compute(table(EXAMPLE).choose("FR", None, False), []).view()
    assert (view["lines"], view["net"], view["tax"], view["gross"]) == ([], 0, 0, 0)


def test_reverse_charge_taxes_nothing_and_names_the_rule() -> None:
    view = compute(table(EXAMPLE).choose("DE", None, True), [10_000, 333]).view()
    assert [line["tax"] for line in view["lines"]] == [0, 0]
    assert (view["gross"], view["tax_rule"], view["reverse_charge"]) == (10_333, "de-b2b-reverse", True)
    assert view["tax_rate_bp"] == 1900  # the rate is named (the customer accounts for it); none is charged


def test_fr_vat_lines() -> None:
    view = compute(table(EXAMPLE).choose("FR", None, False), [1999, 2, 0]).view()
    assert view["lines"] == [
        {"net": 1999, "tax": 400, "gross": 2399},
        {"net": 2, "tax": 0, "gross": 2},
        {"net": 0, "tax": 0, "gross": 0},
    ]
    assert (view["tax"], view["tax_rate"], view["tax_rate_bp"]) == (400, "20.00", 2000)


def test_tax_snapshot_is_a_value() -> None:
    rule = table(EXAMPLE).choose("US", "CA", False)
    snap = tax_snapshot(rule)
    assert snap == {
        "tax_rule": "us-ca-sales",
        "tax_rate_bp": 725,
        "tax_rate": "7.25",
        "reverse_charge": False,
        "tax_country": "US",
        "tax_region": "CA",
        "tax_customer": "any",
    }
    again = tax_snapshot(rule)
    assert snap is not again
    assert snap == again


@pytest.mark.parametrize(
    ("raw", "bp"),
    [("20.00", 2000), ("20", 2000), ("7.5", 750), ("0.01", 1), (" 100 ", 10_000), (2000, 2000), (0, 0)],
)
def test_rates(raw: int | str, bp: int) -> None:
    assert rate_bp_of(raw) == bp


@pytest.mark.parametrize("raw", ["7.125", "-1", "100.01", "101", 10_001, -1, True, "abc", "20,00", ""])
def test_bad_rates(raw: Any) -> None:
    with pytest.raises(ValueError, match=r"rate|percent"):
        rate_bp_of(raw)


FALLBACK: dict[str, Any] = {"name": "no-tax", "rate": 0}


@pytest.mark.parametrize(
    ("rules", "seller", "param"),
    [
        (
            [
                FALLBACK,
                {"name": "a", "country": "FR", "rate": 1},
                {"name": "b", "country": "DE", "rate": "7.125"},
            ],
            None,
            "tax_rules[2].rate",
        ),
        ([FALLBACK, {"name": "a", "country": "XX", "rate": 1}], None, "tax_rules[1].country"),
        ([FALLBACK, {"name": "a", "region": "CA", "rate": 1}], None, "tax_rules[1].region"),
        ([FALLBACK, {"name": "a", "country": "US", "region": " ", "rate": 1}], None, "tax_rules[1].region"),
        ([FALLBACK, {"name": " ", "country": "US", "rate": 1}], None, "tax_rules[1].name"),
        ([FALLBACK, {"name": "no-tax", "country": "US", "rate": 1}], None, "tax_rules[1].name"),
        (
            [FALLBACK, {"name": "a", "country": "US", "rate": 1}, {"name": "b", "country": "us", "rate": 2}],
            None,
            "tax_rules[2]",
        ),
        ([{"name": "a", "country": "FR", "rate": 1}], None, "tax_rules"),  # no fallback
        ([], None, "tax_rules"),
        (
            [FALLBACK, {"name": "a", "country": "DE", "rate": 0, "reverse_charge": True}],
            None,
            "tax_rules[1].customer",
        ),
        (
            [FALLBACK, {"name": "a", "country": "FR", "customer": "b2b", "rate": 0, "reverse_charge": True}],
            "FR",
            "tax_rules[1].country",
        ),
        ([FALLBACK], "France", "tax_seller_country"),
        (
            [FALLBACK, {"name": "a", "customer": "b2b", "rate": 0, "reverse_charge": True}],
            "FR",
            "tax_rules[1].country",
        ),  # a "*" reverse charge that would apply at home
    ],
)
def test_settings_errors_name_the_entry(rules: list[dict[str, Any]], seller: str | None, param: str) -> None:
    with pytest.raises(ConfigError) as raised:
        table(rules, seller)
    assert raised.value.param == param
    assert param in raised.value.message


def test_a_rule_of_wrong_shape_is_refused_at_load() -> None:
    with pytest.raises(ConfigError) as raised:
        table([FALLBACK, {"name": "a", "rate": 1, "customer": "b2x"}])
    assert (raised.value.param or "").startswith("tax_rules")


def test_rules_in_yaml(tmp_path: Any) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "tax_seller_country: fr\ntax_rules:\n"
        "  - {name: none, rate: 0}\n  - {name: fr, country: FR, rate: '5.5'}\n"
    )
    t = TaxTable.of(load_settings(str(path), environ={}))
    assert (t.seller_country, t.choose("FR", None, False).rate_bp) == ("FR", 550)
    assert TaxRule(name="x", rate=1).country == "*"
