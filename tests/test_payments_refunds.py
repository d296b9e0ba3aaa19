"""Operator refunds (POST /admin/orders/{id}/refund): unused credits of a paid Stripe order's own grant
taken back once per Idempotency-Key, then their share of the price refunded through the fake Stripe;
the charge.refunded webhook that follows takes nothing more."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from sidecar.errors import BadRequest, Conflict
from sidecar.payments.landing import PAYMENTS
from sidecar.payments.orders import Order
from sidecar.payments.refunds import refundable

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory, clean_env
from .support import creditgate
from .support_stripe import STRIPE_KEY, FakeStripe, event, post_event, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture

C = 1_000_000
PAID = dt.datetime(2027, 1, 15, 8, 0, tzinfo=dt.UTC)


def an_order(**changes: Any) -> Order:
    fields: dict[str, Any] = {
        "order_id": "ord_1", "account": "acct_1", "provider": "stripe", "status": "paid",
        "package": "starter", "credits": 1000 * C, "amount_minor": 1000, "currency": "usd",
        "provider_ref": "cs_1", "payment_ref": "pi_1", "refunded_credits": 0, "refunded_minor": 0,
        "created_at": PAID, "paid_at": PAID,
    }  # fmt: skip
    return Order(**{**fields, **changes})


def test_what_an_operator_may_refund() -> None:
    day = dt.timedelta(days=1)
    assert refundable(an_order(), None, now=PAID + 30 * day, window_days=30) == 1000 * C
    assert refundable(an_order(refunded_credits=400 * C), None, now=PAID, window_days=30) == 600 * C
    assert refundable(an_order(), 5 * C, now=PAID, window_days=30) == 5 * C
    with pytest.raises(Conflict, match="refund_window_days"):
        refundable(an_order(), None, now=PAID + 30 * day + dt.timedelta(seconds=1), window_days=30)
    with pytest.raises(BadRequest) as err:
        refundable(an_order(refunded_credits=400 * C), 601 * C, now=PAID, window_days=30)
    assert err.value.param == "credits"
    for other in (
        an_order(provider="x402"),
        an_order(status="pending", paid_at=None),
        an_order(payment_ref=None),
        an_order(refunded_credits=1000 * C),
    ):
        with pytest.raises(Conflict):
            refundable(other, None, now=PAID, window_days=30)


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Sidecar:
    return await make_sidecar(**stripe_settings(fake_stripe))


async def bought(sc: Sidecar, fake: FakeStripe) -> tuple[str, str, str]:
    """An account that bought the starter package through checkout and the webhook: (account, order id,
    payment intent)."""
    account, key = await sc.account(0)
    resp = await sc.client.post(
        "/v1/credits/checkout", json={"package": "starter"}, headers={"Authorization": f"Bearer {key}"}
    )
    body = await resp.json()
    session = fake.pay(body["session_id"])
    status, done = await post_event(sc.client, event("checkout.session.completed", session))
    assert (status, done["outcome"]) == (200, "landed")
    return account, body["order_id"], session["payment_intent"]


async def refund(sc: Sidecar, order_id: str, key: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": key}
    resp = await sc.client.post(f"/admin/orders/{order_id}/refund", json=body or {}, headers=headers)
    return resp.status, await resp.json()


async def test_an_operator_refunds_the_unused_credits_once(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, order_id, pi = await bought(shop, fake_stripe)
    await shop.admin("POST", f"/accounts/{account}/grants", {"credits": "50", "kind": "promotion"},
                     **{"Idempotency-Key": "promo"})  # fmt: skip
    await shop.balances.debit(account, "usage-like", 300 * C, grant_id=order_id)  # 300 of it spent
    for _ in range(3):
        status, body = await refund(shop, order_id, "k1")
        assert status == 200, body
        assert (body["credits"], body["amount_minor"], body["currency"]) == ("700", 700, "usd")
    assert body["refund_id"].startswith("re_")
    creates = [c for c in fake_stripe.calls if c.method == "POST" and c.path == "/v1/refunds"]
    assert len(creates) == 1  # the retries did nothing more
    (call,) = creates
    reversal_id = f"operator:{order_id}:k1"
    assert (call.form["payment_intent"], call.form["amount"]) == (pi, "700")
    assert call.form["metadata"]["reversal_id"] == reversal_id
    assert call.headers["Idempotency-Key"] == reversal_id
    assert (await shop.balance(account))["balance"] == 50 * C  # the promotion stays
    orders = shop.client.app[PAYMENTS].orders
    row = await orders.pool.fetchrow(
        "SELECT status, taken, amount_minor, provider_ref FROM payment_reversals WHERE reversal_id = $1",
        reversal_id,
    )
    assert row is not None
    assert tuple(row) == ("refunded", 700 * C, 700, body["refund_id"])
    order = await orders.get(order_id)
    assert order is not None
    assert (order.refunded_credits, order.refunded_minor) == (700 * C, 700)
    # Stripe's charge.refunded for that refund finds the reversal done: nothing taken twice
    _, done = await post_event(shop.client, event("charge.refunded", fake_stripe.charge(pi)))
    assert done["outcome"] == "reversed"
    assert (await shop.balance(account))["balance"] == 50 * C
    assert await orders.pool.fetchval("SELECT count(*) FROM payment_reversals") == 1
    status, body = await refund(shop, order_id, "k2")  # nothing of the order is left
    assert status == 409, body
    assert STRIPE_KEY not in str(body)


async def test_a_partial_refund_and_its_limits(shop: Sidecar, fake_stripe: FakeStripe) -> None:
    account, order_id, _ = await bought(shop, fake_stripe)
    status, body = await refund(shop, order_id, "a", {"credits": "250.5"})
    assert (status, body["credits"], body["amount_minor"]) == (200, "250.5", 250)  # rounded down
    assert (await shop.balance(account))["balance"] == 749_500_000
    status, body = await refund(shop, order_id, "b", {"credits": "749.6"})
    assert (status, body["error"]["param"]) == (400, "credits")
    status, body = await refund(shop, order_id, "c", {"credits": "x"})
    assert (status, body["error"]["param"]) == (400, "credits")
    status, body = await refund(shop, order_id, "")
    assert (status, body["error"]["param"]) == (400, "Idempotency-Key")
    status, body = await refund(shop, "ord_nobody", "d")
    assert (status, body["error"]["param"]) == (404, "order_id")
    await shop.client.app[PAYMENTS].orders.pool.execute(
        "UPDATE payment_orders SET paid_at = now() - interval '31 days' WHERE order_id = $1", order_id
    )
    status, body = await refund(shop, order_id, "e")
    assert status == 409
    assert "refund_window_days" in body["error"]["message"]
    status, body = await refund(shop, order_id, "a")  # the first key's retry still answers
    assert (status, body["credits"]) == (200, "250.5")


async def test_a_failed_stripe_refund_is_finished_by_its_retry(
    shop: Sidecar, fake_stripe: FakeStripe
) -> None:
    account, order_id, _ = await bought(shop, fake_stripe)
    fake_stripe.fail_refunds = 1
    status, body = await refund(shop, order_id, "k")
    assert (status, body["error"]["code"]) == (502, "stripe_error")
    assert (await shop.balance(account))["balance"] == 0  # the credits are back out already
    status, body = await refund(shop, order_id, "k")
    assert (status, body["amount_minor"]) == (200, 1000)
    assert body["refund_id"].startswith("re_")
    assert (await shop.balance(account))["balance"] == 0


async def test_refunds_need_stripe_and_the_admin_token(sidecar: Sidecar) -> None:
    account = (await sidecar.admin("POST", "/accounts", {}))["id"]
    orders = sidecar.client.app[PAYMENTS].orders
    order = await orders.create(account, "stripe", credits=C, amount_minor=1, currency="usd")
    status, body = await refund(sidecar, order.order_id, "k")
    assert (status, body["error"]["param"]) == (503, "stripe_api_key")
    resp = await sidecar.client.post(f"/admin/orders/{order.order_id}/refund", json={})
    assert resp.status == 401


async def test_the_cli_refunds_an_order(shop: Sidecar, fake_stripe: FakeStripe, tmp_path: Path) -> None:
    account, order_id, _pi = await bought(shop, fake_stripe)
    s = shop.settings
    assert s.redis_url is not None
    assert s.database_url is not None
    env = clean_env(
        CREDITGATE_REDIS_URL=s.redis_url,
        CREDITGATE_DATABASE_URL=s.database_url,
        CREDITGATE_KEY_PREFIX=s.key_prefix,
        CREDITGATE_STRIPE_API_KEY=STRIPE_KEY,
        CREDITGATE_STRIPE_API_BASE=fake_stripe.url,
    )
    args = ("order", "refund", order_id, "--idempotency-key", "cli-1", "--credits", "100")
    for _ in range(2):  # in a thread: the fake Stripe answers on this loop meanwhile
        run = await asyncio.to_thread(creditgate, env, *args, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        done = json.loads(run.stdout)
        assert (done["credits"], done["amount_minor"]) == ("100", 100)
    assert STRIPE_KEY not in run.stdout + run.stderr
    assert len([c for c in fake_stripe.calls if c.path == "/v1/refunds"]) == 1
    assert (await shop.balance(account))["balance"] == 900 * C
    off = await asyncio.to_thread(
        creditgate, clean_env(**{**env, "CREDITGATE_STRIPE_API_KEY": ""}), *args, cwd=tmp_path
    )
    assert off.returncode == 1
    assert "stripe_api_key" in off.stdout + off.stderr
