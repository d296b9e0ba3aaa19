"""x402 (USDC) top-ups at POST /v1/credits/topup, against a fake facilitator over real HTTP, with real
Redis and Postgres: the 402 requirements (v1 body, v2 header), v1 and v2 payments landing once, refusals
by the facilitator, replays (one after the other and at once), payments that do not match, bad headers."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from sidecar.errors import BadRequest
from sidecar.payments.x402_topup import micro_credits

from .conftest import Sidecar, SidecarFactory
from .support_schemas import ADVISORY_WAITS
from .support_x402 import PAY_TO, PAYER, USDC, FakeFacilitator, decoded, payment_v1, payment_v2
from .support_x402 import facilitator as facilitator  # the fixture

C = 1_000_000  # one credit, in micro-credits
USD = 1_000_000  # one USDC, in atomic units: 100 credits at the default credit_price of 0.01


async def x402_sidecar(make_sidecar: SidecarFactory, fake: FakeFacilitator, **overrides: Any) -> Sidecar:
    settings = {"x402_facilitator_url": fake.url, "x402_pay_to": PAY_TO, **overrides}
    return await make_sidecar(**settings)


async def topup(sc: Sidecar, key: str, amount: Any, **headers: str) -> aiohttp.ClientResponse:
    return await sc.client.post(
        "/v1/credits/topup", json={"amount": amount}, headers={"Authorization": f"Bearer {key}", **headers}
    )


async def balance(sc: Sidecar, account: str) -> int:
    return int((await sc.balance(account))["balance"])


async def order_of(sc: Sidecar, account: str) -> Any:
    return await sc.services.store.pool.fetchrow(
        "SELECT status, credits, amount_minor, currency, payment_ref FROM payment_orders"
        " WHERE account_id = $1 AND provider = 'x402'",
        account,
    )


async def test_without_a_payment_it_answers_402_with_the_requirements(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    _, key = await sc.account(0)
    resp = await topup(sc, key, 5 * USD)
    assert resp.status == 402
    body = await resp.json()
    assert body["x402Version"] == 1
    assert "X-PAYMENT" in body["error"]
    [req] = body["accepts"]
    assert req == {
        "scheme": "exact", "network": "base-sepolia", "maxAmountRequired": "5000000",
        "resource": str(resp.url), "description": "creditgate credits top-up",
        "mimeType": "application/json", "payTo": PAY_TO, "maxTimeoutSeconds": 300, "asset": USDC,
        "extra": {"name": "USDC", "version": "2"},
    }  # fmt: skip
    v2 = decoded(resp.headers["PAYMENT-REQUIRED"])
    assert v2["x402Version"] == 2
    assert v2["resource"]["url"] == str(resp.url)
    assert v2["accepts"] == [
        {"scheme": "exact", "network": "eip155:84532", "amount": "5000000", "asset": USDC, "payTo": PAY_TO,
         "maxTimeoutSeconds": 300, "extra": {"name": "USDC", "version": "2"}}
    ]  # fmt: skip
    assert facilitator.verifies == 0


async def test_a_v1_payment_is_verified_settled_and_credited(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(3 * C)
    resp = await topup(sc, key, 2 * USD, **{"X-PAYMENT": payment_v1(2 * USD)})
    body = await resp.json()
    assert resp.status == 200, body
    assert (body["credits"], body["credited"], body["balance"]) == (200 * C, True, 203 * C)
    settled = decoded(resp.headers["PAYMENT-RESPONSE"])
    assert resp.headers["X-PAYMENT-RESPONSE"] == resp.headers["PAYMENT-RESPONSE"]
    assert settled["success"] is True
    assert settled["network"] == "base-sepolia"
    assert settled["payer"] == PAYER
    assert body["transaction"] == settled["transaction"]
    assert body["order"]["status"] == "paid"
    sent = facilitator.bodies[0]
    assert sent["x402Version"] == 1
    assert sent["paymentRequirements"]["maxAmountRequired"] == "2000000"
    assert sent["paymentPayload"] == decoded(payment_v1(2 * USD)) | {
        "payload": sent["paymentPayload"]["payload"]
    }
    assert await balance(sc, account) == 203 * C
    row = await order_of(sc, account)
    assert tuple(row) == ("paid", 200 * C, 2 * USD, "usdc", settled["transaction"])
    assert facilitator.settles == 1


async def test_a_v2_payment_is_credited_with_its_payment_response(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    resp = await topup(sc, key, USD, **{"PAYMENT-SIGNATURE": payment_v2(USD)})
    body = await resp.json()
    assert resp.status == 200, body
    assert "X-PAYMENT-RESPONSE" not in resp.headers
    settled = decoded(resp.headers["PAYMENT-RESPONSE"])
    assert settled["success"] is True
    assert settled["network"] == "eip155:84532"
    assert facilitator.bodies[0]["x402Version"] == 2
    assert facilitator.bodies[0]["paymentRequirements"]["amount"] == "1000000"
    assert await balance(sc, account) == 100 * C


async def test_a_failed_verify_is_a_402_with_its_reason_and_credits_nothing(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    facilitator.verify_reason = "insufficient_funds"
    resp = await topup(sc, key, USD, **{"X-PAYMENT": payment_v1(USD)})
    assert resp.status == 402
    body = await resp.json()
    assert "insufficient_funds" in body["error"]
    assert body["accepts"][0]["maxAmountRequired"] == "1000000"
    assert facilitator.settles == 0
    assert await balance(sc, account) == 0


async def test_a_failed_settle_fails_the_order_and_a_new_payment_still_works(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    facilitator.settle_reason = "invalid_transaction_state"
    header = payment_v1(USD)
    resp = await topup(sc, key, USD, **{"X-PAYMENT": header})
    assert resp.status == 402
    assert "invalid_transaction_state" in (await resp.json())["error"]
    failed = decoded(resp.headers["X-PAYMENT-RESPONSE"])
    assert failed["success"] is False
    assert failed["errorReason"] == "invalid_transaction_state"
    assert failed["transaction"] == ""
    assert (await order_of(sc, account))["status"] == "failed"
    facilitator.settle_reason = None
    again = await topup(sc, key, USD, **{"X-PAYMENT": header})  # the same, failed payment
    assert again.status == 402
    assert "new nonce" in (await again.json())["error"]
    assert facilitator.settles == 1
    assert await balance(sc, account) == 0
    fresh = await topup(sc, key, USD, **{"X-PAYMENT": payment_v1(USD)})
    assert fresh.status == 200
    assert await balance(sc, account) == 100 * C


async def test_a_replayed_payment_credits_once_and_answers_the_same(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    header = payment_v2(USD)
    first = await topup(sc, key, USD, **{"PAYMENT-SIGNATURE": header})
    second = await topup(sc, key, USD, **{"PAYMENT-SIGNATURE": header})
    one, two = await first.json(), await second.json()
    assert (first.status, second.status) == (200, 200)
    assert (one["credited"], two["credited"]) == (True, False)
    assert one["transaction"] == two["transaction"]
    assert one["order"]["id"] == two["order"]["id"]
    assert decoded(second.headers["PAYMENT-RESPONSE"])["transaction"] == one["transaction"]
    assert facilitator.settles == 1
    assert await balance(sc, account) == 100 * C


async def test_the_same_authorization_as_v1_and_as_v2_is_one_payment(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    nonce = "0x" + "22" * 32
    first = await topup(sc, key, USD, **{"X-PAYMENT": payment_v1(USD, nonce=nonce)})
    second = await topup(sc, key, USD, **{"PAYMENT-SIGNATURE": payment_v2(USD, nonce=nonce)})
    assert (first.status, second.status) == (200, 200)
    assert (await second.json())["credited"] is False
    assert facilitator.settles == 1
    assert await balance(sc, account) == 100 * C


async def test_the_same_payment_at_once_settles_and_credits_once(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    header = payment_v1(USD)
    facilitator.settle_gate = asyncio.Event()
    first = asyncio.ensure_future(topup(sc, key, USD, **{"X-PAYMENT": header}))
    await facilitator.settle_entered.wait()  # the first holds the order's lock, inside /settle
    others = [asyncio.ensure_future(topup(sc, key, USD, **{"X-PAYMENT": header})) for _ in range(6)]
    pool = sc.services.store.pool
    waiting = ADVISORY_WAITS
    for _ in range(1000):  # until all six wait for the order's lock (or fail, if none does)
        if await pool.fetchval(waiting) >= 6:
            break
        await asyncio.sleep(0.01)
    else:
        pytest.fail("the same payment presented at once did not wait for the order's lock")
    facilitator.settle_gate.set()
    answers = [await r for r in [first, *others]]
    assert [r.status for r in answers] == [200] * 7
    assert sorted([(await r.json())["credited"] for r in answers]) == [False] * 6 + [True]
    assert facilitator.settles == 1
    assert facilitator.verifies == 1
    assert await balance(sc, account) == 100 * C


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (payment_v1(USD, pay_to="0x000000000000000000000000000000000000dEaD"), "payTo"),
        (payment_v1(2 * USD), "amount"),
        (payment_v1(USD, network="base"), "network"),
        (payment_v2(USD, asset="0x0000000000000000000000000000000000000001"), "asset"),
    ],
)
async def test_a_payment_that_does_not_match_is_refused_before_the_facilitator(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator, header: str, why: str
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    name = "X-PAYMENT" if decoded(header)["x402Version"] == 1 else "PAYMENT-SIGNATURE"
    resp = await topup(sc, key, USD, **{name: header})
    assert resp.status == 402
    assert why in (await resp.json())["error"]
    assert facilitator.verifies == 0
    assert await balance(sc, account) == 0
    assert await order_of(sc, account) is None


async def test_another_accounts_payment_is_refused(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    a, key_a = await sc.account(0)
    b, key_b = await sc.account(0)
    header = payment_v1(USD)
    assert (await topup(sc, key_a, USD, **{"X-PAYMENT": header})).status == 200
    resp = await topup(sc, key_b, USD, **{"X-PAYMENT": header})
    assert resp.status == 403
    assert (await resp.json())["error"]["param"] == "X-PAYMENT"
    assert (await balance(sc, a), await balance(sc, b)) == (100 * C, 0)
    assert facilitator.settles == 1


async def test_the_same_nonce_for_another_amount_is_a_409(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    nonce = "0x" + "11" * 32
    assert (await topup(sc, key, USD, **{"X-PAYMENT": payment_v1(USD, nonce=nonce)})).status == 200
    resp = await topup(sc, key, 2 * USD, **{"X-PAYMENT": payment_v1(2 * USD, nonce=nonce)})
    assert resp.status == 409
    assert await balance(sc, account) == 100 * C


@pytest.mark.parametrize("name", ["X-PAYMENT", "PAYMENT-SIGNATURE"])
@pytest.mark.parametrize(
    "value",
    ["not base64!", "bm90IGpzb24=", "WzFd", "eyJ4NDAyVmVyc2lvbiI6IDd9", payment_v1(USD, nonce="0x12")],
)
async def test_a_bad_payment_header_is_a_400_naming_it(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator, name: str, value: str
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    account, key = await sc.account(0)
    # not base64; not JSON; not an object; version 7; a nonce that is not 32 bytes
    resp = await topup(sc, key, USD, **{name: value})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == name
    assert facilitator.verifies == 0
    assert await order_of(sc, account) is None


async def test_a_facilitator_down_or_timing_out_is_a_503_and_credits_nothing(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator, x402_facilitator_timeout_seconds=1)
    account, key = await sc.account(0)
    header = payment_v1(USD)
    facilitator.status = 500
    down = await topup(sc, key, USD, **{"X-PAYMENT": header})
    assert down.status == 503
    assert (await down.json())["error"]["code"] == "facilitator_unavailable"
    facilitator.status, facilitator.hang = 200, True
    slow = await topup(sc, key, USD, **{"X-PAYMENT": header})  # x402_facilitator_timeout_seconds=1
    assert slow.status == 503
    assert await balance(sc, account) == 0
    assert (await order_of(sc, account))["status"] == "pending"
    facilitator.hang = False
    facilitator.released.set()
    back = await topup(sc, key, USD, **{"X-PAYMENT": header})  # the same payment, once it answers
    assert back.status == 200
    assert await balance(sc, account) == 100 * C


async def test_topup_is_off_without_a_facilitator(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar()
    _, key = await sc.account(0)
    resp = await topup(sc, key, USD, **{"X-PAYMENT": payment_v1(USD)})
    assert resp.status == 404
    err = (await resp.json())["error"]
    assert err["param"] == "x402_facilitator_url"
    assert "x402_facilitator_url" in err["message"]


@pytest.mark.parametrize("amount", [0, USD - 1, 1_000_000_001, "1000000", 1.5, True])
async def test_an_amount_out_of_range_or_not_an_integer_is_a_400(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator, amount: Any
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator)
    _, key = await sc.account(0)
    resp = await topup(sc, key, amount)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "amount"


async def test_an_amount_giving_a_fraction_of_a_micro_credit_is_refused(
    make_sidecar: SidecarFactory, facilitator: FakeFacilitator
) -> None:
    sc = await x402_sidecar(make_sidecar, facilitator, credit_price="0.03")
    account, key = await sc.account(0)
    resp = await topup(sc, key, USD + 1, **{"X-PAYMENT": payment_v1(USD + 1)})
    assert resp.status == 400
    assert "multiple of 3" in (await resp.json())["error"]["message"]
    ok = await topup(sc, key, USD + 2, **{"X-PAYMENT": payment_v1(USD + 2)})
    assert ok.status == 200
    assert await balance(sc, account) == 33_333_400
    assert facilitator.settles == 1


def test_micro_credits_are_exact() -> None:
    assert micro_credits(USD, "0.01") == 100 * C
    assert micro_credits(7, "0.000001") == 7 * C
    with pytest.raises(BadRequest):
        micro_credits(1, "2")
    assert micro_credits(2, "2") == 1
