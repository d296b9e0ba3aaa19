"""POST /v1/credits/checkout against a fake Stripe through the real `stripe` library: a pending order and a
Checkout Session made once per order; nothing credited until the signed webhook, never by the redirect."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from sidecar.payments.landing import PAYMENTS

from .conftest import Sidecar, SidecarFactory
from .support_stripe import STRIPE_KEY, WEBHOOK_SECRET, FakeStripe, event, post_event, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture

C = 1_000_000


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    return await make_sidecar(**stripe_settings(fake_stripe))


async def buy(sc: Sidecar, key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = await sc.client.post("/v1/credits/checkout", json=body, headers={"Authorization": f"Bearer {key}"})
    return resp.status, await resp.json()


async def test_a_package_checkout_makes_an_order_and_a_session(
    shop: Sidecar, fake_stripe: FakeStripe, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account, key = await shop.account(0)
    status, body = await buy(shop, key, {"package": "pro"})
    assert status == 201, body
    assert (body["credits"], body["credits_micro"], body["amount_minor"], body["currency"]) == (
        "5000",
        5000 * C,
        5000,
        "usd",
    )
    session = fake_stripe.sessions[body["session_id"]]
    assert body["url"] == session["url"]
    (call,) = fake_stripe.calls
    assert call.headers["Idempotency-Key"] == body["order_id"]
    form = call.form
    assert (form["mode"], form["client_reference_id"]) == ("payment", body["order_id"])
    assert form["metadata"]["order_id"] == body["order_id"]
    item = form["line_items"]["0"]
    assert item["price_data"]["currency"] == "usd"
    assert (item["price_data"]["unit_amount"], item["quantity"]) == ("5000", "1")
    assert item["price_data"]["product_data"]["name"] == "Pro"
    assert form["success_url"] == shop.settings.checkout_success_url
    order = await shop.client.app[PAYMENTS].orders.get(body["order_id"])
    assert order is not None
    assert (order.account, order.provider, order.status, order.package) == (
        account,
        "stripe",
        "pending",
        "pro",
    )
    assert (order.provider_ref, order.credits, order.amount_minor) == (body["session_id"], 5000 * C, 5000)
    assert STRIPE_KEY not in caplog.text
    assert STRIPE_KEY not in str(body)


async def test_an_amount_checkout_buys_its_exact_credits(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    _, key = await shop.account(0)
    status, body = await buy(shop, key, {"amount": 1234})
    assert status == 201, body
    assert (body["credits"], body["amount_minor"]) == ("1234", 1234)
    assert fake_stripe.calls[-1].form["line_items"]["0"]["price_data"]["unit_amount"] == "1234"
    bad_bodies: list[tuple[dict[str, Any], str]] = [
        ({"amount": 499}, "amount"),
        ({"amount": 2_000_000}, "amount"),
        ({"package": "gold"}, "package"),
        ({}, "package"),
        ({"package": "pro", "amount": 1000}, "package"),
    ]
    for bad, param in bad_bodies:
        status, err = await buy(shop, key, bad)
        assert (status, err["error"]["param"]) == (400, param), bad
    assert len(fake_stripe.calls) == 1  # nothing made for the refused ones
    status, _ = await buy(shop, "sk-not-a-key", {"package": "pro"})
    assert status == 401


async def test_checkout_off_without_a_stripe_key_names_it(sidecar: Sidecar) -> None:
    _, key = await sidecar.account(0)
    status, body = await buy(sidecar, key, {"package": "pro"})
    assert status == 503
    assert (body["error"]["param"], body["error"]["code"]) == ("stripe_api_key", "checkout_disabled")


async def test_stripe_refusing_is_a_502_without_secrets(
    make_sidecar: SidecarFactory, fake_stripe: FakeStripe
) -> None:
    shop = await make_sidecar(**stripe_settings(fake_stripe, stripe_api_key="sk_test_wrong_key_shh"))
    _, key = await shop.account(0)
    status, body = await buy(shop, key, {"package": "pro"})
    assert (status, body["error"]["code"]) == (502, "stripe_error")
    assert "sk_test_wrong_key_shh" not in str(body)


async def test_only_the_webhook_credits_never_the_success_redirect(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, key = await shop.account(0)
    _, body = await buy(shop, key, {"package": "starter"})
    session = fake_stripe.pay(body["session_id"])
    # the customer's browser comes back to the success URL (with the session id, as Stripe can add it)
    back = await shop.client.get(f"/portal?checkout=success&session_id={body['session_id']}")
    assert (back.status, back.url.path) == (200, "/portal/sign-in")  # the portal, signed out: no credit
    await shop.client.get(
        f"/v1/credits/summary?session_id={body['session_id']}", headers={"Authorization": f"Bearer {key}"}
    )
    assert (await shop.balance(account))["balance"] == 0
    order = await shop.client.app[PAYMENTS].orders.get(body["order_id"])
    assert order is not None
    assert order.status == "pending"
    status, done = await post_event(shop.client, event("checkout.session.completed", session))
    assert (status, done["outcome"]) == (200, "landed")
    assert (await shop.balance(account))["balance"] == 1000 * C
    assert WEBHOOK_SECRET not in str(done)
