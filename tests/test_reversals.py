"""Money going back: the debit script (from a grant first, never below what the account has available,
once per id) against real Redis, and payment orders landing as purchase grants and leaving as reversals
through Postgres, the flusher and the reconciler."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.balances import Balances, ReserveStatus
from sidecar.errors import NotInitialized, UnknownAccount
from sidecar.outbox import ledger_row
from sidecar.payments.landing import Payments
from sidecar.payments.orders import OrderStore
from sidecar.reconcile import inspect
from sidecar.services import Services, services
from sidecar.wallet import GrantTerms

from .conftest import make_settings
from .support_wallet import T0, Clock, grants, new_account, outbox
from .support_wallet import balances as balances  # the fixture
from .support_wallet import clock as clock  # the fixture

pytestmark = pytest.mark.topologies
C = 1_000_000  # one credit


async def funded(b: Balances, clock: Clock, *amounts: int) -> str:
    account = await new_account(b)
    for i, amount in enumerate(amounts):
        clock.now = T0 + i  # each grant a millisecond after the one before
        await b.credit(account, f"g{i}", amount, GrantTerms(kind="purchase"), grant_id=f"g{i}")
    return account


async def test_a_debit_draws_its_grant_first_then_the_others(balances: Balances, clock: Clock) -> None:
    account = await funded(balances, clock, 10 * C, 5 * C)
    taken = await balances.debit(account, "r1", 7 * C, grant_id="g1")
    assert (taken.taken, taken.balance, taken.now) == (7 * C, 8 * C, True)
    left = await grants(balances, account)
    assert "g1" not in left  # its 5 first, then 2 of g0
    assert left["g0"].remaining == 8 * C
    entry = (await outbox(balances, account))[-1]
    assert entry["r"] == {"account": account, "id": "r1", "amount": str(7 * C), "at": str(T0 + 1)}
    assert entry["g"] == [["g1", str(5 * C)], ["g0", str(2 * C)]]
    last: Any = await balances.redis.xrevrange(balances.keys.account(account).outbox, count=1)
    raw = last[0][1]
    row = ledger_row(raw, "0-1")
    assert row[:4] == (f"reversal:{account}:r1", account, "reversal", -7 * C)


async def test_only_grant_takes_no_more_than_is_left_of_it(balances: Balances, clock: Clock) -> None:
    account = await funded(balances, clock, 10 * C, 5 * C)
    taken = await balances.debit(account, "r1", 9 * C, grant_id="g1", only_grant=True)
    assert (taken.taken, taken.balance) == (5 * C, 10 * C)
    assert set(await grants(balances, account)) == {"g0"}
    again = await balances.debit(account, "r2", 1 * C, grant_id="g1", only_grant=True)
    assert (again.taken, again.balance) == (0, 10 * C)  # nothing left of g1; no outbox entry for 0
    assert [e for e in await outbox(balances, account) if e.get("r", {}).get("id") == "r2"] == []


async def test_a_debit_never_takes_what_holds_hold_nor_below_zero(balances: Balances, clock: Clock) -> None:
    account = await funded(balances, clock, 10 * C)
    held = await balances.reserve(account, "req1", 4 * C, T0 + 10**9, scopes=["account"])
    assert held.status is ReserveStatus.HELD
    taken = await balances.debit(account, "r1", 100 * C, grant_id="g0")
    assert (taken.taken, taken.balance) == (6 * C, 4 * C)  # the hold can still settle
    empty = await balances.debit(account, "r2", C)
    assert (empty.taken, empty.balance) == (0, 4 * C)


async def test_a_debit_is_taken_once_per_id(balances: Balances, clock: Clock) -> None:
    account = await funded(balances, clock, 10 * C)
    first, *again = await asyncio.gather(*(balances.debit(account, "r1", 3 * C) for _ in range(20)))
    assert [d.taken for d in (first, *again)] == [3 * C] * 20
    assert sum(d.now for d in (first, *again)) == 1
    assert (await balances.available(account)) == 7 * C
    assert len([e for e in await outbox(balances, account) if "r" in e]) == 1


async def test_an_expired_grant_expires_before_the_debit(balances: Balances, clock: Clock) -> None:
    account = await new_account(balances)
    await balances.credit(account, "p", 4 * C, GrantTerms(kind="promotion", expires_ms=T0 + 10))
    await balances.credit(account, "b", 6 * C, GrantTerms(kind="purchase"))
    clock.now = T0 + 11
    taken = await balances.debit(account, "r1", 8 * C, grant_id="b")
    assert (taken.taken, taken.balance) == (6 * C, 0)  # the promotion left as an expiry, not a reversal
    kinds = [next(iter(e)) for e in await outbox(balances, account)]
    assert kinds[-2:] == ["x", "r"]


async def test_unknown_accounts_and_unready_partitions_are_refused(balances: Balances, clock: Clock) -> None:
    with pytest.raises(UnknownAccount):
        await balances.debit("acct_nobody", "r1", C)
    account = await funded(balances, clock, C)
    await balances.redis.delete(balances.keys.account(account).ready)
    with pytest.raises(NotInitialized):
        await balances.debit(account, "r1", C)
    with pytest.raises(ValueError, match="amount"):
        await balances.debit(account, "r1", 0)


# ---- orders landing and reversing, through Postgres ------------------------------------------------


@pytest.fixture
async def svc(redis_url: str, database_url: str) -> AsyncIterator[Services]:
    settings = make_settings(redis_url, database_url, partitions=4, flush_claim_idle_seconds=0)
    async with services(settings) as ready:
        yield ready


def payments_of(svc: Services) -> Payments:
    return Payments(OrderStore(svc.store.pool), svc.admin, svc.balances)


async def test_an_order_lands_once_and_its_reversals_leave_once(svc: Services) -> None:
    pay = payments_of(svc)
    account = (await svc.admin.create_account())["id"]
    order = await pay.orders.create(account, "manual", credits=50 * C, amount_minor=5000, currency="usd")
    seen: list[str] = []

    async def hook(o: object) -> None:
        seen.append(getattr(o, "status", ""))

    pay.on_purchase.append(hook)
    landed = await asyncio.gather(*(pay.land(order, "wire-42") for _ in range(10)))
    assert sum(g["credited"] for g in landed) == 1
    assert seen == ["paid"] * 10
    assert (await svc.balances.available(account)) == 50 * C
    paid = await pay.orders.get(order.order_id)
    assert paid is not None
    assert (paid.status, paid.payment_ref) == ("paid", "wire-42")
    # usage spends 10; a refund of 30 and a dispute of all 50 of the same payment take back what is left
    # of the 50 asked in all, never twice, and never below zero
    await svc.admin.grant(account, 5 * C, "free", "promotion")
    refund = await asyncio.gather(*(pay.reverse(paid, "re_1", "refund", 30 * C) for _ in range(5)))
    assert [r.taken for r in refund] == [30 * C] * 5
    assert sum(r.created for r in refund) == 1
    dispute = await pay.reverse(paid, "dp_1", "dispute", 50 * C)
    assert dispute.taken == 20 * C  # 50 less the 30 refunded: the order's credits are asked back once
    assert (await svc.balances.available(account)) == 5 * C  # the promotion stays
    after = await pay.orders.get(order.order_id)
    assert after is not None
    assert after.refunded_credits == 50 * C
    await svc.flusher().drain()
    ledger = await svc.store.pool.fetch(
        "SELECT idempotency_id, kind, amount FROM ledger WHERE account_id = $1 ORDER BY created_at", account
    )
    assert [(r["kind"], r["amount"]) for r in ledger if r["kind"] == "reversal"] == [
        ("reversal", -30 * C),
        ("reversal", -20 * C),
    ]
    await svc.store.fold_balances()
    assert await svc.store.pool.fetchval("SELECT balance FROM accounts WHERE id = $1", account) == 5 * C
    report = await inspect(svc.redis, svc.keys, svc.store, stale_hold_ms=10**12)
    assert (report.accounts, report.grants) == ([], [])


async def test_a_reversal_of_an_account_that_spent_everything_takes_nothing(svc: Services) -> None:
    pay = payments_of(svc)
    account = (await svc.admin.create_account())["id"]
    order = await pay.orders.create(account, "manual", credits=10 * C, amount_minor=1000, currency="usd")
    await pay.land(order)
    taken = await svc.balances.debit(account, "spend", 10 * C)  # all of it gone
    assert taken.taken == 10 * C
    paid = await pay.orders.get(order.order_id)
    assert paid is not None
    reversal = await pay.reverse(paid, "re_1", "refund", 10 * C)
    assert (reversal.taken, reversal.created) == (0, True)
    assert (await svc.balances.available(account)) == 0
    status = await svc.store.pool.fetchval(
        "SELECT status || ' ' || taken FROM payment_reversals WHERE reversal_id = 're_1'"
    )
    assert status == "debited 0"


async def test_the_reconciler_finishes_landings_and_reversals_that_stopped_half_way(svc: Services) -> None:
    pay = payments_of(svc)
    account = (await svc.admin.create_account())["id"]
    order = await pay.orders.create(account, "manual", credits=10 * C, amount_minor=1000, currency="usd")
    # a landing that died after its grant, before the order was marked paid
    await svc.admin.grant(account, 10 * C, order.order_id, "purchase")
    # a reversal that died after it was recorded pending, before (or after) its debit
    status, asked, _ = await pay.orders.open_reversal(order, "re_1", "refund", 4 * C, 0)
    assert (status, asked) == ("pending", 4 * C)
    assert await pay.complete(older_than_seconds=3600) == 0  # too young: it may still be running
    assert await pay.complete(older_than_seconds=0) == 2
    done = await pay.orders.get(order.order_id)
    assert done is not None
    assert (done.status, done.refunded_credits) == ("paid", 4 * C)
    assert (await svc.balances.available(account)) == 6 * C
    assert await pay.complete(older_than_seconds=0) == 0  # nothing twice
    assert (await svc.balances.available(account)) == 6 * C
