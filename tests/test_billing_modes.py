"""Billing modes over real HTTP, on one Redis and on the cluster, with the ledger in Postgres: an account
on invoice is admitted beyond a zero balance up to its credit limit (or always, unlimited), its usage
accrues (the balance goes below zero, the full cost in the ledger); a blocked account gets a 402
invoice_overdue for requests and operation holds until unblocked; back on prepaid it gets nothing until
paid; a rebuilt Redis has its credit line and block again; bad input is named and changes nothing; the
routes are the operator's (and the client's own view); accrual's usage lines per (route, model)."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from sidecar.credit_lines import UNLIMITED_AVAILABLE
from sidecar.documents.accrual import UsageLine, usage_lines
from sidecar.documents.billing_modes import invoice_accounts
from sidecar.documents.billing_modes_api import BILLING_MODES
from sidecar.outbox import UsageEvent
from sidecar.rebuild import rebuild_if_empty
from sidecar.reconcile import reconcile

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, hold_for, pooled, post

pytestmark = pytest.mark.topologies
C = 1_000_000
BODY = {"model": "test-model", "messages": HELLO, "max_tokens": 10}
HOLD = hold_for(msgspec.json.encode(BODY), limit=10)
CHARGE = pooled(5 * 1000 + 4 * 2000)  # 5 prompt tokens, 4 completion tokens (x-demo-tokens)
JUDGE = {"unit_price": 1_000, "per_run": 500, "unit": "evaluation", "max_units": 100}
T0 = 1_796_000_000_000


@pytest.fixture
async def sc(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS, operations={"judge": JUDGE}, flusher_enabled=False)


async def chat(sc: Sidecar, key: str) -> tuple[int, Any]:
    resp = await post(sc, "/v1/chat/completions", BODY, key, **{"x-demo-tokens": "4"})
    body = await resp.json()
    if resp.status == 200:
        assert resp.headers["x-creditgate-charged"] == str(CHARGE)
    return resp.status, body


async def admin(sc: Sidecar, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    resp = await sc.client.request(method, f"/admin{path}", json=body, headers=sc.admin_headers())
    return resp.status, await resp.json()


async def billing(sc: Sidecar, account: str, **body: Any) -> dict[str, Any]:
    status, got = await admin(sc, "PUT", f"/accounts/{account}/billing", body)
    assert status == 200, got
    return dict(got)


async def own(sc: Sidecar, key: str) -> dict[str, Any]:
    resp = await sc.client.get("/v1/billing", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    return dict(await resp.json())


async def flush(sc: Sidecar) -> None:
    await sc.services.flusher().drain()


async def fields(sc: Sidecar, account: str) -> list[Any]:
    k = sc.services.keys.account(account)
    return list(await sc.services.redis.hmget(k.balance, ["credit", "blocked"]))


async def test_invoice_mode_admits_up_to_the_credit_limit_and_accrues_below_zero(sc: Sidecar) -> None:
    account, key = await sc.account(0)
    status, body = await chat(sc, key)  # prepaid at zero: the ordinary 402
    assert (status, body["error"]["code"]) == (402, "insufficient_credits")
    limit = HOLD + CHARGE - 1  # room for one hold at zero, not for a second one after its charge
    credits = f"{limit // C}.{limit % C:06d}"
    got = await billing(sc, account, mode="invoice", credit_limit=credits, terms_days=14)
    assert (got["mode"], got["credit_limit"], got["terms_days"], got["unlimited"]) == (
        "invoice",
        limit,
        14,
        False,
    )
    assert await fields(sc, account) == [str(limit).encode(), None]
    assert (await chat(sc, key))[0] == 200
    assert (await sc.balance(account))["balance"] == -CHARGE
    view = await own(sc, key)
    assert (view["mode"], view["credit_limit"], view["blocked"]) == ("invoice", limit, False)
    assert (view["balance"], view["available"]) == (-CHARGE, limit - CHARGE)
    resp = await sc.client.post("/v1/credits/estimate", json=BODY, headers={"Authorization": f"Bearer {key}"})
    estimate = await resp.json()
    assert (estimate["available"], estimate["fits"]) == (limit - CHARGE, False)  # with the credit line
    status, body = await chat(sc, key)  # -CHARGE + limit < HOLD
    assert (status, body["error"]["code"]) == (402, "insufficient_credits")
    assert body["error"]["available"] == limit - CHARGE
    await flush(sc)
    rows = await sc.services.store.pool.fetch(
        "SELECT amount FROM ledger WHERE account_id = $1 AND kind = 'usage'", account
    )
    assert [r["amount"] for r in rows] == [-CHARGE]  # the full cost, once
    assert await sc.services.store.ledger_sum(account) == -CHARGE
    svc = sc.services
    assert await reconcile(svc.redis, svc.keys, svc.store) == []  # a negative balance is no drift
    async with svc.store.pool.acquire() as conn:
        assert [(a.account, a.terms_days, a.credit_limit) for a in await invoice_accounts(conn)] == [
            (account, 14, limit)
        ]


async def test_unlimited_admits_always_and_prepaid_again_admits_nothing_until_paid(sc: Sidecar) -> None:
    account, key = await sc.account(0)
    got = await billing(sc, account, mode="invoice", credit_limit=None)
    assert (got["unlimited"], got["terms_days"]) == (True, 30)
    assert await fields(sc, account) == [b"unlimited", None]
    for _ in range(3):
        assert (await chat(sc, key))[0] == 200
    assert (await sc.balance(account))["balance"] == -3 * CHARGE
    assert (await own(sc, key))["available"] is None
    assert await sc.balances.available(account) == UNLIMITED_AVAILABLE
    await billing(sc, account, mode="prepaid")
    assert await fields(sc, account) == [None, None]
    status, body = await chat(sc, key)
    assert (status, body["error"]["code"]) == (402, "insufficient_credits")
    # Money in pays the debt back first (credit.lua's payoff): 1 credit leaves 1 - 3 charges.
    await sc.admin("POST", f"/accounts/{account}/grants", {"amount": C}, **{"Idempotency-Key": "pay1"})
    assert (await sc.balance(account))["balance"] == C - 3 * CHARGE
    assert (await chat(sc, key))[0] == 200
    await flush(sc)
    svc = sc.services
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_a_blocked_account_gets_402_invoice_overdue_until_unblocked(sc: Sidecar) -> None:
    account, key = await sc.account(10 * C)  # funded: the block, not the balance, refuses
    status, got = await admin(sc, "POST", f"/accounts/{account}/billing/block", {"reason": "CG-2026-000123"})
    assert (status, got["blocked"], got["blocked_reason"], got["mode"]) == (
        200,
        True,
        "CG-2026-000123",
        "prepaid",
    )
    resp = await post(sc, "/v1/chat/completions", BODY, key)
    body = await resp.json()
    assert (resp.status, body["error"]["code"], resp.headers["x-should-retry"]) == (
        402,
        "invoice_overdue",
        "false",
    )
    assert account in body["error"]["message"]
    assert "overdue" in body["error"]["message"]
    hold = {"operation": "judge", "units": 3, "idempotency_key": "h1"}
    resp = await sc.client.post("/v1/holds", json=hold, headers={"Authorization": f"Bearer {key}"})
    assert (resp.status, (await resp.json())["error"]["code"]) == (402, "invoice_overdue")
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (10 * C, 0)  # nothing held, nothing charged
    assert (await own(sc, key))["blocked"] is True
    status, got = await admin(sc, "POST", f"/accounts/{account}/billing/unblock", {})
    assert (status, got["blocked"], got["blocked_reason"]) == (200, False, None)
    assert await fields(sc, account) == [None, None]
    assert (await chat(sc, key))[0] == 200
    resp = await sc.client.post("/v1/holds", json=hold, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    # The overdue worker's own call, twice: the same state.
    modes = sc.client.app[BILLING_MODES]
    for _ in range(2):
        done = await modes.set_blocked(account, True, "overdue: CG-2026-000124")
        assert (done.blocked, done.blocked_reason) == (True, "overdue: CG-2026-000124")
    assert await fields(sc, account) == [None, b"1"]


async def test_a_rebuilt_redis_has_the_credit_line_and_the_block_again(sc: Sidecar) -> None:
    account, key = await sc.account(0)
    other, other_key = await sc.account(0)
    await billing(sc, account, mode="invoice", credit_limit="5")
    await billing(sc, other, mode="invoice")
    assert (await chat(sc, key))[0] == 200
    await admin(sc, "POST", f"/accounts/{other}/billing/block", {"reason": "late"})
    await flush(sc)
    svc = sc.services
    names = [n async for n in svc.redis.scan_iter(match=f"{svc.keys.prefix}*")]
    await svc.redis.delete(*names)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert await fields(sc, account) == [str(5 * C).encode(), None]
    assert await fields(sc, other) == [b"unlimited", b"1"]
    assert (await sc.balance(account))["balance"] == -CHARGE
    assert (await chat(sc, key))[0] == 200  # admitted again against the limit
    status, body = await chat(sc, other_key)
    assert (status, body["error"]["code"]) == (402, "invoice_overdue")
    await admin(sc, "POST", f"/accounts/{other}/billing/unblock")
    assert (await chat(sc, other_key))[0] == 200


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"mode": "postpaid"}, "mode"),
        ({"credit_limit": "5"}, "mode"),
        ({"mode": "invoice", "credit_limit": "abc"}, "credit_limit"),
        ({"mode": "invoice", "credit_limit": "-1"}, "credit_limit"),
        ({"mode": "invoice", "credit_limit": "1.0000001"}, "credit_limit"),
        ({"mode": "invoice", "credit_limit": "NaN"}, "credit_limit"),
        ({"mode": "invoice", "credit_limit": "1e999999"}, "credit_limit"),
        ({"mode": "invoice", "credit_limit": 5}, "credit_limit"),
        ({"mode": "invoice", "terms_days": -1}, "terms_days"),
        ({"mode": "invoice", "terms_days": 366}, "terms_days"),
        ({"mode": "invoice", "terms_days": True}, "terms_days"),
        ({"mode": "prepaid", "credit_limit": "5"}, "credit_limit"),
        ({"mode": "invoice", "limit": "5"}, "limit"),
    ],
)
async def test_bad_input_names_the_field_and_changes_nothing(sc: Sidecar, body: Any, param: str) -> None:
    account, _ = await sc.account(0)
    await billing(sc, account, mode="invoice", credit_limit="2", terms_days=7)
    before = await admin(sc, "GET", f"/accounts/{account}/billing")
    status, got = await admin(sc, "PUT", f"/accounts/{account}/billing", body)
    assert (status, got["error"]["param"]) == (400, param), got
    assert await admin(sc, "GET", f"/accounts/{account}/billing") == before
    assert await fields(sc, account) == [str(2 * C).encode(), None]


async def test_unknown_accounts_bad_reasons_and_other_surfaces_are_refused(sc: Sidecar) -> None:
    account, key = await sc.account(0)
    for path in ("/accounts/nobody/billing", "/accounts/bad%20id/billing"):
        status, got = await admin(sc, "GET", path)
        assert (status, got["error"]["param"]) == (404, "account")
    status, got = await admin(sc, "PUT", "/accounts/nobody/billing", {"mode": "invoice"})
    assert status == 404
    status, got = await admin(sc, "POST", f"/accounts/{account}/billing/block", {"reason": "x" * 501})
    assert (status, got["error"]["param"]) == (400, "reason")
    status, got = await admin(sc, "POST", f"/accounts/{account}/billing/block", {"why": "x"})
    assert (status, got["error"]["param"]) == (400, "why")
    status, got = await admin(sc, "GET", f"/accounts/{account}/billing")
    assert (got["blocked"], got["mode"], got["updated_at"]) == (False, "prepaid", None)  # still no row
    client = {"Authorization": f"Bearer {key}"}
    for method, path in [
        ("GET", f"/admin/accounts/{account}/billing"),
        ("PUT", f"/admin/accounts/{account}/billing"),
        ("POST", f"/admin/accounts/{account}/billing/unblock"),
    ]:
        resp = await sc.client.request(method, path, json={"mode": "invoice"}, headers=client)
        assert resp.status == 401
    assert (await sc.client.get("/v1/billing")).status == 401
    assert await fields(sc, account) == [None, None]


async def test_usage_lines_group_an_accounts_usage_by_route_and_model(sc: Sidecar) -> None:
    account, _ = await sc.account(0)
    other, _ = await sc.account(0)
    await billing(sc, account, mode="invoice")
    spends = [
        (account, "chat", "gpt-b", 300, T0),
        (account, "chat", "gpt-a", 100, T0 + 1),
        (account, "chat", "gpt-a", 200, T0 + 2),
        (account, "operation", "judge", 50, T0 + 3),
        (account, "embeddings", "gpt-a", 0, T0 + 4),  # free: a request, no credits
        (account, "chat", "gpt-a", 1000, T0 + 10),  # at the end: the next period's
        (account, "chat", "gpt-a", 7000, T0 - 1),  # before the start
        (other, "chat", "gpt-a", 9000, T0 + 5),
    ]
    for who, route, model, micro, at in spends:
        event = UsageEvent(route=route, model=model, settled_ms=at)
        await sc.balances.settle(who, "req_" + uuid.uuid4().hex, micro, event, record=True)
    await flush(sc)
    async with sc.services.store.pool.acquire() as conn:
        lines = await usage_lines(conn, account, T0, T0 + 10)
        assert lines == [
            UsageLine("chat", "gpt-a", 2, 300),
            UsageLine("chat", "gpt-b", 1, 300),
            UsageLine("embeddings", "gpt-a", 1, 0),
            UsageLine("operation", "judge", 1, 50),
        ]
        assert await usage_lines(conn, account, T0, T0 + 10) == lines  # the same order every time
        assert await usage_lines(conn, account, T0 + 10, T0 + 11) == [UsageLine("chat", "gpt-a", 1, 1000)]
        assert await usage_lines(conn, account, T0 + 11, T0 + 20) == []
