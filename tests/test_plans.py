"""Subscription plans: each period's included credits arrive once as a `subscription` grant that ends with
the period (drawn before purchased credits), on a controlled clock; two workers or a restart grant a period
once; a change waits for the next period, a cancel grants nothing more; unused credits expire at the end
(the ledger's expiry row) or roll over as the plan says; bad input and bad settings are named."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.balances import ReserveStatus
from sidecar.config import load_settings
from sidecar.documents.plan_periods import period, period_at
from sidecar.documents.plans import grant_key
from sidecar.errors import ConfigError
from sidecar.outbox import UsageEvent

from .conftest import SidecarFactory
from .support_plans import FEB28, JAN31, MAR31, PLAN_SETTINGS, C, Scene, iso, ms, new_sidecar
from .support_wallet import Clock, grants

pytestmark = pytest.mark.topologies


# ---- periods (pure) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("anchor", "tz", "kind", "index", "start", "end"),
    [
        ("2027-01-31T10:00+00:00", "UTC", "month", 1, "2027-02-28T10:00+00:00", "2027-03-31T10:00+00:00"),
        ("2028-01-31T10:00+00:00", "UTC", "month", 1, "2028-02-29T10:00+00:00", "2028-03-31T10:00+00:00"),
        ("2027-01-31T10:00+00:00", "UTC", "month", 3, "2027-04-30T10:00+00:00", "2027-05-31T10:00+00:00"),
        ("2027-01-15T00:00+00:00", "UTC", "month", 11, "2027-12-15T00:00+00:00", "2028-01-15T00:00+00:00"),
        ("2028-02-29T12:00+00:00", "UTC", "year", 1, "2029-02-28T12:00+00:00", "2030-02-28T12:00+00:00"),
        ("2028-02-29T12:00+00:00", "UTC", "year", 4, "2032-02-29T12:00+00:00", "2033-02-28T12:00+00:00"),
        # local midnight in Berlin, across the DST change (Mar 28, 2027): the offset follows the wall clock
        ("2027-01-01T00:00+01:00", "Europe/Berlin", "month", 3, "2027-04-01T00:00+02:00",
         "2027-05-01T00:00+02:00"),
        ("2027-01-31T00:00-05:00", "America/New_York", "month", 1, "2027-02-28T00:00-05:00",
         "2027-03-31T00:00-04:00"),
        # a wall time the spring change skips (Mar 14, 2027, 02:00-03:00 in New York): zoneinfo's fold 0,
        # an hour on; the next period is back at 02:30
        ("2027-02-14T02:30-05:00", "America/New_York", "month", 1, "2027-03-14T03:30-04:00",
         "2027-04-14T02:30-04:00"),
        # a wall time the fall change repeats (Nov 7, 2027, 01:00-02:00): the first of the two (EDT)
        ("2027-10-07T01:30-04:00", "America/New_York", "month", 1, "2027-11-07T01:30-04:00",
         "2027-12-07T01:30-05:00"),
        # Berlin's fall change (Oct 31, 2027) and a 31st clamped to Nov 30, on local midnight throughout
        ("2027-08-31T00:00+02:00", "Europe/Berlin", "month", 2, "2027-10-31T00:00+02:00",
         "2027-11-30T00:00+01:00"),
        # the southern hemisphere: Sydney leaves DST on Apr 4, 2027 (+11 -> +10); Mar 31 clamps to Apr 30
        ("2027-03-31T09:00+11:00", "Australia/Sydney", "month", 1, "2027-04-30T09:00+10:00",
         "2027-05-31T09:00+10:00"),
        # the local date is not UTC's: Jan 31 23:30 UTC is Feb 1 in Tokyo, so the periods start on the 1st
        ("2027-01-31T23:30+00:00", "Asia/Tokyo", "month", 1, "2027-03-01T08:30+09:00",
         "2027-04-01T08:30+09:00"),
        # a Feb 29 anchor, monthly: the 29th, and Feb 28 in a common year
        ("2028-02-29T12:00+00:00", "UTC", "month", 1, "2028-03-29T12:00+00:00", "2028-04-29T12:00+00:00"),
        ("2028-02-29T12:00+00:00", "UTC", "month", 12, "2029-02-28T12:00+00:00", "2029-03-29T12:00+00:00"),
        # years: one holding Feb 29 is 366 days; a yearly plan in a zone keeps its local time
        ("2027-03-01T00:00+00:00", "UTC", "year", 1, "2028-03-01T00:00+00:00", "2029-03-01T00:00+00:00"),
        ("2027-01-31T12:00+01:00", "Europe/Berlin", "year", 1, "2028-01-31T12:00+01:00",
         "2029-01-31T12:00+01:00"),
    ],
)  # fmt: skip
def test_a_period_starts_on_the_anchors_day_clamped_to_the_month(
    anchor: str, tz: str, kind: str, index: int, start: str, end: str
) -> None:
    p = period(ms(anchor), tz, kind, index)
    assert (p.start_ms, p.end_ms) == (ms(start), ms(end)), (iso(p.start_ms, tz), iso(p.end_ms, tz))
    assert period_at(ms(anchor), tz, kind, p.start_ms) == p  # its first instant is in it
    assert period_at(ms(anchor), tz, kind, p.end_ms - 1) == p  # its last too
    assert period_at(ms(anchor), tz, kind, p.end_ms).index == index + 1  # the end is the next one's


def test_period_zero_starts_at_the_anchor_itself() -> None:
    p = period(JAN31 + 1234, "UTC", "month", 0)
    assert (p.start_ms, p.end_ms) == (JAN31 + 1234, FEB28 + 1234)
    assert period_at(JAN31, "UTC", "month", JAN31 - 5).index == 0


# ---- the sidecar ----------------------------------------------------------------------------------------


@pytest.fixture
async def scene(make_sidecar: SidecarFactory) -> Scene:
    clock = Clock()
    clock.now = JAN31
    return Scene(await new_sidecar(make_sidecar), clock)


async def test_the_catalog_and_a_start_that_grants_the_first_period_now(scene: Scene) -> None:
    account, key = await scene.account()
    headers = {"Authorization": f"Bearer {key}"}
    catalog = await (await scene.sc.client.get("/v1/plans", headers=headers)).json()
    basic = next(p for p in catalog["data"] if p["id"] == "basic")
    assert basic == {"id": "basic", "title": "Basic", "price": 900, "period": "month",
                     "included_credits": 10 * C, "rollover": "none", "rollover_cap": None,
                     "billing": "operator", "stripe_price": None}  # fmt: skip
    own = await (await scene.sc.client.get("/v1/subscription", headers=headers)).json()
    assert own == {"account": account, "subscription": None}
    sub = await scene.subscribe(account, "basic")
    assert sub["period"] == {"index": 0, "start": "2027-01-31T10:00:00Z", "end": "2027-02-28T10:00:00Z",
                             "granted": 10 * C, "carried": 0, "invoice": None}  # fmt: skip
    assert sub["stripe_subscription"] is None
    (g,) = (await grants(scene.sc.balances, account)).values()
    assert (g.grant_id, g.kind, g.remaining, g.expires_ms) == (
        grant_key(sub["id"], 0),
        "subscription",
        10 * C,
        FEB28,
    )
    own = await (await scene.sc.client.get("/v1/subscription", headers=headers)).json()
    assert own["subscription"]["plan"] == "basic"
    await scene.post(f"/accounts/{account}/subscription", {"plan": "pro"}, 409)  # one active at a time


async def test_usage_draws_the_subscription_credits_before_purchased_ones(scene: Scene) -> None:
    account, _ = await scene.account(purchased=100 * C)
    sub = await scene.subscribe(account, "basic")
    await scene.spend(account, 4 * C)
    left = {g.kind: g.remaining for g in (await grants(scene.sc.balances, account)).values()}
    assert left == {"subscription": 6 * C, "purchase": 100 * C}
    await scene.spend(account, 8 * C)  # 6 from the subscription, the rest from the purchase
    left = {g.kind: g.remaining for g in (await grants(scene.sc.balances, account)).values()}
    assert left == {"purchase": 98 * C}
    assert sub["plan"] == "basic"


async def test_two_workers_at_a_period_boundary_grant_it_once(
    scene: Scene, make_sidecar: SidecarFactory
) -> None:
    other = Scene(await new_sidecar(make_sidecar, key_prefix=scene.sc.settings.key_prefix), scene.clock)
    account, _ = await scene.account()
    sub = await scene.subscribe(account, "basic")
    scene.clock.now = FEB28
    made = await asyncio.gather(*(p.run_pass() for p in (scene.plans, other.plans) for _ in range(3)))
    assert sum(made) == 1
    assert await scene.periods(sub["id"]) == [(0, "basic", 10 * C, 0), (1, "basic", 10 * C, 0)]
    ins = [i for i, _ in await scene.ledger(account, "subscription")]
    assert ins == [f"in:{account}:{grant_key(sub['id'], 0)}", f"in:{account}:{grant_key(sub['id'], 1)}"]
    assert (await scene.sc.balance(account))["balance"] == 10 * C  # period 0's ended at its end
    assert await scene.plans.run_pass() + await other.plans.run_pass() == 0  # nothing more due


async def test_a_grant_made_before_a_crash_is_not_made_again_after_the_restart(
    scene: Scene, make_sidecar: SidecarFactory
) -> None:
    account, _ = await scene.account()
    sub = await scene.subscribe(account, "basic")
    scene.clock.now = FEB28 + 1000
    p = period(JAN31, "UTC", "month", 1)
    await scene.plans._grant(account, sub["id"], 10 * C, p)  # granted; the period row never written
    restarted = Scene(await new_sidecar(make_sidecar, key_prefix=scene.sc.settings.key_prefix), scene.clock)
    assert await restarted.plans.run_pass() == 1
    assert len(await scene.ledger(account, "subscription")) == 2  # the same key: credited once
    assert (await scene.sc.balance(account))["balance"] == 10 * C  # period 1's (period 0's ended)
    assert [i for i, *_ in await scene.periods(sub["id"])] == [0, 1]


async def test_missed_periods_are_not_caught_up_only_the_current_one_is_granted(scene: Scene) -> None:
    account, _ = await scene.account()
    sub = await scene.subscribe(account, "basic")
    scene.clock.now = ms("2027-05-01T00:00+00:00")  # periods 1 and 2 passed unseen; 3 is current
    assert await scene.plans.run_pass() == 1
    assert [i for i, *_ in await scene.periods(sub["id"])] == [0, 3]
    view = (await scene.post(f"/accounts/{account}/subscription/change", {"plan": "basic"}))["subscription"]
    assert view["period"]["end"] == "2027-05-31T10:00:00Z"


async def test_periods_follow_the_accounts_wall_clock_across_a_dst_change(scene: Scene) -> None:
    account, _ = await scene.account()
    await scene.sc.admin("PUT", f"/accounts/{account}/time-zone", {"time_zone": "America/New_York"})
    scene.clock.now = ms("2027-01-31T00:00-05:00")  # local midnight, EST
    sub = await scene.subscribe(account, "basic")
    assert (sub["time_zone"], sub["period"]["end"]) == ("America/New_York", "2027-02-28T05:00:00Z")
    assert await scene.plans.run_pass(ms("2027-02-28T00:00-05:00") - 1) == 0
    assert await scene.plans.run_pass(ms("2027-02-28T00:00-05:00")) == 1
    view = (await scene.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"]
    assert view["period"]["end"] == "2027-03-31T04:00:00Z"  # local midnight again, now EDT: 23 hours less
    g = (await grants(scene.sc.balances, account))[grant_key(sub["id"], 1)]
    assert g.expires_ms == ms("2027-03-31T00:00-04:00")


async def test_a_change_of_plan_takes_effect_at_the_next_period(scene: Scene) -> None:
    account, _ = await scene.account()
    sub = await scene.subscribe(account, "basic")
    scene.clock.now = JAN31 + 10 * 86_400_000  # mid-period
    changed = (await scene.post(f"/accounts/{account}/subscription/change", {"plan": "pro"}))["subscription"]
    assert (changed["plan"], changed["next_plan"]) == ("basic", "pro")
    assert changed["period"]["granted"] == 10 * C  # nothing changes now: no grant, no proration
    assert (await scene.sc.balance(account))["balance"] == 10 * C
    assert await scene.plans.run_pass(FEB28 - 1) == 0  # not yet
    assert await scene.plans.run_pass(FEB28) == 1
    assert await scene.periods(sub["id"]) == [(0, "basic", 10 * C, 0), (1, "pro", 50 * C, 0)]
    view = (await scene.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"]
    assert (view["plan"], view["next_plan"]) == ("pro", None)
    await scene.post(f"/accounts/{account}/subscription/change", {"plan": "yearly"}, 400)  # another period


async def test_a_cancel_grants_nothing_more_and_the_current_grant_runs_to_its_end(scene: Scene) -> None:
    account, _ = await scene.account()
    sub = await scene.subscribe(account, "basic")
    canceled = (await scene.post(f"/accounts/{account}/subscription/cancel"))["subscription"]
    assert canceled["status"] == "canceled"
    assert await scene.sc.balances.expire_grants(FEB28 - 1) == 0  # still there until the period's end
    assert (await scene.sc.balance(account))["balance"] == 10 * C
    assert await scene.plans.run_pass(MAR31) == 0
    assert [i for i, *_ in await scene.periods(sub["id"])] == [0]
    await scene.post(f"/accounts/{account}/subscription/cancel", None, 404)  # nothing active to cancel
    again = await scene.subscribe(account, "pro")  # a new subscription may start
    assert again["id"] != sub["id"]


async def test_unused_credits_expire_at_the_period_end_in_the_ledger(scene: Scene) -> None:
    account, _ = await scene.account(purchased=5 * C)
    sub = await scene.subscribe(account, "basic")
    await scene.spend(account, 3 * C)
    scene.clock.now = FEB28
    assert await scene.sc.balances.expire_grants(FEB28) == 7 * C
    await scene.flush()
    key = grant_key(sub["id"], 0)
    assert await scene.ledger(account, "expiry") == [(f"expiry:{account}:{key}", -7 * C)]
    assert (await scene.sc.balance(account))["balance"] == 5 * C  # the purchase is left whole


@pytest.mark.parametrize(("plan", "carried"), [("carry", 3 * C), ("keep", 8 * C)])
async def test_a_rollover_carries_what_expired_capped_once_the_ledger_has_it(
    scene: Scene, plan: str, carried: int
) -> None:
    account, _ = await scene.account()
    sub = await scene.subscribe(account, plan)
    await scene.spend(account, 2 * C)  # 8 unused
    scene.clock.now = FEB28
    assert await scene.plans.run_pass() == 1  # period 1's grant; its rollover waits for the expiry
    assert (await scene.periods(sub["id"]))[1][3] is None
    await scene.sc.balances.expire_grants(FEB28)
    assert await scene.plans.run_pass() == 0  # expired in Redis, not in the ledger yet
    await scene.flush()
    assert await scene.plans.run_pass() == 1
    assert await scene.plans.run_pass() == 0  # once
    assert (await scene.periods(sub["id"]))[1][3] == carried
    left = sorted(
        (g.grant_id, g.remaining, g.expires_ms) for g in (await grants(scene.sc.balances, account)).values()
    )
    want = [(grant_key(sub["id"], 1), 10 * C, MAR31), (grant_key(sub["id"], 1, carry=True), carried, MAR31)]
    assert left == sorted(want)


async def test_a_rollover_carries_every_part_of_an_expiry_a_live_hold_split(scene: Scene) -> None:
    """A period's grant that ends under a live hold expires in parts (what the hold does not need at the
    end, the rest once its settle drew on it): the rollover carries them all."""
    account, _ = await scene.account(purchased=2 * C)
    sub = await scene.subscribe(account, "keep")
    b = scene.sc.balances
    assert (await b.reserve(account, "req_long", 10 * C, MAR31)).status is ReserveStatus.HELD
    scene.clock.now = FEB28
    assert await b.expire_grants(FEB28) == 2 * C  # 12 - 10 held: the hold keeps 8 of the period's 10
    scene.clock.now = FEB28 + 1_000
    await b.settle(account, "req_long", 4 * C, UsageEvent(route="chat"))  # 4 of the kept 8; 4 expire
    assert await scene.plans.run_pass() == 1  # period 1's grant
    await scene.flush()
    assert await scene.plans.run_pass() == 1  # the carry: both parts
    assert (await scene.periods(sub["id"]))[1][3] == 6 * C
    ended = grant_key(sub["id"], 0)
    assert await scene.ledger(account, "expiry") == [
        (f"expiry-part:{account}:{ended}:{8 * C}", -2 * C),
        (f"expiry:{account}:{ended}", -4 * C),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"plan": "gold"}, "plan"), ({}, "plan"), ({"plan": 5}, "plan"), ({"plan": "basic", "x": 1}, "x")],
)
async def test_bad_input_is_a_400_naming_the_field_and_changes_nothing(
    scene: Scene, body: dict[str, Any], field: str
) -> None:
    account, _ = await scene.account()
    error = (await scene.post(f"/accounts/{account}/subscription", body, 400))["error"]
    assert error["param"] == field, error
    assert (await scene.sc.admin("GET", f"/accounts/{account}/subscription"))["subscription"] is None
    assert (await scene.sc.balance(account))["balance"] == 0
    await scene.post("/accounts/nobody/subscription", {"plan": "basic"}, 404)
    await scene.post("/accounts/a%00b/subscription/cancel", None, 404)


@pytest.mark.parametrize(
    ("plan", "param"),
    [
        ({"included_credits": 0}, "plans.pro.included_credits"),
        ({"included_credits": 1, "price": -1}, "plans.pro.price"),
        ({"included_credits": 1, "rollover": "capped"}, "plans.pro.rollover_cap"),
        ({"included_credits": 1, "rollover_cap": 5}, "plans.pro.rollover_cap"),
        ({"included_credits": 1, "billing": "provider"}, "plans.pro.stripe_price"),
        ({"included_credits": 1, "stripe_price": "price_1"}, "plans.pro.stripe_price"),
        ({"included_credits": 1, "billing": "provider", "stripe_price": "prod_1"}, "plans.pro.stripe_price"),
        ({"included_credits": 1, "billing": "provider", "stripe_price": "price_1"}, "stripe_webhook_secrets"),
    ],
)
def test_settings_errors_name_the_setting(plan: dict[str, Any], param: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={}, overrides={"plans": {"pro": plan}})  # not this process's environment
    assert raised.value.param == param
    assert load_settings(environ={}, overrides={"plans": PLAN_SETTINGS}).plans["carry"].rollover_cap == 3 * C
