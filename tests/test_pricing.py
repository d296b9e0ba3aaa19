"""Exact charges from the price table: plain tables, no servers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from sidecar.config import Settings
from sidecar.errors import BadRequest, ConfigError
from sidecar.money import MAX_MICRO
from sidecar.pricing import PriceTable, Usage, cost, estimate_prompt_tokens, worst_case
from sidecar.responses import status_of


def table(**models: dict[str, Any]) -> PriceTable:
    raw: dict[str, Any] = {"models": models}
    return PriceTable.from_settings(msgspec.convert(raw, Settings))


GPT = {"prompt": "0.0025", "completion": "0.01", "cached_prompt": "0.00125", "max_output_tokens": 1000}
TINY = {"prompt": "0.000001", "completion": "0.000003", "max_output_tokens": 10}
FEE = {"prompt": "0.001", "completion": "0.002", "request_fee": "0.0005", "max_output_tokens": 10}
PRICES = table(gpt=GPT, tiny=TINY, fee=FEE)


@pytest.mark.parametrize(
    ("model", "byok", "usage", "expected"),
    [
        # 1000 prompt tokens x 2.5 micro + 500 completion x 10 micro = 7500; pooled x 1.25 = 9375.
        ("gpt", False, Usage(1000, 500), 9375),
        ("gpt", True, Usage(1000, 500), 7500),
        # 400 of the 1000 prompt tokens cached at 1.25 micro: 600 x 2.5 + 400 x 1.25 + 5000 = 7000.
        ("gpt", True, Usage(1000, 500, cached_tokens=400), 7000),
        ("gpt", False, Usage(1000, 500, cached_tokens=400), 8750),
        # More cached than prompt tokens (a confused provider) counts as all cached, never negative.
        ("gpt", True, Usage(10, 0, cached_tokens=50), 13),
        # Rounding happens once, up: 1 token x 0.001 micro x 1.25 -> 1 micro-credit.
        ("tiny", False, Usage(1, 0), 1),
        ("tiny", True, Usage(1, 0), 1),
        # 999 x 0.001 + 1 x 0.003 = 1.002 -> 2; pooled 1.2525 -> 2.
        ("tiny", True, Usage(999, 1), 2),
        ("tiny", False, Usage(999, 1), 2),
        # Exactly 1000 tokens x 0.001 = 1: no rounding up of an exact amount.
        ("tiny", True, Usage(1000, 0), 1),
        # A model without a cached price charges cached tokens at the prompt price.
        ("tiny", True, Usage(2000, 0, cached_tokens=2000), 2),
        # Nothing used costs nothing (no fee configured).
        ("gpt", False, Usage(0, 0), 0),
        # The request fee (500 micro) is part of the base, and so is marked up.
        ("fee", True, Usage(0, 0), 500),
        ("fee", False, Usage(0, 0), 625),
        ("fee", False, Usage(100, 100), 1000),
    ],
)
def test_exact_charges(model: str, byok: bool, usage: Usage, expected: int) -> None:
    price = PRICES.resolve(model)
    charge = cost(price, usage, PRICES.byok if byok else PRICES.pooled)
    assert charge == expected
    assert type(charge) is int


def test_worst_case_counts_every_prompt_token_uncached_and_the_whole_output_budget() -> None:
    price = PRICES.resolve("gpt")
    # n = 4 choices of 250 tokens each: 1000 output tokens at 10 micro, 100 prompt tokens at 2.5.
    assert worst_case(price, 100, 4 * 250, PRICES.byok) == 250 + 10_000
    assert worst_case(price, 100, 4 * 250, PRICES.pooled) == 12_813  # 12812.5 rounded up
    assert worst_case(price, 0, 0, PRICES.pooled) == 0


@pytest.mark.parametrize(("size", "per_token", "expected"), [(0, 1, 0), (1, 1, 1), (10, 3, 4), (12, 3, 4)])
def test_prompt_estimate(size: int, per_token: int, expected: int) -> None:
    assert estimate_prompt_tokens(size, per_token) == expected


def test_huge_amounts_stay_exact_integers() -> None:
    price = PRICES.resolve("gpt")
    charge = cost(price, Usage(10**9, 10**9), PRICES.pooled)
    assert charge == (10**9 * 25 // 10 + 10**9 * 10) * 5 // 4
    assert charge < MAX_MICRO


def test_configurable_multipliers() -> None:
    raw: dict[str, Any] = {"models": {"m": TINY}, "pooled_multiplier": "2", "byok_multiplier": "1.1"}
    prices = PriceTable.from_settings(msgspec.convert(raw, Settings))
    price = prices.resolve("m")
    assert cost(price, Usage(1000, 0), prices.pooled) == 2
    assert cost(price, Usage(10_000, 0), prices.byok) == 11


def test_aliases_resolve_and_unknown_models_are_400() -> None:
    prices = table(gpt={**GPT, "aliases": ["gpt-latest"]})
    assert prices.resolve("gpt-latest") is prices.resolve("gpt")
    with pytest.raises(BadRequest) as caught:
        prices.resolve("free-lunch")
    assert caught.value.param == "model"
    assert status_of(caught.value) == 400


@pytest.mark.parametrize(
    ("models", "setting"),
    [
        ({"m": {"prompt": "abc"}}, "models.m.prompt"),
        ({"m": {"prompt": "-1"}}, "models.m.prompt"),
        ({"m": {"prompt": "NaN"}}, "models.m.prompt"),
        ({"m": {"prompt": "1", "completion": "Infinity"}}, "models.m.completion"),
        ({"m": {"prompt": "1", "cached_prompt": "x"}}, "models.m.cached_prompt"),
        ({"m": {"prompt": "1", "request_fee": "-0.5"}}, "models.m.request_fee"),
        ({"m": {"prompt": "1", "aliases": ["n"]}, "n": {"prompt": "1"}}, "models.m.aliases"),
    ],
)
def test_bad_prices_name_the_setting(models: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        table(**models)
    assert caught.value.param == setting
    assert setting in caught.value.message


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_bad_multiplier_names_the_setting(value: str) -> None:
    raw: dict[str, Any] = {"models": {"m": TINY}, "pooled_multiplier": value}
    with pytest.raises(ConfigError) as caught:
        PriceTable.from_settings(msgspec.convert(raw, Settings))
    assert caught.value.param == "pooled_multiplier"
