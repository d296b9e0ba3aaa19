"""Manual settlement over real HTTP, real Postgres and real Redis (one node and a cluster): an operator's
pending order, recorded paid once (a retry, or 20 at once, credit one purchase grant), refusals that
change nothing, and the CLI's `order` verbs run for real."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from sidecar.payments.orders import OrderStore

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory, clean_env, new_key_prefix
from .support import creditgate

pytestmark = pytest.mark.topologies
C = 1_000_000


async def call(sc: Sidecar, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await sc.client.request(method, f"/admin{path}", json=body, headers=sc.admin_headers())
    return resp.status, await resp.json()


async def purchase_grants(sc: Sidecar, account: str) -> list[tuple[str, int, str | None]]:
    rows = await sc.services.store.pool.fetch(
        "SELECT grant_id, amount, payment_ref FROM grants WHERE account_id = $1 AND kind = 'purchase'",
        account,
    )
    return [(r[0], r[1], r[2]) for r in rows]


async def order_count(sc: Sidecar) -> int:
    return int(await sc.services.store.pool.fetchval("SELECT count(*) FROM payment_orders"))


async def test_a_manual_order_is_paid_once(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    body = {"credits": "1200.5", "amount_minor": 1_200_50, "reference": "INV-1", "note": "wire"}
    status, order = await call(sidecar, "POST", f"/accounts/{account}/orders", body)
    assert status == 201, order
    assert (order["provider"], order["status"], order["credits"]) == ("manual", "pending", 1_200_500_000)
    assert (order["amount_minor"], order["currency"], order["reference"]) == (120_050, "usd", "INV-1")
    assert (await sidecar.balance(account))["balance"] == 0  # nothing is credited before it is paid
    assert await call(sidecar, "GET", f"/orders/{order['id']}") == (200, order)
    status, paid = await call(sidecar, "POST", f"/orders/{order['id']}/paid", {"payment_ref": "wire-77"})
    assert status == 200, paid
    assert (paid["kind"], paid["amount"], paid["credited"], paid["balance"]) == (
        "purchase",
        1_200_500_000,
        True,
        1_200_500_000,
    )
    assert (paid["order"]["status"], paid["order"]["payment_ref"]) == ("paid", "wire-77")
    assert paid["order"]["paid_at"] is not None
    assert await purchase_grants(sidecar, account) == [(order["id"], 1_200_500_000, "wire-77")]
    # A retry lands nothing more; another payment_ref for a paid order is refused.
    status, again = await call(sidecar, "POST", f"/orders/{order['id']}/paid", {"payment_ref": "wire-77"})
    assert (status, again["credited"], again["balance"]) == (200, False, 1_200_500_000)
    status, other = await call(sidecar, "POST", f"/orders/{order['id']}/paid", {"payment_ref": "wire-78"})
    assert (status, other["error"]["param"]) == (409, "payment_ref")
    assert await purchase_grants(sidecar, account) == [(order["id"], 1_200_500_000, "wire-77")]
    status, listed = await call(sidecar, "GET", f"/accounts/{account}/orders")
    assert status == 200
    assert [(o["id"], o["status"]) for o in listed["data"]] == [(order["id"], "paid")]


async def test_twenty_concurrent_payments_make_one_grant(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    _, order = await call(
        sidecar, "POST", f"/accounts/{account}/orders", {"credits": "10", "amount_minor": 1000}
    )
    done = await asyncio.gather(
        *(call(sidecar, "POST", f"/orders/{order['id']}/paid", {"payment_ref": "tx-1"}) for _ in range(20))
    )
    assert {status for status, _ in done} == {200}
    assert sum(body["credited"] for _, body in done) == 1
    assert await purchase_grants(sidecar, account) == [(order["id"], 10 * C, "tx-1")]
    assert (await sidecar.balance(account))["balance"] == 10 * C


async def test_a_package_order_and_a_reference_recorded_once(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    body = {"package": "pro", "amount_minor": 45_000, "currency": "EUR", "reference": "PO-9"}
    status, order = await call(sidecar, "POST", f"/accounts/{account}/orders", body)
    assert status == 201, order
    assert (order["package"], order["credits"], order["currency"]) == ("pro", 5000 * C, "eur")
    assert await call(sidecar, "POST", f"/accounts/{account}/orders", body) == (200, order)
    status, clash = await call(sidecar, "POST", f"/accounts/{account}/orders", {**body, "amount_minor": 1})
    assert (status, clash["error"]["param"]) == (409, "reference")
    other, _ = await sidecar.account(0)
    status, clash = await call(sidecar, "POST", f"/accounts/{other}/orders", body)
    assert (status, clash["error"]["param"]) == (409, "reference")
    assert await order_count(sidecar) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount_minor": 100}, "package"),
        ({"package": "pro", "credits": "1", "amount_minor": 100}, "package"),
        ({"package": "nope", "amount_minor": 100}, "package"),
        ({"credits": "lots", "amount_minor": 100}, "credits"),
        ({"credits": "0", "amount_minor": 100}, "amount"),
        ({"credits": "0.0000001", "amount_minor": 100}, "credits"),
        ({"credits": "1"}, "amount_minor"),
        ({"credits": "1", "amount_minor": -1}, "amount_minor"),
        ({"credits": "1", "amount_minor": "100"}, "amount_minor"),
        ({"credits": "1", "amount_minor": 100, "currency": "dollars"}, "currency"),
        ({"credits": "1", "amount_minor": 100, "reference": "nul\x00"}, "reference"),
        ({"credits": "1", "amount_minor": 100, "note": ""}, "note"),
        ({"credits": "1", "amount_minor": 100, "extra": 1}, "extra"),
    ],
)
async def test_a_bad_order_is_refused_naming_its_field(
    sidecar: Sidecar, body: dict[str, Any], param: str
) -> None:
    account, _ = await sidecar.account(0)
    status, refused = await call(sidecar, "POST", f"/accounts/{account}/orders", body)
    assert (status, refused["error"]["type"], refused["error"]["param"]) == (
        400,
        "invalid_request_error",
        param,
    )
    assert await order_count(sidecar) == 0


async def test_orders_of_no_account_and_no_order_are_404(sidecar: Sidecar) -> None:
    for path, body in (
        ("/accounts/nobody-here/orders", {"credits": "1", "amount_minor": 1}),
        ("/orders/ord_000000000000000000000000/paid", {"payment_ref": "x"}),
        ("/orders/bad%00id/paid", {"payment_ref": "x"}),
    ):
        status, refused = await call(sidecar, "POST", path, body)
        assert status == 404, (path, refused)
    for path in ("/accounts/nobody-here/orders", "/orders/ord_000000000000000000000000"):
        assert (await call(sidecar, "GET", path))[0] == 404
    assert await order_count(sidecar) == 0
    resp = await sidecar.client.post("/admin/orders/ord_x/paid", json={"payment_ref": "x"})
    assert resp.status == 401


async def test_orders_not_payable_by_hand_are_refused(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    store = OrderStore(sidecar.services.store.pool)
    for status in ("failed", "expired", "canceled"):
        order = await store.create(account, "manual", credits=C, amount_minor=100, currency="usd")
        assert await store.set_status(order.order_id, status)
        code, refused = await call(sidecar, "POST", f"/orders/{order.order_id}/paid", {"payment_ref": "x"})
        assert (code, refused["error"]["code"], refused["error"]["param"]) == (
            409,
            "order_not_payable",
            "order_id",
        )
    stripe = await store.create(account, "stripe", credits=C, amount_minor=100, currency="usd")
    code, refused = await call(sidecar, "POST", f"/orders/{stripe.order_id}/paid", {"payment_ref": "x"})
    assert (code, refused["error"]["code"]) == (409, "not_a_manual_order")
    code, refused = await call(sidecar, "POST", f"/orders/{stripe.order_id}/paid", {"payment_ref": ""})
    assert (code, refused["error"]["param"]) == (400, "payment_ref")
    assert await purchase_grants(sidecar, account) == []
    assert (await sidecar.balance(account))["balance"] == 0


async def test_a_referred_accounts_manual_payment_earns_the_bonus(sidecar: Sidecar) -> None:
    owner, _ = await sidecar.account(0)
    code = await sidecar.services.store.pool.fetchval(
        "SELECT code FROM referral_codes WHERE account_id = $1 LIMIT 1", owner
    )
    new = f"ref-{uuid.uuid4().hex[:8]}"
    await sidecar.admin("POST", "/accounts", {"id": new, "referral_code": code})
    orders = [
        (await call(sidecar, "POST", f"/accounts/{new}/orders", {"credits": "100", "amount_minor": 100}))[1]
        for _ in range(2)
    ]
    # Both first purchases at once, each recorded paid 10 times at once: one bonus.
    done = await asyncio.gather(
        *(
            call(sidecar, "POST", f"/orders/{o['id']}/paid", {"payment_ref": f"tx-{o['id']}"})
            for o in orders * 10
        )
    )
    assert {status for status, _ in done} == {200}
    bonus = await sidecar.services.store.pool.fetch(
        "SELECT grant_id, amount FROM grants WHERE account_id = $1 AND kind = 'bonus'", owner
    )
    assert [(r[0], r[1]) for r in bonus] == [(f"referral:{new}", 25 * C)]
    assert (await sidecar.balance(owner))["balance"] == 25 * C  # once, for the first purchase
    assert (await sidecar.balance(new))["balance"] == 200 * C


async def test_the_cli_records_an_order_and_its_payment(
    redis_url: str, database_url: str, make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    prefix = new_key_prefix()
    env = clean_env(
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=prefix,
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
    )

    async def cli(*args: str) -> tuple[int, Any]:
        done = await asyncio.to_thread(creditgate, env, *args, cwd=tmp_path)
        return done.returncode, json.loads(done.stdout if done.returncode == 0 else done.stderr)

    account = f"cli-{uuid.uuid4().hex[:8]}"
    assert (await cli("account", "create", account))[0] == 0
    code, order = await cli(
        "order", "create", account, "--credits", "12.5", "--amount-minor", "1250", "--reference", "PO-1"
    )
    assert code == 0, order
    assert (order["status"], order["credits"], order["created"]) == ("pending", 12_500_000, True)
    code, again = await cli(
        "order", "create", account, "--credits", "12.5", "--amount-minor", "1250", "--reference", "PO-1"
    )
    assert (code, again["id"], again["created"]) == (0, order["id"], False)
    code, paid = await cli("order", "paid", order["id"], "--payment-ref", "wire-1")
    assert (code, paid["credited"], paid["balance"], paid["order"]["status"]) == (0, True, 12_500_000, "paid")
    code, paid = await cli("order", "paid", order["id"], "--payment-ref", "wire-1")
    assert (code, paid["credited"], paid["balance"]) == (0, False, 12_500_000)
    code, shown = await cli("order", "show", order["id"])
    assert (code, shown["status"], shown["payment_ref"]) == (0, "paid", "wire-1")
    code, listed = await cli("order", "list", account)
    assert (code, [o["id"] for o in listed["data"]]) == (0, [order["id"]])
    code, refused = await cli("order", "create", account, "--package", "nope", "--amount-minor", "1")
    assert (code, refused["error"]["param"]) == (1, "package")
    # A sidecar on the same servers sees the purchase.
    sc = await make_sidecar(key_prefix=prefix)
    assert (await sc.balance(account))["balance"] == 12_500_000
    assert await purchase_grants(sc, account) == [(order["id"], 12_500_000, "wire-1")]
