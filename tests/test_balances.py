"""The Lua money scripts against real Redis: atomic, idempotent by id, integer-exact."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from sidecar.accounts import AccountDirectory
from sidecar.balances import Balances, ReserveStatus
from sidecar.cluster_pipeline import pipeline_for
from sidecar.errors import IdempotencyConflict, UnknownAccount
from sidecar.keys import KeySpace
from sidecar.money import MAX_CHARGE, MAX_MICRO

from .conftest import new_key_prefix

pytestmark = pytest.mark.topologies
NOW = 1_800_000_000_000
LEASE = NOW + 60_000


@pytest.fixture(params=["redis-py", "autopipeline"])
async def balances(
    redis_client: Redis, redis_url: str, request: pytest.FixtureRequest
) -> AsyncIterator[Balances]:
    """The scripts through either client: redis-py (admin paths, tests) or the request path's pipeline."""
    keys = KeySpace(new_key_prefix(), 4)
    pipeline = pipeline_for(redis_url) if request.param == "autopipeline" else None
    balances = Balances(redis_client, keys, settled_marker_ms=60_000, pipeline=pipeline)
    await balances.load_scripts()
    await balances.mark_ready()
    yield balances
    if pipeline is not None:
        await pipeline.aclose()


async def funded(balances: Balances, amount: int) -> str:
    account = f"acct_{uuid.uuid4().hex[:8]}"
    await AccountDirectory(balances.redis, balances.keys, cache_seconds=0).add_account(account)
    if amount:
        await balances.credit(account, "seed", amount)
    return account


async def test_reserve_holds_and_settle_debits(balances: Balances) -> None:
    account = await funded(balances, 1000)
    held = await balances.reserve(account, "r1", 600, LEASE)
    assert (held.status, held.balance, held.held) == (ReserveStatus.HELD, 1000, 600)
    # 400 available: a second hold of 401 does not fit, 400 does.
    assert (await balances.reserve(account, "r2", 401, LEASE)).status is ReserveStatus.INSUFFICIENT
    assert (await balances.reserve(account, "r3", 400, LEASE)).status is ReserveStatus.HELD
    settled = await balances.settle(account, "r1", 250)
    assert (settled.first, settled.balance, settled.released, settled.charged) == (True, 750, 600, 250)
    view = await balances.balance(account)
    assert (view.balance, view.held, view.available) == (750, 400, 350)
    assert [(h.request_id, h.amount, h.lease_end_ms) for h in view.holds] == [("r3", 400, LEASE)]


async def test_reserve_twice_with_one_id_holds_once(balances: Balances) -> None:
    account = await funded(balances, 1000)
    first, second = await asyncio.gather(
        balances.reserve(account, "r1", 700, LEASE), balances.reserve(account, "r1", 700, LEASE)
    )
    assert first.status is second.status is ReserveStatus.HELD
    view = await balances.balance(account)
    assert (view.held, len(view.holds)) == (700, 1)


async def test_settle_twice_with_one_id_debits_once(balances: Balances) -> None:
    account = await funded(balances, 1000)
    await balances.reserve(account, "r1", 500, LEASE)
    results = await asyncio.gather(*(balances.settle(account, "r1", 300) for _ in range(5)))
    assert sorted(r.first for r in results) == [False, False, False, False, True]
    assert all(r.charged == 300 for r in results)
    view = await balances.balance(account)
    assert (view.balance, view.held) == (700, 0)
    # A retry that carries another amount still moves nothing: the first settlement stands.
    again = await balances.settle(account, "r1", 999)
    assert (again.first, again.charged, again.balance) == (False, 300, 700)


async def test_reserve_after_settle_is_refused(balances: Balances) -> None:
    account = await funded(balances, 1000)
    await balances.reserve(account, "r1", 500, LEASE)
    await balances.settle(account, "r1", 100)
    late = await balances.reserve(account, "r1", 500, LEASE)
    assert late.status is ReserveStatus.ALREADY_SETTLED
    assert (await balances.balance(account)).held == 0


async def test_overdraft_debits_the_full_charge(balances: Balances) -> None:
    account = await funded(balances, 100)
    await balances.reserve(account, "r1", 100, LEASE)
    settled = await balances.settle(account, "r1", 130)
    assert (settled.balance, settled.released, settled.charged) == (-30, 100, 130)
    # Overdrawn: any paid work is refused; free work (a hold of 0) still goes through.
    assert (await balances.reserve(account, "r2", 1, LEASE)).status is ReserveStatus.INSUFFICIENT
    assert (await balances.reserve(account, "r3", 0, LEASE)).status is ReserveStatus.HELD


async def test_expired_holds_are_reaped_and_a_late_settle_debits_once(balances: Balances) -> None:
    account = await funded(balances, 1000)
    await balances.reserve(account, "dead", 400, NOW - 1)
    await balances.reserve(account, "alive", 100, LEASE)
    assert await balances.expire_holds(NOW) == 400
    assert await balances.expire_holds(NOW) == 0
    view = await balances.balance(account)
    assert (view.balance, view.held, [h.request_id for h in view.holds]) == (1000, 100, ["alive"])
    late = await balances.settle(account, "dead", 250)
    assert (late.first, late.released, late.balance) == (True, 0, 750)
    assert (await balances.settle(account, "dead", 250)).balance == 750


async def test_unknown_account(balances: Balances) -> None:
    assert (await balances.reserve("ghost", "r1", 1, LEASE)).status is ReserveStatus.NO_ACCOUNT
    with pytest.raises(UnknownAccount):
        await balances.settle("ghost", "r1", 1)
    with pytest.raises(UnknownAccount):
        await balances.credit("ghost", "k", 1)
    with pytest.raises(UnknownAccount):
        await balances.balance("ghost")


async def test_credit_is_idempotent_by_key(balances: Balances) -> None:
    account = await funded(balances, 0)
    results = await asyncio.gather(*(balances.credit(account, "grant-1", 5_000_000) for _ in range(20)))
    assert sorted(credited for credited, _ in results).count(True) == 1
    assert (await balances.balance(account)).balance == 5_000_000
    with pytest.raises(IdempotencyConflict):
        await balances.credit(account, "grant-1", 6_000_000)
    # Idempotency keys are scoped to their account: another account's "grant-1" is its own grant.
    other = await funded(balances, 0)
    assert await balances.credit(other, "grant-1", 5_000_000) == (True, 5_000_000)


async def test_amounts_near_the_bound_stay_exact(balances: Balances) -> None:
    big = MAX_MICRO - 7
    account = await funded(balances, big)
    await balances.reserve(account, "r1", big - 1, LEASE)
    settled = await balances.settle(account, "r1", MAX_CHARGE)
    assert settled.balance == big - MAX_CHARGE
    view = await balances.balance(account)
    assert (view.balance, view.held) == (big - MAX_CHARGE, 0)


async def test_multiples_of_ten_to_the_eight_move_exactly(balances: Balances) -> None:
    """Released holds and debits go to HINCRBY as strings, never as Lua numbers (which Redis
    7.2.0-7.2.4 would format as 1e+08 and refuse mid-script)."""
    account = await funded(balances, 10**9)
    await balances.reserve(account, "r1", 3 * 10**8, LEASE)
    await balances.reserve(account, "r2", 10**8, NOW - 1)
    assert await balances.expire_holds(NOW) == 10**8
    settled = await balances.settle(account, "r1", 2 * 10**8)
    assert (settled.balance, settled.released) == (8 * 10**8, 3 * 10**8)
    assert (await balances.balance(account)).held == 0


@pytest.mark.parametrize("charge", ["1e+17", "100000000000000000", "-5", "12.5", ""])
async def test_a_settle_the_script_refuses_writes_nothing(balances: Balances, charge: str) -> None:
    """Every argument is checked before the first write: the hold stays, nothing is debited, no marker."""
    account = await funded(balances, 1000)
    await balances.reserve(account, "r1", 600, LEASE)
    k = balances.keys.account(account)
    keys = [k.balance, k.holds, k.hold_expiry, k.settled("r1"), k.outbox]
    with pytest.raises(ResponseError, match="charge must be"):
        await balances._settle(keys=keys, args=["r1", charge, 60_000, k.expiry_member("r1"), "0", "{}"])
    view = await balances.balance(account)
    assert (view.balance, view.held, [h.amount for h in view.holds]) == (1000, 600, [600])
    assert await balances.redis.exists(k.settled("r1"), k.outbox) == 0
    with pytest.raises(ValueError, match="charge must be between"):
        await balances.settle(account, "r1", MAX_CHARGE + 1)
    assert (await balances.balance(account)).held == 600


async def test_keys_of_one_account_share_a_hash_slot(balances: Balances) -> None:
    k = balances.keys.account("acct_42")
    tag = f"{{p{k.partition}}}"
    for name in (k.balance, k.holds, k.hold_expiry, k.settled("r"), k.credited("g"), k.api_keys):
        assert name.count("{") == 1
        assert tag in name


async def test_a_renewed_lease_outlives_its_first_end(balances: Balances) -> None:
    account = await funded(balances, 1000)
    await balances.reserve(account, "long-stream", 400, NOW - 1)
    await balances.renew([(account, "long-stream")], NOW + 60_000)
    assert await balances.expire_holds(NOW) == 0
    await balances.renew([(account, "long-stream")], NOW - 5)  # never moved backwards
    assert await balances.expire_holds(NOW) == 0
    assert (await balances.balance(account)).held == 400
    await balances.settle(account, "long-stream", 100)
    await balances.renew([(account, "long-stream")], NOW + 120_000)  # a settled hold is not brought back
    assert (await balances.balance(account)).holds == []
    assert (
        await balances.redis.zscore(balances.keys.account(account).hold_expiry, f"{account} long-stream")
        is None
    )
