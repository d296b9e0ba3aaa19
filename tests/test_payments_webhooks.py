"""POST /webhooks/stripe and /webhooks/{name}: verified before parsed (a refused one is a counted 400 that
credits nothing), then applied once: a paid session lands its order's grant, refunds and disputes take
back their share, anything unknown is recorded and answered 200."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import pytest

from sidecar.payments.landing import PAYMENTS, Payments
from sidecar.payments.orders import Order

from .conftest import Sidecar, SidecarFactory
from .support import scrape, value
from .support_stripe import (
    OLD_SECRET,
    WEBHOOK_SECRET,
    FakeStripe,
    charge_of,
    event,
    post_event,
    sign,
    stripe_settings,
)
from .support_stripe import fake_stripe as fake_stripe  # the fixture

C = 1_000_000
ACME_SECRET = "acme-signing-secret-for-tests"


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    acme = {"acme": {"secrets": [ACME_SECRET], "header": "x-acme-signature"}}
    return await make_sidecar(**stripe_settings(fake_stripe, payment_webhooks=acme))


def payments(sc: Sidecar) -> Payments:
    return sc.client.app[PAYMENTS]


async def checkout(sc: Sidecar, package: str = "starter") -> tuple[str, dict[str, Any]]:
    """An account with a checked-out order: (account, the checkout's answer)."""
    account, key = await sc.account(0)
    resp = await sc.client.post(
        "/v1/credits/checkout", json={"package": package}, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 201
    return account, await resp.json()


async def order(sc: Sidecar, order_id: str) -> Order:
    found = await payments(sc).orders.get(order_id)
    assert found is not None
    return found


async def events_of(sc: Sidecar, order_id: str) -> list[tuple[str, str]]:
    rows = await payments(sc).orders.pool.fetch(
        "SELECT type, outcome FROM payment_events WHERE order_id = $1 ORDER BY received_at", order_id
    )
    return [(r["type"], r["outcome"]) for r in rows]


async def paid(sc: Sidecar, fake: FakeStripe) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A landed purchase of the starter package (1,000 credits for 1000 cents)."""
    account, bought = await checkout(sc)
    session = fake.pay(bought["session_id"])
    status, done = await post_event(sc.client, event("checkout.session.completed", session))
    assert (status, done["outcome"]) == (200, "landed")
    return account, bought, session


@pytest.mark.topologies
async def test_the_same_event_lands_once(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, bought = await checkout(shop)
    session = fake_stripe.pay(bought["session_id"])
    body = event("checkout.session.completed", session, "evt_once")
    outcomes = [(await post_event(shop.client, body))[1]["outcome"] for _ in range(100)]
    assert outcomes == ["landed"] + ["already_landed"] * 99
    together = await asyncio.gather(*(post_event(shop.client, body) for _ in range(20)))
    assert {status for status, _ in together} == {200}
    # the async-payment event of the same session, 20 at once, lands nothing more either
    other = event("checkout.session.async_payment_succeeded", session)
    again = await asyncio.gather(*(post_event(shop.client, other) for _ in range(20)))
    assert {done["outcome"] for _, done in again} == {"already_landed"}
    assert (await shop.balance(account))["balance"] == 1000 * C
    landed = await order(shop, bought["order_id"])
    assert (landed.status, landed.payment_ref) == ("paid", session["payment_intent"])
    grants = await payments(shop).orders.pool.fetchval(
        "SELECT count(*) FROM ledger WHERE account_id = $1 AND kind = 'purchase'", account
    )
    assert grants == 1
    assert await events_of(shop, bought["order_id"]) == [
        ("checkout.session.completed", "landed"),
        ("checkout.session.async_payment_succeeded", "already_landed"),
    ]


async def test_a_new_concurrent_event_lands_once(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, bought = await checkout(shop)
    session = fake_stripe.pay(bought["session_id"])
    body = event("checkout.session.completed", session)
    together = await asyncio.gather(*(post_event(shop.client, body) for _ in range(20)))
    assert sorted(done["outcome"] for _, done in together) == ["already_landed"] * 19 + ["landed"]
    assert (await shop.balance(account))["balance"] == 1000 * C


async def test_an_async_payment_lands_when_it_succeeds(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, bought = await checkout(shop)
    session = fake_stripe.pay(bought["session_id"], status="unpaid")  # a bank debit, still under way
    _, done = await post_event(shop.client, event("checkout.session.completed", session))
    assert done["outcome"] == "awaiting_payment"
    assert (await shop.balance(account))["balance"] == 0
    session["payment_status"] = "paid"
    _, done = await post_event(shop.client, event("checkout.session.async_payment_succeeded", session))
    assert done["outcome"] == "landed"
    assert (await shop.balance(account))["balance"] == 1000 * C


async def test_a_session_that_is_not_the_orders_credits_nothing(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, bought = await checkout(shop)
    session = fake_stripe.pay(bought["session_id"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"amount_total": 1}, "amount_mismatch"),
        ({"currency": "eur"}, "amount_mismatch"),
        ({"id": "cs_test_other"}, "session_mismatch"),
        ({"client_reference_id": "ord_other"}, "order_mismatch"),
        ({"metadata": {"order_id": "ord_nobody"}, "client_reference_id": None}, "unknown_order"),
        ({"metadata": {}, "client_reference_id": None}, "unknown_order"),
    ]
    for change, outcome in cases:
        status, done = await post_event(
            shop.client, event("checkout.session.completed", {**session, **change})
        )
        assert (status, done["outcome"]) == (200, outcome), change
    assert (await shop.balance(account))["balance"] == 0
    assert (await order(shop, bought["order_id"])).status == "pending"
    status, done = await post_event(shop.client, event("customer.created", {"id": "cus_1"}))
    assert (status, done["outcome"]) == (200, "ignored")
    status, done = await post_event(
        shop.client, event("charge.refunded", {"id": "ch_x", "payment_intent": "pi_x"})
    )
    assert (status, done["outcome"]) == (200, "unknown_order")
    status, done = await post_event(shop.client, event("checkout.session.completed", {"no": "id"}))
    assert (status, done["error"]["param"]) == (400, "data.object")


async def test_an_expired_session_ends_its_order(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    _, bought = await checkout(shop)
    session = {**fake_stripe.sessions[bought["session_id"]], "status": "expired"}
    _, done = await post_event(shop.client, event("checkout.session.expired", session))
    assert done["outcome"] == "expired"
    assert (await order(shop, bought["order_id"])).status == "expired"
    _, done = await post_event(shop.client, event("checkout.session.expired", session))
    assert done["outcome"] == "expired_ignored"


async def test_refunds_and_disputes_take_back_their_share(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, bought, session = await paid(shop, fake_stripe)
    pi = session["payment_intent"]
    fake_stripe.refund_in_dashboard(pi, 250)  # a quarter of the price
    body = event("charge.refunded", fake_stripe.charge(pi))
    for _ in range(3):
        _, done = await post_event(shop.client, body)
        assert done["outcome"] == "reversed"
    assert (await shop.balance(account))["balance"] == 750 * C
    fake_stripe.refund_in_dashboard(pi, 100)  # a second refund; this event does not list them (newer API)
    _, done = await post_event(shop.client, event("charge.refunded", fake_stripe.charge(pi, listed=False)))
    assert done["outcome"] == "reversed"
    assert (await shop.balance(account))["balance"] == 650 * C
    assert any(c.path == "/v1/refunds" and c.method == "GET" for c in fake_stripe.calls)
    dispute = {
        "id": "dp_1",
        "object": "dispute",
        "amount": 1000,
        "charge": charge_of(pi),
        "payment_intent": pi,
    }
    for _ in range(2):
        _, done = await post_event(shop.client, event("charge.dispute.created", dispute))
        assert done["outcome"] == "reversed"
    assert (await shop.balance(account))["balance"] == 0  # what was left of the 1,000, once
    after = await order(shop, bought["order_id"])
    assert after.refunded_credits == 1000 * C
    reversals = await payments(shop).orders.pool.fetch(
        "SELECT reversal_id, reason, taken FROM payment_reversals ORDER BY created_at"
    )
    assert [(r["reason"], r["taken"]) for r in reversals] == [
        ("refund", 250 * C), ("refund", 100 * C), ("dispute", 650 * C)
    ]  # fmt: skip
    assert all(r["reversal_id"].startswith("stripe:") for r in reversals)
    # the merchant wins the dispute: what it took comes back, once; a lost one gives nothing
    lost = {**dispute, "id": "dp_0", "status": "lost"}
    _, done = await post_event(shop.client, event("charge.dispute.closed", lost))
    assert done["outcome"] == "dispute_lost"
    for _ in range(3):
        won = event("charge.dispute.closed", {**dispute, "status": "won"})
        assert (await post_event(shop.client, won))[1]["outcome"] == "restored"
    assert (await shop.balance(account))["balance"] == 650 * C


REASONS = {
    "tampered": "bad_signature",
    "wrong_secret": "bad_signature",
    "old": "too_old",
    "future": "in_future",
    "missing": "missing_header",
    "garbled": "malformed_header",
}


@pytest.mark.parametrize("signature", list(REASONS))
async def test_a_refused_signature_is_a_counted_400_that_credits_nothing(
    shop: Sidecar, fake_stripe: FakeStripe, signature: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    account, bought = await checkout(shop)
    body = event("checkout.session.completed", fake_stripe.pay(bought["session_id"]))
    now = int(time.time())
    headers = {
        "tampered": sign(body, at=now),
        "wrong_secret": sign(body, "whsec_not_ours", now),
        "old": sign(body, at=now - 400),
        "future": sign(body, at=now + 400),
        "missing": "",
        "garbled": "t=yesterday;v1",
    }
    sent = body if signature != "tampered" else body.replace(b'"amount_total":1000', b'"amount_total":100')
    assert signature != "tampered" or sent != body
    resp = await shop.client.post(
        "/webhooks/stripe",
        data=sent,
        headers={"Stripe-Signature": headers[signature]} if headers[signature] else {},
    )
    answer = await resp.text()
    assert resp.status == 400, answer
    assert '"code":"invalid_signature"' in answer.replace(" ", "")
    reason = REASONS[signature]
    metrics = await scrape(shop)
    assert value(metrics, "creditgate_webhook_rejections_total", provider="stripe", reason=reason) == 1
    assert (await shop.balance(account))["balance"] == 0
    assert await events_of(shop, bought["order_id"]) == []
    for secret in (WEBHOOK_SECRET, OLD_SECRET):
        assert secret not in answer
        assert secret not in caplog.text


async def test_the_rotated_out_secret_still_verifies(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    _account, bought = await checkout(shop)
    body = event("checkout.session.completed", fake_stripe.pay(bought["session_id"]))
    status, done = await post_event(shop.client, body, signature=sign(body, OLD_SECRET))
    assert (status, done["outcome"]) == (200, "landed")
    metrics = await scrape(shop)
    assert (
        value(metrics, "creditgate_webhook_rejections_total", provider="stripe", reason="bad_signature") == 0
    )


async def test_the_generic_webhook_lands_and_reverses(shop: Sidecar) -> None:
    account = (await shop.admin("POST", "/accounts", {}))["id"]
    made = {"credits": "400", "amount_minor": 4000, "provider": "acme"}  # the operator records the order
    created = await shop.admin("POST", f"/accounts/{account}/orders", made)
    nobody = await shop.client.post(
        f"/admin/accounts/{account}/orders",
        json={**made, "provider": "nobody"},
        headers=shop.admin_headers(),
    )
    assert nobody.status == 400
    assert (await nobody.json())["error"]["param"] == "provider"
    base = {
        "order_id": created["id"],
        "amount_minor": 4000,
        "currency": "usd",
        "payment_ref": "acme-pay-1",
    }

    async def send(body: dict[str, Any], secret: str = ACME_SECRET, name: str = "acme") -> tuple[int, Any]:
        raw = msgspec.json.encode(body)
        return await post_event(
            shop.client, raw, signature=sign(raw, secret), path=f"/webhooks/{name}", header="x-acme-signature"
        )

    assert (await send({"id": "a1", "type": "payment.succeeded", **base}, "wrong"))[0] == 400
    assert (await send({"id": "a1", "type": "payment.succeeded", **base, "amount_minor": 1}))[1][
        "outcome"
    ] == "amount_mismatch"
    for _ in range(3):
        status, _done = await send({"id": "a2", "type": "payment.succeeded", **base})
        assert status == 200
    assert (await shop.balance(account))["balance"] == 400 * C
    refund = {"id": "a3", "type": "payment.refunded", **base, "amount_minor": 1000, "refund_id": "r1"}
    for _ in range(2):
        assert (await send(refund))[1]["outcome"] == "reversed"
    assert (await shop.balance(account))["balance"] == 300 * C
    assert (await send({**refund, "refund_id": None}))[0] == 400
    assert (await send({"id": "a4", "type": "payment.pending", **base}))[1]["outcome"] == "ignored"
    assert (await send({"id": "a5", "type": "payment.succeeded", **base, "order_id": "ord_x"}))[1][
        "outcome"
    ] == "unknown_order"
    assert (await send({"id": "a6", "type": "payment.succeeded", **base}, name="nobody"))[0] == 404
    metrics = await scrape(shop)
    assert value(metrics, "creditgate_webhook_rejections_total", provider="acme", reason="bad_signature") == 1
