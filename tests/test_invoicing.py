"""The invoicing worker over real Redis (single and cluster), Postgres and HTTP, on a controlled clock: an
account on invoice gets one invoice per ended month, by route and model, for what it owes (prepaid credits
covered, earlier invoices not billed twice), in its own time zone, due after its terms; an invoice unpaid
past its grace blocks new work until it is paid; an operator-billed plan's price is invoiced once per
period."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest

from sidecar.documents.invoices_api import INVOICES
from sidecar.documents.invoicing import SETTLE_LAG_MS, credits_minor, last_month
from sidecar.documents.plans_api import PLANS
from sidecar.outbox import UsageEvent
from sidecar.wallet import GrantTerms, WalletPolicy

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, post
from .support_wallet import Clock

pytestmark = pytest.mark.topologies
C = 1_000_000
DAY = 86_400_000
BODY = {"model": "test-model", "messages": HELLO, "max_tokens": 10}


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


JAN10, FEB1, MAR1, APR1 = (ms(f"2027-{m}T00:00+00:00") for m in ("01-10", "02-01", "03-01", "04-01"))


def test_months_and_rounding() -> None:
    assert last_month(FEB1 + 1, "UTC") == (ms("2027-01-01T00:00+00:00"), FEB1, "2027-01")
    assert last_month(FEB1 - 1, "UTC")[2] == "2026-12"
    # New York: February 1st, 03:00 UTC is still January 31st there
    assert last_month(FEB1 + 3 * 3_600_000, "America/New_York")[2] == "2026-12"
    start, end, label = last_month(ms("2027-03-15T12:00+00:00"), "America/New_York")
    assert (start, end, label) == (ms("2027-02-01T05:00+00:00"), ms("2027-03-01T05:00+00:00"), "2027-02")
    assert last_month(ms("2028-03-01T00:00+00:00"), "UTC")[0] == ms("2028-02-01T00:00+00:00")  # (leap)
    price = "0.01"
    assert credits_minor(400 * C, Decimal(price), "usd") == 400
    assert credits_minor(C // 2, Decimal(price), "usd") == 1  # half a cent: half-up
    assert credits_minor(-(C // 2), Decimal(price), "usd") == -1
    assert credits_minor(C // 2 - 1, Decimal(price), "usd") == 0
    assert credits_minor(3 * C, Decimal("0.015"), "jpy") == 0
    assert credits_minor(100 * C, Decimal("0.015"), "jpy") == 2  # 1.5 yen: half-up


class Scene:
    def __init__(self, sc: Sidecar) -> None:
        self.sc, self.clock = sc, Clock()
        self.clock.now = JAN10
        sc.balances.wallet = WalletPolicy(30 * DAY, self.clock)
        invoices = sc.client.app[INVOICES]
        invoices.issuer = dataclasses.replace(invoices.issuer, clock=self.clock)
        sc.client.app[PLANS].clock = self.clock

    async def admin(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        resp = await self.sc.client.request(
            method, f"/admin{path}", json=body, headers=self.sc.admin_headers()
        )
        got = await resp.json()
        assert resp.status == status, got
        return got

    async def account(self, purchased: int, **billing: Any) -> tuple[str, str]:
        account, key = await self.sc.account(0)
        if purchased:
            terms = GrantTerms("purchase")
            await self.sc.services.admin.grant(account, purchased, uuid.uuid4().hex, "purchase", terms=terms)
        if billing:
            await self.admin("PUT", f"/accounts/{account}/billing", billing)
        return account, key

    async def use(
        self, account: str, credits: int, model: str, route: str = "chat", at: int | None = None
    ) -> None:
        event = UsageEvent(route=route, model=model, settled_ms=self.clock.now if at is None else at)
        await self.sc.balances.settle(account, "req_" + uuid.uuid4().hex, credits, event)

    async def run(self, at: int) -> int:
        await self.sc.services.flusher().drain()
        self.clock.now = at
        return int((await self.admin("POST", "/invoicing/run"))["issued"])

    async def invoices(self, account: str) -> list[dict[str, Any]]:
        page = await self.admin("GET", f"/invoices?account={account}&kind=invoice")
        return list(reversed(page["data"]))  # oldest first


@pytest.fixture
async def scene(make_sidecar: SidecarFactory) -> Scene:
    plans = {"pro": {"included_credits": 100 * C, "price": 2900, "title": "Pro"}}
    sc = await make_sidecar(
        models=MODELS,
        flusher_enabled=False,
        plans=plans,
        subscription_interval_seconds=3600,
        invoice_interval_seconds=3600,
    )
    return Scene(sc)


async def test_each_month_is_invoiced_once_for_what_the_account_owes(scene: Scene) -> None:
    account, _ = await scene.account(1000 * C, mode="invoice", credit_limit="5000", terms_days=30)
    await scene.use(account, 400 * C, "gpt-a")
    await scene.use(account, 800 * C, "gpt-b")
    await scene.use(account, 300 * C, "ocr", route="operation")
    await scene.use(account, 100 * C, "gpt-a", at=FEB1 + 30_000)  # February's
    assert await scene.run(FEB1 + SETTLE_LAG_MS - 60_000) == 0  # too soon: the month's last rows may lag
    assert await scene.run(FEB1 + SETTLE_LAG_MS) == 1
    assert await scene.run(FEB1 + SETTLE_LAG_MS + 3_600_000) == 0  # once
    (jan,) = await scene.invoices(account)
    lines = [(x["description"], x["quantity"], x["credits"], x["net_minor"]) for x in jan["lines"]]
    assert lines == [
        ("gpt-a (chat)", 1, 400 * C, 400),
        ("gpt-b (chat)", 1, 800 * C, 800),
        ("ocr (operation)", 1, 300 * C, 300),
        ("Covered by prepaid and included credits", 1, -1000 * C, -1000),  # the prepaid 1000 credits
    ]
    assert (jan["credits"], jan["totals"]["gross_minor"], jan["status"]) == (500 * C, 500, "open")
    assert jan["period"] == {"start": "2027-01-01T00:00:00Z", "end": "2027-02-01T00:00:00Z"}
    issued = dt.datetime.fromisoformat(jan["issued_at"])
    assert dt.datetime.fromisoformat(jan["due_at"]) - issued == dt.timedelta(days=30)
    # March: February's 100 credits only (January's 500 are billed, unpaid: not billed twice)
    assert await scene.run(MAR1 + SETTLE_LAG_MS) == 1
    _, feb = await scene.invoices(account)
    assert [(x["description"], x["credits"]) for x in feb["lines"]] == [("gpt-a (chat)", 100 * C)]
    assert (feb["credits"], feb["totals"]["gross_minor"]) == (100 * C, 100)
    assert (await scene.sc.balance(account))["balance"] == -600 * C
    await scene.admin("POST", f"/invoices/{jan['id']}/payments", {"payment_id": "wire-jan"})
    assert (await scene.sc.balance(account))[
        "balance"
    ] == -100 * C  # paid back: the credit line is free again
    assert await scene.run(APR1 + SETTLE_LAG_MS) == 0  # nothing new owed in March


async def test_a_month_ends_on_the_accounts_wall_clock(scene: Scene) -> None:
    account, _ = await scene.account(0, mode="invoice", credit_limit=None, terms_days=14)
    await scene.sc.services.store.pool.execute(
        "UPDATE accounts SET time_zone = 'America/New_York' WHERE id = $1", account
    )
    await scene.use(account, 7 * C, "gpt-a", at=FEB1 + 3 * 3_600_000)  # Jan 31, 22:00 in New York
    assert await scene.run(FEB1 + 5 * 3_600_000 + SETTLE_LAG_MS) == 1  # 00:15 on Feb 1 there
    (jan,) = await scene.invoices(account)
    assert jan["period"] == {"start": "2027-01-01T05:00:00Z", "end": "2027-02-01T05:00:00Z"}
    assert (jan["credits"], jan["totals"]["gross_minor"]) == (7 * C, 7)


async def test_an_overdue_invoice_blocks_new_work_until_paid(scene: Scene) -> None:
    account, key = await scene.account(0, mode="invoice", credit_limit="1000", terms_days=30)
    await scene.use(account, 50 * C, "gpt-a")
    assert await scene.run(FEB1 + SETTLE_LAG_MS) == 1
    (jan,) = await scene.invoices(account)
    due = ms(jan["due_at"].replace("Z", "+00:00"))
    await scene.run(due + 14 * DAY - 60_000)  # within the grace: still served
    assert (await post(scene.sc, "/v1/chat/completions", BODY, key)).status == 200
    await scene.run(due + 14 * DAY + 60_000)
    resp = await post(scene.sc, "/v1/chat/completions", BODY, key)
    body = await resp.json()
    assert (resp.status, body["error"]["code"]) == (402, "invoice_overdue")
    billing = await scene.admin("GET", f"/accounts/{account}/billing")
    assert (billing["blocked"], billing["blocked_reason"]) == (True, f"overdue:{jan['number']}")
    await scene.admin("POST", f"/invoices/{jan['id']}/payments", {"payment_id": "late-wire"})
    assert (await post(scene.sc, "/v1/chat/completions", BODY, key)).status == 200  # paid: unblocked
    # an operator's own block is the operator's to lift: the worker leaves it
    await scene.admin("POST", f"/accounts/{account}/billing/block", {"reason": "fraud review"})
    await scene.run(due + 20 * DAY)
    assert (await post(scene.sc, "/v1/chat/completions", BODY, key)).status == 402


async def test_an_operator_billed_plan_is_invoiced_once_per_period(scene: Scene) -> None:
    account, _ = await scene.account(0)
    sub = (await scene.admin("POST", f"/accounts/{account}/subscription", {"plan": "pro"}, 201))[
        "subscription"
    ]
    assert await scene.run(JAN10 + 60_000) == 1
    assert await scene.run(JAN10 + 120_000) == 0
    (inv,) = await scene.invoices(account)
    assert (inv["source"], inv["credits"], inv["totals"]["gross_minor"]) == (f"sub:{sub['id']}:0", 0, 2900)
    assert inv["lines"][0]["description"].startswith("Plan Pro, 2027-01-10 to 2027-02-10")
    paid = await scene.admin("POST", f"/invoices/{inv['id']}/payments", {"payment_id": "card-1"})
    assert paid["status"] == "paid"
    assert (await scene.sc.balance(account))["balance"] == 100 * C  # the plan's grant only: nothing more
