"""The wallet's scripts against real Redis (one node and the cluster): grants drawn down in order, expiry
exactly once, debt paid back by the next grant, spend caps with live holds, all on a controlled clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sidecar.balances import Balances, ReserveStatus
from sidecar.keys import as_text
from sidecar.outbox import UsageEvent
from sidecar.wallet import DAY_MS, Grant, GrantTerms, cap_scopes, draw, periods

from .support_wallet import IDLE_MS, T0, Clock, grants, new_account, outbox
from .support_wallet import balances as balances  # the fixture
from .support_wallet import clock as clock  # the fixture

pytestmark = pytest.mark.topologies


async def charge(b: Balances, account: str, request_id: str, amount: int, **event: Any) -> None:
    # a hold of nothing (always taken), then the charge: a settle may debit past the balance
    held = await b.reserve(account, request_id, 0, T0 + 1000 * DAY_MS, scopes=["account"])
    assert held.status is ReserveStatus.HELD, held
    await b.settle(account, request_id, amount, UsageEvent(**event))


# ---- draw-down order ------------------------------------------------------------------------------

# (grant id, amount, terms) — a table exercising each tie-break: the soonest end, then priority, then age.
TABLE = [
    ("paid-old", 500, GrantTerms("purchase", effective_ms=T0 - 3 * DAY_MS)),
    ("paid-new", 500, GrantTerms("purchase", effective_ms=T0 - 1 * DAY_MS)),
    ("promo-soon", 100, GrantTerms("promotion", expires_ms=T0 + 2 * DAY_MS)),
    ("bonus-later", 100, GrantTerms("bonus", expires_ms=T0 + 9 * DAY_MS)),
    ("starter-idle", 300, GrantTerms("starter")),  # ends 30 idle days after the last activity
    ("refund-prio", 200, GrantTerms("refund", priority=5, effective_ms=T0 - 2 * DAY_MS)),
    ("sub-prio", 200, GrantTerms("subscription", priority=5, effective_ms=T0 - 5 * DAY_MS)),
]


@pytest.mark.parametrize("charges", [[50], [150, 60], [250, 300, 1], [1900], [2500], [7] * 40])
async def test_usage_draws_grants_soonest_ending_then_priority_then_oldest(
    balances: Balances, charges: list[int]
) -> None:
    b = balances
    account = await new_account(b)
    for gid, amount, terms in TABLE:
        await b.credit(account, gid, amount, terms)
    total = sum(a for _, a, _ in TABLE)
    for i, c in enumerate(charges):
        expected = draw(list((await grants(b, account)).values()), c, T0, IDLE_MS)
        await charge(b, account, f"r{i}", c)
        entry = (await outbox(b, account))[-1]
        assert [(g, int(a)) for g, a in entry.get("g", [])] == expected
    left = await grants(b, account)
    spent = sum(charges)
    assert sum(g.remaining for g in left.values()) == max(total - spent, 0)
    view = await b.balance(account)
    assert view.balance == total - spent  # below zero: what no grant covered
    # The first draws follow the table's order: the promotion ending in 2 days, the bonus in 9, the
    # starter (idle: 30 days), then the never-ending ones by priority (5: subscription before refund by
    # age), then the purchases oldest first.
    order = [
        g
        for g, _ in draw(
            [
                Grant(g, a, t.expires_ms, t.drawn_priority, t.effective_ms or T0, t.idle_expiry, t.kind)
                for g, a, t in TABLE
            ],
            total,
            T0,
            IDLE_MS,
        )
    ]
    assert order == [
        "promo-soon",
        "bonus-later",
        "starter-idle",
        "sub-prio",
        "refund-prio",
        "paid-old",
        "paid-new",
    ]


# ---- expiry ---------------------------------------------------------------------------------------


async def test_a_grant_expires_once_under_concurrent_settles_and_sweeps(
    balances: Balances, clock: Clock
) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "promo", 1000, GrantTerms("promotion", expires_ms=T0 + DAY_MS))
    await b.credit(account, "paid", 5000, GrantTerms("purchase"))
    for i in range(40):
        assert (await b.reserve(account, f"r{i}", 10, T0 + 100 * DAY_MS)).status is ReserveStatus.HELD
    clock.now = T0 + DAY_MS  # the promotion's end: 40 settles and 5 sweeps race to expire it
    results = await asyncio.gather(
        *(b.settle(account, f"r{i}", 10) for i in range(40)), *(b.expire_grants() for _ in range(5))
    )
    entries = await outbox(b, account)
    expiries = [e["x"] for e in entries if "x" in e]
    assert expiries == [{"account": account, "grant": "promo", "amount": "1000", "at": str(T0 + DAY_MS)}]
    assert sum(r for r in results[40:] if isinstance(r, int)) in (0, 1000)
    drawn = [g for e in entries if "g" in e for g in e["g"]]
    assert {gid for gid, _ in drawn} == {"paid"}  # an ended grant is never drawn
    assert (await b.balance(account)).balance == 5000 - 400
    assert await b.expire_grants() == 0  # nothing twice
    assert set(await grants(b, account)) == {"paid"}


async def test_free_credits_expire_after_the_account_is_idle_and_activity_moves_that(
    balances: Balances, clock: Clock
) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "starter", 700, GrantTerms("starter"))
    clock.now = T0 + IDLE_MS - 1
    await charge(b, account, "r1", 100)  # activity: the idle clock starts again
    clock.now = T0 + IDLE_MS + DAY_MS
    assert await b.expire_grants() == 0
    assert (await grants(b, account))["starter"].remaining == 600
    clock.now = T0 + 2 * IDLE_MS - 1 + 1  # 30 days after the last activity
    assert await b.expire_grants() == 600
    assert await b.expire_grants() == 0
    assert (await b.balance(account)).balance == 0
    [expiry] = [e["x"] for e in await outbox(b, account) if "x" in e]
    assert expiry["amount"] == "600"
    assert expiry["at"] == str(T0 + 2 * IDLE_MS - 1)


async def test_a_reserve_does_not_count_credits_that_ended(balances: Balances, clock: Clock) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "promo", 1000, GrantTerms("promotion", expires_ms=T0 + DAY_MS))
    assert (await b.reserve(account, "r1", 1000, T0 + 100 * DAY_MS)).status is ReserveStatus.HELD
    await b.settle(account, "r1", 0)
    clock.now = T0 + DAY_MS
    refused = await b.reserve(account, "r2", 1, T0 + 100 * DAY_MS)
    assert (refused.status, refused.balance) == (ReserveStatus.INSUFFICIENT, 0)
    assert len([e for e in await outbox(b, account) if "x" in e]) == 1


async def test_a_grant_that_ends_under_a_live_hold_keeps_what_the_hold_needs(
    balances: Balances, clock: Clock
) -> None:
    """Seen before (by reading): a grant's fixed end passed while a hold admitted against it was live, the
    whole remainder left the balance (below what was held) and the settle took the balance below zero,
    although no hold had been reaped."""
    b = balances
    account = await new_account(b)
    await b.credit(account, "forever", 1, GrantTerms("purchase"))
    await b.credit(account, "sub", 1000, GrantTerms("subscription", expires_ms=T0 + DAY_MS))
    assert (await b.reserve(account, "r1", 1000, T0 + 100 * DAY_MS)).status is ReserveStatus.HELD
    clock.now = T0 + DAY_MS + 5  # past the grant's end, inside the hold's lease
    result = await b.settle(account, "r1", 1000)
    assert result.balance == 0  # the hold's 1000: 999 the ended grant kept for it, then 1 of "forever"
    assert (await b.balance(account)).balance == 0
    [expiry] = [e["x"] for e in await outbox(b, account) if "x" in e]
    # what the hold did not need expired (at the grant's end); the rest was drawn, nothing is left
    at = str(T0 + DAY_MS)
    assert expiry == {"account": account, "grant": "sub", "amount": "1", "at": at, "left": "999"}
    [drawn] = [e["g"] for e in await outbox(b, account) if "g" in e]
    assert drawn == [["sub", "999"], ["forever", "1"]]
    assert await grants(b, account) == {}


async def test_an_ended_grant_held_back_for_holds_expires_once_they_no_longer_need_it(
    balances: Balances, clock: Clock
) -> None:
    """The part of an ended grant that live holds need stays (no new hold can take it); each script that
    touches the account after a settle or release, or the sweeper, expires what they no longer need, each
    part once, under its own ledger id."""
    b = balances
    account = await new_account(b)
    await b.credit(account, "forever", 100, GrantTerms("purchase"))
    await b.credit(account, "promo", 1000, GrantTerms("promotion", expires_ms=T0 + DAY_MS))
    for rid, amount in (("r1", 600), ("r2", 400)):
        assert (await b.reserve(account, rid, amount, T0 + 100 * DAY_MS)).status is ReserveStatus.HELD
    clock.now = T0 + DAY_MS
    assert await b.expire_grants() == 100  # 1100 - 1000 held: the rest stays for the holds
    assert await b.expire_grants() == 0
    assert (await grants(b, account))["promo"].remaining == 900
    assert (await b.balance(account)).balance == 1000
    refused = await b.reserve(account, "r3", 1, T0 + 100 * DAY_MS)  # nothing the ended grant kept
    assert refused.status is ReserveStatus.INSUFFICIENT
    # r1 draws on "promo" first (800 left of it), its hold released: of the 900 then, r2's 400 need 400
    # (300 of promo, 100 of forever), so 500 of promo expire after the usage entry (its b: 900)
    assert (await b.settle(account, "r1", 100)).balance == 400
    assert [(e["g"], e["b"]) for e in await outbox(b, account) if "g" in e] == [([["promo", "100"]], 900)]
    assert (await grants(b, account))["promo"].remaining == 300
    clock.now = T0 + DAY_MS + 7
    assert await b.expire_hold(account, "r2", T0 + 200 * DAY_MS) == 400  # reaped: nothing needs it now
    assert await b.expire_grants() == 300
    assert await b.expire_grants() == 0
    assert set(await grants(b, account)) == {"forever"}
    assert (await b.balance(account)).balance == 100
    assert not await b.redis.zscore(b.keys.account(account).wallet_due, account)  # nothing due any more
    expiries = [e["x"] for e in await outbox(b, account) if "x" in e]
    assert expiries == [
        {"account": account, "grant": "promo", "amount": "100", "at": str(T0 + DAY_MS), "left": "900"},
        {"account": account, "grant": "promo", "amount": "500", "at": str(T0 + DAY_MS), "left": "300"},
        {"account": account, "grant": "promo", "amount": "300", "at": str(T0 + DAY_MS + 7)},
    ]


async def test_a_grant_pays_back_a_negative_balance_first(balances: Balances) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "first", 100, GrantTerms("purchase"))
    assert (await b.reserve(account, "r1", 100, T0 + DAY_MS)).status is ReserveStatus.HELD
    await b.settle(account, "r1", 130)  # usage beyond the hold: 30 below zero
    assert (await b.balance(account)).balance == -30
    assert await b.credit(account, "second", 50, GrantTerms("purchase")) == (True, 20)
    assert (await grants(b, account))["second"].remaining == 20
    payoffs = [e["p"] for e in await outbox(b, account) if "p" in e]
    assert [(p["grant"], p["amount"]) for p in payoffs] == [("second", "30")]
    assert await b.credit(account, "second", 50, GrantTerms("purchase")) == (False, 20)  # once
    assert len([e for e in await outbox(b, account) if "p" in e]) == 1


async def test_older_balances_without_grants_are_drawn_after_every_grant(balances: Balances) -> None:
    b = balances
    account = await new_account(b)
    await b.redis.hset(b.keys.account(account).balance, "balance", 1000)  # credits from before grants
    await b.credit(account, "promo", 100, GrantTerms("promotion"))
    await charge(b, account, "r1", 150)
    assert (await outbox(b, account))[-1]["g"] == [["promo", "100"]]
    assert (await b.balance(account)).balance == 950
    assert await grants(b, account) == {}


# ---- spend caps -----------------------------------------------------------------------------------


async def set_cap(b: Balances, account: str, scope: str, period: str, limit: int) -> None:
    await b.redis.hset(b.keys.account(account).caps, f"{scope}|{period}", str(limit))


@pytest.mark.parametrize("scope", ["account", "key:k1", "model:m1", "user:alice", "user:*"])
async def test_200_concurrent_reserves_never_overshoot_a_cap(
    balances: Balances, clock: Clock, scope: str
) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "paid", 10**9, GrantTerms("purchase"))
    await set_cap(b, account, scope, "day", 1370)
    scopes = cap_scopes("k1", "m1", "alice")
    replies = await asyncio.gather(
        *(b.reserve(account, f"r{i}", 10, T0 + DAY_MS, scopes=scopes) for i in range(200))
    )
    held = [r for r in replies if r.status is ReserveStatus.HELD]
    capped = [r for r in replies if r.status is ReserveStatus.CAPPED]
    assert (len(held), len(capped)) == (137, 63)
    cap = capped[0].cap
    assert cap is not None
    assert (cap.scope, cap.period, cap.limit) == (scope, "day", 1370)
    assert cap.resets_ms == periods(T0).day_ends_ms
    # Settling releases the holds and counts the charges: the cap stays spent for the day, not the next.
    for i, r in enumerate(replies):
        if r.status is ReserveStatus.HELD:
            await b.settle(account, f"r{i}", 10, UsageEvent(key_id="k1", model="m1", user="alice"))
    assert (await b.reserve(account, "again", 10, T0 + DAY_MS, scopes=scopes)).status is ReserveStatus.CAPPED
    assert (await b.reserve(account, "small", 0, T0 + DAY_MS, scopes=scopes)).status is ReserveStatus.HELD
    clock.now = T0 + DAY_MS
    assert (
        await b.reserve(account, "tomorrow", 10, T0 + 2 * DAY_MS, scopes=scopes)
    ).status is ReserveStatus.HELD


async def test_a_cap_counts_live_holds_and_a_reaped_hold_gives_its_part_back(balances: Balances) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "paid", 10**6, GrantTerms("purchase"))
    await set_cap(b, account, "account", "total", 100)
    scopes = cap_scopes(None, "m1", None)
    assert (await b.reserve(account, "r1", 80, T0 + 1000, scopes=scopes)).status is ReserveStatus.HELD
    assert (await b.reserve(account, "r2", 30, T0 + 1000, scopes=scopes)).status is ReserveStatus.CAPPED
    assert await b.expire_hold(account, "r1", T0 + 2000) == 80
    assert (await b.reserve(account, "r3", 100, T0 + 1000, scopes=scopes)).status is ReserveStatus.HELD
    held = await b.redis.hgetall(b.keys.account(account).cap_held)
    assert {as_text(k): int(v) for k, v in held.items()} == {"account": 100, "model:m1": 100}


async def test_a_user_cap_of_its_own_wins_over_the_default_and_others_get_the_default(
    balances: Balances,
) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "paid", 10**6, GrantTerms("purchase"))
    await set_cap(b, account, "user:*", "month", 50)
    await set_cap(b, account, "user:vip", "month", 500)
    for user, fits in (("vip", 400), ("bob", 50), ("carol", 50)):
        s = cap_scopes(None, None, user)
        assert (await b.reserve(account, f"{user}1", fits, T0 + 1000, scopes=s)).status is ReserveStatus.HELD
        over = await b.reserve(account, f"{user}2", 101, T0 + 1000, scopes=s)
        assert over.status is ReserveStatus.CAPPED
        assert over.cap is not None
        assert over.cap.scope == ("user:vip" if user == "vip" else "user:*")


async def test_caps_follow_the_accounts_time_zone(balances: Balances, clock: Clock) -> None:
    b = balances
    account = await new_account(b)
    await b.credit(account, "paid", 10**6, GrantTerms("purchase"))
    await b.redis.hset(b.keys.account(account).caps, mapping={"account|day": "100", "tz": "Asia/Tokyo"})
    clock.now = T0 + 15 * 3_600_000 - 1  # 2027-01-15T22:59:59.999Z: 07:59 on the 16th in Tokyo
    assert (await b.reserve(account, "r1", 100, T0 + DAY_MS, scopes=["account"])).status is ReserveStatus.HELD
    await b.settle(account, "r1", 100)
    assert await b.redis.hget(b.keys.account(account).spend("d2027-01-16"), "account") == b"100"
    refused = await b.reserve(account, "r2", 1, T0 + DAY_MS, scopes=["account"])
    assert refused.status is ReserveStatus.CAPPED
    assert refused.cap is not None
    assert refused.cap.resets_ms == periods(clock.now, "Asia/Tokyo").day_ends_ms  # Tokyo's midnight
    clock.now = T0 + 16 * 3_600_000  # 2027-01-16T00:00Z, still the 16th in Tokyo (09:00)
    assert (await b.reserve(account, "r3", 1, T0 + DAY_MS, scopes=["account"])).status is ReserveStatus.CAPPED
    clock.now = T0 + 31 * 3_600_000  # 15:00Z, midnight in Tokyo: the 17th there, still the 16th in UTC
    assert (await b.reserve(account, "r4", 100, T0 + DAY_MS, scopes=["account"])).status is ReserveStatus.HELD
