"""What credits cost: a package's price (credits × credit_price in the currency's minor unit, exact), the
credits a custom amount buys, the settings check at startup, and GET /v1/credits/packages."""

from __future__ import annotations

from decimal import Decimal

import pytest

from sidecar.config import load_settings
from sidecar.errors import BadRequest, ConfigError
from sidecar.payments.packages import credits_for, minor_digits, price_minor, purchase_of
from sidecar.payments.settings import PackageConfig, PaymentSettings

from .conftest import Sidecar

C = 1_000_000


def test_minor_units_follow_the_currency() -> None:
    assert (minor_digits("usd"), minor_digits("JPY"), minor_digits("kwd"), minor_digits("eur")) == (
        2,
        0,
        3,
        2,
    )
    assert price_minor(1000 * C, Decimal("0.01"), "usd") == 1000  # $10.00
    assert price_minor(1000 * C, Decimal("1"), "jpy") == 1000  # ¥1,000
    assert price_minor(1000 * C, Decimal("0.015"), "kwd") == 15000
    assert price_minor(1 * C, Decimal("0.001"), "usd") is None  # a tenth of a cent
    assert price_minor(1000 * C, Decimal("0.0001"), "jpy") is None


def test_an_amount_buys_exact_micro_credits() -> None:
    assert credits_for(1000, Decimal("0.01"), "usd") == 1000 * C
    assert credits_for(1, Decimal("0.03"), "usd") is None  # 1/3 credit
    assert credits_for(7, Decimal("0.08"), "usd") == 875_000  # 0.875 credits, exact


def test_a_package_that_is_not_a_whole_price_names_its_credits() -> None:
    env = {"CREDITGATE_PACKAGES": '{"odd": {"credits": "1.5"}}', "CREDITGATE_CREDIT_PRICE": "0.001"}
    with pytest.raises(ConfigError) as err:
        load_settings(environ=env)
    assert err.value.param == "packages.odd.credits"
    env["CREDITGATE_PACKAGES"] = '{"odd": {"credits": "1.5", "price_minor": 1}}'  # its own price: fine
    assert load_settings(environ=env).packages["odd"].price_minor == 1
    for bad in ("-1", "0", "abc", "1.0000001", "NaN"):
        with pytest.raises(ConfigError) as err:
            load_settings(environ={"CREDITGATE_PACKAGES": f'{{"p": {{"credits": "{bad}"}}}}'})
        assert err.value.param == "packages.p.credits", bad
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"CREDITGATE_CREDIT_PRICE": "0"})
    assert err.value.param == "credit_price"
    with pytest.raises(ConfigError) as err:
        load_settings(environ={"CREDITGATE_TOP_UP_AMOUNTS": "100"})  # below top_up_min_minor
    assert err.value.param == "top_up_amounts"


def test_a_purchase_is_a_package_or_an_amount_in_range() -> None:
    s = PaymentSettings(packages={"pro": PackageConfig(credits="5000", name="Pro")})
    pro = purchase_of(s, "pro", None)
    assert (pro.package, pro.credits, pro.amount_minor, pro.name) == ("pro", 5000 * C, 5000, "Pro")
    custom = purchase_of(s, None, 2500)
    assert (custom.package, custom.credits, custom.amount_minor) == (None, 2500 * C, 2500)
    cases = [("nope", None, "package"), (None, None, "package"), ("pro", 500, "package"),
             (None, 499, "amount"), (None, 1_000_001, "amount")]  # fmt: skip
    for package, amount, param in cases:
        with pytest.raises(BadRequest) as err:
            purchase_of(s, package, amount)
        assert err.value.param == param
    thirds = PaymentSettings(credit_price="0.03")
    with pytest.raises(BadRequest) as err:
        purchase_of(thirds, None, 1000)  # 33333.33… credits
    assert err.value.param == "amount"


async def test_the_packages_route_lists_packages_and_tiers(sidecar: Sidecar) -> None:
    _, key = await sidecar.account(0)
    assert (await sidecar.client.get("/v1/credits/packages")).status == 401
    resp = await sidecar.client.get("/v1/credits/packages", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    body = await resp.json()
    assert body["currency"] == "usd"
    assert body["credit_price"] == "0.01"
    assert body["packages"][0] == {
        "id": "starter", "name": "Starter", "credits": "1000", "credits_micro": 1000 * C,
        "price_minor": 1000, "currency": "usd",
    }  # fmt: skip
    assert [p["id"] for p in body["packages"]] == ["starter", "pro", "enterprise"]
    assert body["top_up_amounts"] == [1000, 5000, 10000, 50000]
    assert (body["top_up_min_minor"], body["top_up_max_minor"]) == (500, 1_000_000)
