"""Provider-billed plans: a subscription that names its Stripe subscription is granted each period by
Stripe's signed `invoice.paid` (POST /webhooks/stripe, real HTTP), once: a replayed or duplicated event,
or two at once, grant nothing more, and the period worker never grants it. Its periods are Stripe's
(UTC, anchored at the first paid invoice's period start, mapped by the line period's midpoint, so
Stripe's instants may be seconds off). A plan change waits for the next invoice; an unknown
subscription, a price that is not the plan's, a canceled subscription or a late invoice grant nothing;
a bad signature is refused and grants nothing. Both invoice shapes (API 2025-03-31 and older)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.documents.plans import grant_key

from .conftest import Sidecar, SidecarFactory
from .support_plans import FEB28, JAN31, MAR31, PLAN_SETTINGS, C, Scene
from .support_stripe import FakeStripe, event, post_event, sign, stripe_settings
from .support_stripe import fake_stripe as fake_stripe  # the fixture
from .support_wallet import Clock, grants

pytestmark = pytest.mark.topologies
PROVIDER_PLANS = {
    **PLAN_SETTINGS,
    "s_basic": {
        "included_credits": 10 * C,
        "price": 900,
        "billing": "provider",
        "stripe_price": "price_basic",
    },
    "s_pro": {"included_credits": 50 * C, "price": 4900, "billing": "provider", "stripe_price": "price_pro"},
}
APR30 = MAR31 + 30 * 86_400_000


def s(at_ms: int) -> int:
    return at_ms // 1000


class Shop(Scene):
    def __init__(self, sc: Sidecar, clock: Clock, fake: FakeStripe) -> None:
        super().__init__(sc, clock)
        self.fake = fake

    async def provider_sub(self, plan: str = "s_basic") -> tuple[str, str, dict[str, Any]]:
        """(account, Stripe subscription id, our subscription) started by the operator at the clock."""
        account, _ = await self.account()
        stripe_sub = self.fake.subscribe(PROVIDER_PLANS[plan]["stripe_price"])  # type: ignore[index]
        body = {"plan": plan, "stripe_subscription": stripe_sub}
        sub = (await self.post(f"/accounts/{account}/subscription", body, 201))["subscription"]
        return account, stripe_sub, sub

    async def paid(self, invoice: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
        status, done = await post_event(self.sc.client, event("invoice.paid", invoice, event_id))
        assert status == 200, done
        return done

    async def subscription_ins(self, account: str) -> list[tuple[str, int]]:
        return await self.ledger(account, "subscription")

    async def invoices(self, sid: str) -> list[str | None]:
        rows = await self.sc.services.store.pool.fetch(
            "SELECT invoice_ref FROM subscription_periods WHERE subscription_id = $1 ORDER BY period_index",
            sid,
        )
        return [r["invoice_ref"] for r in rows]


@pytest.fixture
async def shop(make_sidecar: SidecarFactory, fake_stripe: FakeStripe) -> Shop:
    clock = Clock()
    clock.now = JAN31
    sc = await make_sidecar(
        flusher_enabled=False,
        plans=PROVIDER_PLANS,
        subscription_interval_seconds=3600,
        **stripe_settings(fake_stripe),
    )
    return Shop(sc, clock, fake_stripe)


async def test_invoice_paid_grants_each_period_once_and_the_worker_never_does(shop: Shop) -> None:
    account, stripe_sub, sub = await shop.provider_sub()
    assert (sub["stripe_subscription"], sub["period"], sub["time_zone"]) == (stripe_sub, None, "UTC")
    assert (await shop.sc.balance(account))["balance"] == 0  # nothing until Stripe says it is paid
    assert await shop.plans.run_pass(MAR31) == 0  # the worker: not even long after
    # Stripe's period starts a few seconds after ours would have (its subscription was made first)
    shop.clock.now = JAN31 + 60_000
    first = shop.fake.invoice(stripe_sub, s(JAN31) + 7, s(FEB28) + 7)
    body = event("invoice.paid", first)
    status, done = await post_event(shop.sc.client, body)
    assert (status, done["outcome"], done["first"]) == (200, "granted", True)
    g = (await grants(shop.sc.balances, account))[grant_key(sub["id"], 0)]
    assert (g.kind, g.remaining, g.expires_ms) == ("subscription", 10 * C, FEB28 + 7000)  # Stripe's anchor
    status, again = await post_event(shop.sc.client, body)  # the same event, replayed
    assert (status, again["outcome"], again["first"]) == (200, "already_granted", False)
    assert (await shop.paid(first))["outcome"] == "already_granted"  # the same invoice, another event
    assert await shop.plans.run_pass(FEB28 + 60_000) == 0  # the period came due: still not the worker's
    assert len(await shop.subscription_ins(account)) == 1
    # the next period: its invoice (the older API's shape), Stripe's instant 3 seconds before ours
    shop.clock.now = FEB28 + 3_600_000
    second = shop.fake.invoice(stripe_sub, s(FEB28) + 4, s(MAR31) + 4, legacy=True)
    thrice = await asyncio.gather(*(shop.paid(second) for _ in range(3)))  # delivered thrice at once
    assert sorted(d["outcome"] for d in thrice) == ["already_granted", "already_granted", "granted"]
    view = (await shop.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"]
    assert view["period"] == {"index": 1, "start": "2027-02-28T10:00:07Z", "end": "2027-03-31T10:00:07Z",
                              "granted": 10 * C, "carried": None, "invoice": second["id"]}  # fmt: skip
    assert await shop.invoices(sub["id"]) == [first["id"], second["id"]]
    ins = await shop.subscription_ins(account)
    assert ins == [(f"in:{account}:{grant_key(sub['id'], i)}", 10 * C) for i in (0, 1)]
    refs = await shop.sc.services.store.pool.fetch(
        "SELECT payment_ref FROM grants WHERE account_id = $1 ORDER BY created_at",
        account,
    )
    assert [r["payment_ref"] for r in refs] == [first["id"], second["id"]]
    # a stale event for the period before: nothing
    assert (await shop.paid(first))["outcome"] == "period_ended"
    assert len(await shop.subscription_ins(account)) == 2


async def test_a_change_waits_for_the_next_invoice_which_grants_the_new_plan(shop: Shop) -> None:
    account, stripe_sub, sub = await shop.provider_sub()
    await shop.paid(shop.fake.invoice(stripe_sub, s(JAN31), s(FEB28)))
    shop.clock.now = JAN31 + 10 * 86_400_000  # mid-period
    changed = await shop.post(f"/accounts/{account}/subscription/change", {"plan": "s_pro"})
    assert (changed["subscription"]["plan"], changed["subscription"]["next_plan"]) == ("s_basic", "s_pro")
    assert (await shop.sc.balance(account))["balance"] == 10 * C  # nothing now: no grant, no proration
    await shop.post(f"/accounts/{account}/subscription/change", {"plan": "basic"}, 400)  # operator-billed
    # the operator moved the Stripe subscription to price_pro from its next period (proration none)
    shop.clock.now = FEB28 + 3_600_000
    old_price = shop.fake.invoice(stripe_sub, s(FEB28), s(MAR31), price="price_basic")
    assert (await shop.paid(old_price))["outcome"] == "price_mismatch"  # not the plan it has now
    assert len(await shop.subscription_ins(account)) == 1
    new_price = shop.fake.invoice(stripe_sub, s(FEB28), s(MAR31), price="price_pro")
    assert (await shop.paid(new_price))["outcome"] == "granted"
    assert await shop.periods(sub["id"]) == [(0, "s_basic", 10 * C, 0), (1, "s_pro", 50 * C, None)]
    view = (await shop.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"]
    assert (view["plan"], view["next_plan"]) == ("s_pro", None)


async def test_what_is_not_ours_or_not_due_grants_nothing(shop: Shop) -> None:
    account, stripe_sub, sub = await shop.provider_sub()
    unknown = shop.fake.invoice(shop.fake.subscribe("price_basic"), s(JAN31), s(FEB28))
    assert (await shop.paid(unknown))["outcome"] == "unknown_subscription"
    one_off = {**shop.fake.invoice(stripe_sub, s(JAN31), s(FEB28)), "parent": None}  # no subscription
    assert (await shop.paid(one_off))["outcome"] == "not_a_subscription"
    shop.clock.now = FEB28 + 1000  # paid after its period ended: its credits would expire at once
    assert (await shop.paid(shop.fake.invoice(stripe_sub, s(JAN31), s(FEB28))))["outcome"] == "period_ended"
    assert (await shop.sc.balance(account))["balance"] == 0
    await shop.post(f"/accounts/{account}/subscription/cancel")
    late = shop.fake.invoice(stripe_sub, s(FEB28), s(MAR31))
    assert (await shop.paid(late))["outcome"] == "canceled"
    assert await shop.subscription_ins(account) == []
    assert await shop.periods(sub["id"]) == []


@pytest.mark.parametrize("signature", ["t=1,v1=00", "bad", "wrong_secret"])
async def test_a_bad_signature_is_refused_and_grants_nothing(shop: Shop, signature: str) -> None:
    account, stripe_sub, _ = await shop.provider_sub()
    body = event("invoice.paid", shop.fake.invoice(stripe_sub, s(JAN31), s(FEB28)))
    if signature == "wrong_secret":
        signature = sign(body, "whsec_not_ours")
    status, refused = await post_event(shop.sc.client, body, signature=signature)
    assert status == 400, refused
    assert await shop.subscription_ins(account) == []
    assert (await shop.sc.balance(account))["balance"] == 0
    assert (await shop.paid(shop.fake.invoice(stripe_sub, s(JAN31), s(FEB28))))["outcome"] == "granted"


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"plan": "s_basic"}, 400, "stripe_subscription"),  # a provider-billed plan names it
        ({"plan": "basic", "stripe_subscription": "sub_1"}, 400, "stripe_subscription"),  # only then
        ({"plan": "s_basic", "stripe_subscription": "cus_1"}, 400, "stripe_subscription"),
        ({"plan": "s_basic", "stripe_subscription": 5}, 400, "stripe_subscription"),
        ({"plan": "s_basic", "stripe_subscription": "sub_taken"}, 409, "stripe_subscription"),
    ],
)
async def test_a_bad_start_is_named_and_changes_nothing(
    shop: Shop, body: dict[str, Any], status: int, param: str
) -> None:
    other, _ = await shop.account()
    await shop.post(
        f"/accounts/{other}/subscription", {"plan": "s_basic", "stripe_subscription": "sub_taken"}, 201
    )
    account, _ = await shop.account()
    error = (await shop.post(f"/accounts/{account}/subscription", body, status))["error"]
    assert error["param"] == param, error
    assert (await shop.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"] is None
