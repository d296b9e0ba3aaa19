"""The reconciler as a job: every drift kind (balance, held, orphan and stale holds, money in not applied)
is found, exported per kind in /metrics, and repaired idempotently (twice, or by two processes at once,
is once).

Real Redis (one node and the cluster), real Postgres; the drift is made by hand in Redis or the ledger.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest

from sidecar.app import services
from sidecar.reconcile import DRIFT_KINDS, inspect, reconcile
from sidecar.repair import repair_accounts, repair_all
from sidecar.services import Services

from .conftest import Sidecar, SidecarFactory
from .support import Samples, scrape, value

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

FAR = 2**50  # a lease end that never comes
NO_REAPER = {"reaper_interval_seconds": 3600}  # a reaper that never runs in a test: holds go stale


async def _account(sc: Sidecar, micro: int) -> str:
    account, _ = await sc.account(micro)
    return account


async def balance_drift(sc: Sidecar) -> tuple[str, int]:
    """Redis' balance 777 above the ledger's (a hand edit, a restored snapshot)."""
    account = await _account(sc, 1_000_000)
    await sc.services.redis.hincrby(sc.services.keys.account(account).balance, "balance", 777)
    return account, 777


async def held_drift(sc: Sidecar) -> tuple[str, int]:
    """`held` says 900,000 while the one hold is 300,000."""
    account = await _account(sc, 1_000_000)
    await sc.balances.reserve(account, "r-held", 300_000, FAR)
    await sc.services.redis.hset(sc.services.keys.account(account).balance, "held", "900000")
    return account, 600_000


async def orphan_hold(sc: Sidecar) -> tuple[str, int]:
    """A hold whose hold-expiry member is gone: no reaper would ever release it."""
    account = await _account(sc, 1_000_000)
    await sc.balances.reserve(account, "r-orphan", 200_000, FAR)
    k = sc.services.keys.account(account)
    assert await sc.services.redis.zrem(k.hold_expiry, k.expiry_member("r-orphan")) == 1
    return account, 200_000


async def stale_hold(sc: Sidecar) -> tuple[str, int]:
    """A hold whose lease ended long ago and that no reaper released (NO_REAPER)."""
    account = await _account(sc, 1_000_000)
    await sc.balances.reserve(account, "r-stale", 250_000, 1_000)
    return account, 250_000


async def grant_unapplied(sc: Sidecar) -> tuple[str, int]:
    """A grant's ledger row from two minutes ago that Redis never got, and cannot get: its partition lost
    its ready marker (Redis not rebuilt yet). Restore it with `_ready_again`."""
    svc = sc.services
    account = await _account(sc, 0)
    gid = f"in:{account}:{uuid.uuid4().hex[:8]}"
    await svc.store.record_money_in(gid, account, "grant", 5_000, None)
    async with svc.store.pool.acquire() as conn, conn.transaction():
        for table in ("money_in_keys", "ledger"):
            await conn.execute(
                f"UPDATE {table} SET created_at = created_at - interval '2 minutes'"
                " WHERE idempotency_id = $1",
                gid,
            )
    await svc.redis.delete(svc.keys.account(account).ready)
    return account, 5_000


async def _ready_again(svc: Services, account: str) -> None:
    await svc.redis.set(svc.keys.account(account).ready, "1")


Maker = Callable[[Sidecar], Awaitable[tuple[str, int]]]
MAKERS: dict[str, Maker] = {
    "balance": balance_drift,
    "held": held_drift,
    "orphan_hold": orphan_hold,
    "stale_hold": stale_hold,
    "grant_unapplied": grant_unapplied,
}


async def _metrics_until(sc: Sidecar, done: Callable[[Samples], bool]) -> Samples:
    """Scrape until `done(samples)` holds (a pass of the job ran and shows it), within 30 s."""
    async with asyncio.timeout(30):
        while True:
            samples = await scrape(sc)
            if done(samples):
                return samples
            await asyncio.sleep(0.05)


def _drift(samples: Samples, kind: str) -> tuple[float, float]:
    return (
        value(samples, "creditgate_reconcile_drift", kind=kind),
        value(samples, "creditgate_reconcile_drift_microcredits", kind=kind),
    )


async def _assert_right(svc: Services, account: str) -> None:
    """The account agrees with the ledger and has no hold nothing releases."""
    report = await inspect(svc.redis, svc.keys, svc.store)
    assert report.clean, report
    view = await svc.balances.balance(account)
    assert view.held == sum(h.amount for h in view.holds)
    assert view.balance == await svc.store.ledger_sum(account)


@pytest.mark.parametrize("kind", DRIFT_KINDS)
async def test_the_job_finds_each_kind_of_drift_and_exports_it(
    make_sidecar: SidecarFactory, kind: str
) -> None:
    sc = await make_sidecar(reconcile_interval_seconds=0.1, **NO_REAPER)
    before = await scrape(sc)
    assert _drift(before, kind) == (0, 0)
    ran_at = value(before, "creditgate_reconcile_last_run_timestamp_seconds")
    account, micro = await MAKERS[kind](sc)
    samples = await _metrics_until(sc, lambda s: _drift(s, kind) == (1, micro))
    assert value(samples, "creditgate_reconcile_last_run_timestamp_seconds") > ran_at
    assert value(samples, "creditgate_reconcile_duration_seconds") > 0
    assert all(_drift(samples, other) == (0, 0) for other in DRIFT_KINDS if other != kind)
    assert value(samples, "creditgate_ledger_drift_accounts") == (kind in ("balance", "held"))
    status = await sc.admin("GET", "/ledger")
    assert status["drift_by_kind"][kind] == {"items": 1, "microcredits": micro}
    svc = sc.services
    if kind == "grant_unapplied":  # Redis can take it again: the job itself completes it
        await _ready_again(svc, account)
    else:
        report = await repair_all(svc.redis, svc.keys, svc.store, svc.balances)
        assert report.repaired == {k: int(k == kind) for k in DRIFT_KINDS}
    await _metrics_until(sc, lambda s: _drift(s, kind) == (0, 0))
    await _assert_right(svc, account)


async def test_the_job_repairs_when_told_to_and_each_repair_happens_once(
    make_sidecar: SidecarFactory,
) -> None:
    """reconcile_repair: the job repairs what it finds; its later passes find nothing and repair nothing."""
    sc = await make_sidecar(reconcile_interval_seconds=0.1, reconcile_repair=True, **NO_REAPER)
    made = [await balance_drift(sc), await orphan_hold(sc), await stale_hold(sc), await held_drift(sc)]
    kinds = ("balance", "orphan_hold", "stale_hold", "held")

    def repaired(s: Samples) -> bool:
        return all(value(s, "creditgate_reconcile_repairs_total", kind=k) == 1 for k in kinds)

    samples = await _metrics_until(sc, repaired)
    ran_at = value(samples, "creditgate_reconcile_last_run_timestamp_seconds")
    # Two more passes after the one that repaired: nothing found, nothing repaired again.
    later = await _metrics_until(
        sc, lambda s: value(s, "creditgate_reconcile_last_run_timestamp_seconds") > ran_at + 0.15
    )
    assert repaired(later)
    assert all(_drift(later, k) == (0, 0) for k in DRIFT_KINDS)
    assert value(later, "creditgate_reconcile_repairs_total", kind="grant_unapplied") == 0
    for account, _ in made:
        await _assert_right(sc.services, account)


async def _every_kind(sc: Sidecar) -> list[tuple[str, int]]:
    made = [await maker(sc) for maker in MAKERS.values()]
    await _ready_again(sc.services, made[-1][0])  # the grant can be completed now
    return made


async def test_repair_twice_is_repair_once(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(reconcile_interval_seconds=0, **NO_REAPER)
    svc = sc.services
    made = await _every_kind(sc)
    first = await repair_all(svc.redis, svc.keys, svc.store, svc.balances)
    assert first.repaired == dict.fromkeys(DRIFT_KINDS, 1)
    assert {k: n for k, (n, _) in first.by_kind().items()} == dict.fromkeys(DRIFT_KINDS, 1)
    state = [await svc.balances.balance(account) for account, _ in made]
    second = await repair_all(svc.redis, svc.keys, svc.store, svc.balances)
    assert second.clean
    assert second.repaired == dict.fromkeys(DRIFT_KINDS, 0)
    assert [await svc.balances.balance(account) for account, _ in made] == state
    for account, _ in made:
        await _assert_right(svc, account)


async def test_two_repairs_at_once_repair_once(make_sidecar: SidecarFactory) -> None:
    """Two processes (each its own clients and pools) repairing the same drift at the same time."""
    sc = await make_sidecar(reconcile_interval_seconds=0, **NO_REAPER)
    made = await _every_kind(sc)
    async with services(sc.settings) as a, services(sc.settings) as b:
        for race in range(3):  # and again, racing on a state that is already right
            reports = await asyncio.gather(
                *(repair_all(s.redis, s.keys, s.store, s.balances) for s in (a, b))
            )
            total = {k: sum(r.repaired[k] for r in reports) for k in DRIFT_KINDS}
            assert total == dict.fromkeys(DRIFT_KINDS, 1 if race == 0 else 0)
    for account, _ in made:
        await _assert_right(sc.services, account)


async def test_a_balance_repair_applied_again_or_from_an_old_snapshot_moves_nothing(sidecar: Sidecar) -> None:
    """Seen before: repairs were keyed by a random id, so a drift list applied twice (a retried call,
    a second reconciler with the same snapshot) moved the balance twice."""
    svc = sidecar.services
    account, _ = await balance_drift(sidecar)
    drifts = await reconcile(svc.redis, svc.keys, svc.store)
    assert [d.amount for d in drifts] == [777]
    assert await repair_accounts(svc.balances, drifts) == (1, 0)
    assert await repair_accounts(svc.balances, drifts) == (0, 0)  # the same repair id: applied before
    await _assert_right(svc, account)
    # A snapshot taken, then traffic (a settle), then the old snapshot applied: the balance it saw is
    # gone, so nothing moves and the next pass decides.
    await svc.redis.hincrby(svc.keys.account(account).balance, "balance", 500)
    old = await reconcile(svc.redis, svc.keys, svc.store)
    await svc.balances.reserve(account, "r-traffic", 1_000, FAR)
    await svc.balances.settle(account, "r-traffic", 100)
    assert await repair_accounts(svc.balances, old) == (0, 0)
    [now] = await reconcile(svc.redis, svc.keys, svc.store)
    assert (now.amount, now.redis_balance) == (500, old[0].redis_balance - 100)  # type: ignore[operator]
    assert await repair_accounts(svc.balances, [now]) == (1, 0)
    await svc.flusher().drain()
    await _assert_right(svc, account)


async def test_a_stale_hold_is_one_the_reaper_should_have_released_long_ago(
    make_sidecar: SidecarFactory,
) -> None:
    """A lease that ended a moment ago is the reaper's business, not drift; one past the threshold is."""
    sc = await make_sidecar(**NO_REAPER)
    svc = sc.services
    account = await _account(sc, 1_000_000)
    now_ms = time.time_ns() // 1_000_000
    await svc.balances.reserve(account, "r-recent", 1_000, now_ms - 1_000)
    report = await inspect(svc.redis, svc.keys, svc.store, now_ms=now_ms, stale_hold_ms=60_000)
    assert report.holds == []
    report = await inspect(svc.redis, svc.keys, svc.store, now_ms=now_ms + 61_000, stale_hold_ms=60_000)
    assert [(h.kind, h.request_id, h.amount) for h in report.holds] == [("stale_hold", "r-recent", 1_000)]
