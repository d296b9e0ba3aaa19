"""Concurrency: the reserve is the only gate to the upstream, holds never overspend an account, and a
reserve or settle sent twice with one request id moves money once."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest

from sidecar.balances import ReserveStatus

from .conftest import Sidecar, SidecarFactory, Upstream
from .support import HELLO, MODELS, hold_for, pooled, settled
from .support_gate import ArrivalGate, Outcome, all_accounted, fetch, gated, send_all

__all__ = ["gated"]  # the fixture

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

REQUESTS = 200
FIT = 50
MAX_TOKENS = 10
CHARGE = pooled(5 * 1000 + MAX_TOKENS * 2000)  # HELLO is 5 prompt tokens; the demo writes MAX_TOKENS


@pytest.mark.parametrize(
    "connections",
    [
        # 64 of the 200 on the wire at a time: more than the 50 holds, fewer than the 100 Redis commands
        # redis-py's default pool lets the sidecar have in flight.
        pytest.param(64, id="64-connections"),
        # All 200 at once.
        pytest.param(0, id="200-connections"),
    ],
)
async def test_200_concurrent_requests_on_50_holds(
    make_sidecar: SidecarFactory, gated: tuple[Upstream, ArrivalGate], connections: int
) -> None:
    upstream, gate = gated
    priced = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    body = msgspec.json.encode({"model": "test-model", "messages": HELLO, "max_tokens": MAX_TOKENS})
    hold = hold_for(body, limit=MAX_TOKENS)  # the same for all 200: their bodies are identical
    start = FIT * hold
    account, key = await priced.account(start)
    url = priced.client.make_url("/v1/chat/completions")

    # Every request either parks at the upstream's shut gate or comes back; once all 200 have done one
    # or the other, nothing can change until the gate opens. (A 51st arrival ends the wait at once.)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as session:
        tasks, accounted = send_all(session, url, body, key, gate, REQUESTS, FIT)
        try:
            await all_accounted(accounted, gate, tasks, FIT)
            rejected = [t.result() for t in tasks if t.done()]
            assert gate.arrived == upstream.calls("chat") == FIT
            assert len(rejected) == REQUESTS - FIT
            assert {o.status for o in rejected} == {402}
            for outcome in rejected:
                error = outcome.body["error"]
                assert error["code"] == "insufficient_credits"
                # Nothing settles while the gate is shut: every rejection saw all 50 holds taken.
                assert (error["balance"], error["required"]) == (0, hold)
            state = await priced.balance(account)
            assert (state["balance"], state["held"], state["available"]) == (start, start, 0)
            assert [h["amount"] for h in state["holds"]] == [hold] * FIT
        finally:
            gate.set()
            async with asyncio.timeout(10):
                gathered = await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = [o for o in gathered if isinstance(o, Outcome)]
    assert len(outcomes) == REQUESTS, [o for o in gathered if not isinstance(o, Outcome)]
    ok = [o for o in outcomes if o.status == 200]
    assert len(ok) == FIT
    assert sum(o.status == 402 for o in outcomes) == REQUESTS - FIT
    assert upstream.calls() == FIT
    charges = [int(o.headers["x-creditgate-charged"]) for o in ok]
    assert charges == [CHARGE] * FIT
    balances = [int(o.headers["x-creditgate-balance"]) for o in ok]
    assert min(balances) >= 0
    # Each settlement reports the balance just after it: together, every step of the way down.
    assert sorted(balances, reverse=True) == [start - sum(charges[: i + 1]) for i in range(FIT)]
    await settled(priced)
    state = await priced.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (start - sum(charges), 0, [])


async def test_200_settlements_at_once_are_all_debited(
    make_sidecar: SidecarFactory, gated: tuple[Upstream, ArrivalGate]
) -> None:
    """200 requests are let in 50 at a time (well within the Redis pool), parked at the upstream, then
    released together: all 200 settle at once, and every charge a client is told of is debited."""
    upstream, gate = gated
    priced = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    body = msgspec.json.encode({"model": "test-model", "messages": HELLO, "max_tokens": MAX_TOKENS})
    start = 1_000 * hold_for(body, limit=MAX_TOKENS)
    account, key = await priced.account(start)
    url = priced.client.make_url("/v1/chat/completions")
    parked = asyncio.Event()
    target = 0
    gate.listeners.append(lambda: parked.set() if gate.arrived >= target else None)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks: list[asyncio.Task[Outcome]] = []
        try:
            for _ in range(REQUESTS // FIT):
                target += FIT
                parked.clear()
                tasks += [asyncio.create_task(fetch(session, url, body, key)) for _ in range(FIT)]
                async with asyncio.timeout(10):
                    await parked.wait()
            assert (await priced.balance(account))["held"] == REQUESTS * hold_for(body, limit=MAX_TOKENS)
        finally:
            gate.set()
            async with asyncio.timeout(10):
                outcomes = await asyncio.gather(*tasks)
    assert [o.status for o in outcomes] == [200] * REQUESTS
    told = sum(int(o.headers["x-creditgate-charged"]) for o in outcomes)
    assert told == REQUESTS * CHARGE
    await settled(priced)
    state = await priced.balance(account)
    assert (start - state["balance"], state["held"]) == (told, 0)


def lease() -> int:
    return int(time.time() * 1000) + 60_000


async def test_reserve_and_settle_sent_twice_move_money_once(sidecar: Sidecar) -> None:
    balances = sidecar.balances
    account, _ = await sidecar.account(1_000_000)
    end = lease()
    first = await balances.reserve(account, "req_twice", 600_000, end)
    again = await balances.reserve(account, "req_twice", 600_000, end)
    # 400_000 would be left after one hold: a second hold of 600_000 could not have been taken.
    assert (first.status, first.held) == (ReserveStatus.HELD, 600_000)
    assert (again.status, again.held) == (ReserveStatus.HELD, 600_000)
    state = await sidecar.balance(account)
    assert (state["balance"], state["held"]) == (1_000_000, 600_000)
    assert state["holds"] == [{"request_id": "req_twice", "amount": 600_000, "lease_end_ms": end}]

    settled_once = await balances.settle(account, "req_twice", 250_000)
    settled_again = await balances.settle(account, "req_twice", 250_000)
    assert (settled_once.first, settled_once.balance, settled_once.released) == (True, 750_000, 600_000)
    assert (settled_again.first, settled_again.balance, settled_again.released) == (False, 750_000, 0)
    assert settled_again.charged == 250_000
    # A late retry with another charge changes nothing either.
    late = await balances.settle(account, "req_twice", 999_999)
    assert (late.first, late.balance, late.charged) == (False, 750_000, 250_000)
    # Nor does a reserve retried after the settlement: it must not hold again.
    retried = await balances.reserve(account, "req_twice", 600_000, end)
    assert retried.status is ReserveStatus.ALREADY_SETTLED
    state = await sidecar.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (750_000, 0, [])


async def test_concurrent_duplicate_reserves_and_settles_are_atomic(sidecar: Sidecar) -> None:
    balances = sidecar.balances
    account, _ = await sidecar.account(1_000_000)
    end = lease()
    reserves = await asyncio.gather(
        balances.reserve(account, "req_race", 600_000, end),
        balances.reserve(account, "req_race", 600_000, end),
    )
    # Were the two not one atomic, idempotent step, one would have been refused (only 400_000 left)
    # or both held (1_200_000 > the balance).
    assert [r.status for r in reserves] == [ReserveStatus.HELD, ReserveStatus.HELD]
    assert [r.held for r in reserves] == [600_000, 600_000]
    state = await sidecar.balance(account)
    assert (state["held"], len(state["holds"])) == (600_000, 1)

    settles = await asyncio.gather(
        balances.settle(account, "req_race", 250_000), balances.settle(account, "req_race", 250_000)
    )
    assert sorted(s.first for s in settles) == [False, True]
    assert {s.balance for s in settles} == {750_000}
    assert sum(s.released for s in settles) == 600_000
    state = await sidecar.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (750_000, 0, [])
