"""Money in is counted once across a lost Redis, and reconcile tells the truth while grants run.

Real Redis and Postgres; the races are real concurrent runs.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster

from sidecar.app import FLUSHER, PROXY, services
from sidecar.balances import ReserveStatus
from sidecar.outbox import UsageEvent
from sidecar.rebuild import MARKER_SLACK_MS, rebuild_if_empty
from sidecar.reconcile import reconcile
from sidecar.repair import repair

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, held_upstream, pooled, post, settled, usage_rows

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster


async def _lose_redis(sc: Sidecar) -> None:
    svc = sc.services
    names = [n async for n in svc.redis.scan_iter(match=f"{svc.keys.prefix}*")]
    await svc.redis.delete(*names)


async def _grant(sc: Sidecar, account: str, micro: int) -> dict[str, object]:
    result: dict[str, object] = await sc.admin(
        "POST", f"/accounts/{account}/grants", {"amount": micro}, **{"Idempotency-Key": uuid.uuid4().hex}
    )
    return result


async def test_a_grant_after_redis_was_lost_is_not_counted_twice_by_the_rebuild(sidecar: Sidecar) -> None:
    """Seen before: with Redis emptied under a running sidecar, a grant re-created the account in Redis
    and credited it, and the next start rebuilt by adding the whole ledger balance on top (Redis 20
    credits, ledger 15)."""
    account, _ = await sidecar.account(10_000_000)
    await _lose_redis(sidecar)
    await _grant(sidecar, account, 5_000_000)
    assert (await sidecar.balance(account))["balance"] == 15_000_000
    # The next start (or any CLI verb) finds Redis initialised and leaves the balance alone.
    async with services(sidecar.settings) as svc:
        assert (await svc.balances.balance(account)).balance == 15_000_000
        assert await svc.store.ledger_sum(account) == 15_000_000
        assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_a_rebuild_written_twice_leaves_the_same_balances(sidecar: Sidecar) -> None:
    """The rebuild sets balances (HSET), so a retried write step cannot add them again."""
    account, _ = await sidecar.account(3_000_000)
    svc = sidecar.services
    for _ in range(2):
        await _lose_redis(sidecar)
        await svc.redis.delete(svc.keys.initialized)
        assert await rebuild_if_empty(
            svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
        )
    # And once more without losing anything first: the write step over a live Redis changes nothing.
    await svc.redis.delete(svc.keys.initialized)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert (await sidecar.balance(account))["balance"] == 3_000_000
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_money_in_waits_while_redis_is_not_rebuilt(sidecar: Sidecar) -> None:
    """While a partition has no ready marker the credit script refuses money in, so nothing reaches a
    balance that the rebuild will then set; the grant stays "not applied" and is completed after."""
    account, _ = await sidecar.account(1_000_000)
    svc = sidecar.services
    await _lose_redis(sidecar)
    await svc.redis.set(svc.keys.rebuild_lock, "another process")  # a rebuild runs elsewhere
    result = await _grant(sidecar, account, 2_000_000)
    assert result["credited"] is True
    assert await svc.store.unapplied() != []
    await svc.redis.delete(svc.keys.rebuild_lock)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert (await sidecar.balance(account))["balance"] == 3_000_000
    assert await svc.store.unapplied() == []


async def test_repair_racing_grants_moves_no_correct_balance(sidecar: Sidecar) -> None:
    """Seen before: 8 workers of grants against a repair loop made dozens of adjustments, every one
    wrong, because a grant credited Redis outside the barrier and the snapshot took it for drift."""
    svc = sidecar.services
    accounts = [(await sidecar.account(0))[0] for _ in range(2)]
    ops = svc.admin
    stop = asyncio.Event()
    repairs: list[object] = []

    async def grants(worker: int) -> None:
        for i in range(120):
            await ops.grant(accounts[i % 2], 1_000 + worker, f"w{worker}-{i}")

    async def repair_loop() -> None:
        passes = 0
        while not stop.is_set() or passes < 3:
            repairs.extend(await repair(svc.redis, svc.keys, svc.store, svc.balances))
            passes += 1

    repairing = asyncio.create_task(repair_loop())
    await asyncio.gather(*(grants(w) for w in range(6)))
    stop.set()
    await repairing
    assert repairs == []
    for account in accounts:
        assert (await svc.balances.balance(account)).balance == await svc.store.ledger_sum(account)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def test_reconcile_compares_held_with_the_sum_of_holds_and_repairs_it(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(1_000_000)
    svc = sidecar.services
    await svc.balances.reserve(account, "r1", 300_000, 2**50)
    k = svc.keys.account(account)
    await svc.redis.hset(k.balance, "held", "900000")  # drifted: the holds hash says 300,000
    [drift] = await reconcile(svc.redis, svc.keys, svc.store)
    assert (drift.account, drift.amount, drift.redis_held, drift.holds_total) == (
        account,
        0,
        900_000,
        300_000,
    )
    await repair(svc.redis, svc.keys, svc.store, svc.balances)
    view = await svc.balances.balance(account)
    assert (view.balance, view.held) == (1_000_000, 300_000)
    assert await reconcile(svc.redis, svc.keys, svc.store) == []


async def _lose_a_shard(sc: Sidecar) -> set[int]:
    """Delete what one shard holds, `initialized` surviving elsewhere: on the cluster every key of this
    test on one master that does not hold `initialized` (its partitions, key records and all); on one
    Redis the keys of half the partitions. Returns the partitions lost."""
    svc = sc.services
    redis: Any = svc.redis
    partitions = range(svc.keys.partitions)
    if isinstance(redis, RedisCluster):
        node_of: Any = redis.get_node_from_key
        kept = node_of(svc.keys.initialized).name
        lost_node = next(n for n in redis.get_primaries() if n.name != kept)
        names = [n async for n in redis.scan_iter(match=f"{svc.keys.prefix}*", target_nodes=lost_node)]
        await redis.delete(*names)
        return {p for p in partitions if node_of(svc.keys.ready(p)).name == lost_node.name}
    for p in partitions[::2]:
        names = [n async for n in redis.scan_iter(match=f"{svc.keys.partition_tag(p)}*")]
        await redis.delete(*names)
    return set(partitions[::2])


async def test_a_shard_lost_while_initialized_survives_is_rebuilt_and_money_in_counts_once(
    sidecar: Sidecar,
) -> None:
    """Seen before: with `initialized` kept, the lost partitions were only marked ready again, so a grant
    to one of their accounts started its balance from 0 (the ledger's balance was never loaded)."""
    svc = sidecar.services
    found: dict[int, str] = {}
    while len(found) < svc.keys.partitions:
        account = f"a{uuid.uuid4().hex[:10]}"
        found.setdefault(svc.keys.partition_of(account), account)
    for account in found.values():
        await sidecar.account(1_000_000, account)
    lost = await _lose_a_shard(sidecar)
    assert 0 < len(lost) < svc.keys.partitions
    victim = found[min(lost)]
    await _grant(sidecar, victim, 500_000)  # the credit finds no ready marker: the rebuild runs first
    assert (await sidecar.balance(victim))["balance"] == 1_500_000
    assert not await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )  # every partition is ready again
    for account in found.values():
        expected = 1_500_000 if account == victim else 1_000_000
        assert (await svc.balances.balance(account)).balance == expected
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    # The flusher, whose consumer group went with the lost streams, makes it again and flushes on.
    await svc.balances.reserve(victim, "after-loss", 100, 4_000_000_000_000)
    await svc.balances.settle(victim, "after-loss", 70, UsageEvent(route="chat", model="m"))
    async with asyncio.timeout(30):
        await sidecar.client.app[FLUSHER].wait_for_rows(1)
    assert await svc.store.ledger_sum(victim) == 1_500_000 - 70


async def test_a_settle_retried_after_redis_was_lost_and_rebuilt_charges_once(sidecar: Sidecar) -> None:
    """Found by the money model (tests/test_money_model.py), its shrunk steps: a settle, flushed; Redis lost
    and rebuilt; the settle sent again. The rebuild loaded the balance but not the settled marker, so the
    retry charged a second time (Redis 2 micro-credits down, the ledger 1), and a late reserve of the same
    request took a new hold. The rebuild now writes the markers of the window's debits back."""
    account, _ = await sidecar.account(1_000)
    svc = sidecar.services
    lease = 4_000_000_000_000
    await svc.balances.reserve(account, "req_a", 10, lease)
    assert (await svc.balances.settle(account, "req_a", 7, UsageEvent(route="chat"))).first
    await svc.balances.reserve(account, "req_b", 10, lease)
    await svc.balances.settle(account, "req_b", 0)  # a release: nothing charged, no ledger row
    await svc.flusher().drain()  # (the sidecar's own flusher may have written it already)
    assert await svc.store.ledger_sum(account) == 993
    await _lose_redis(sidecar)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    again = await svc.balances.settle(account, "req_a", 7, UsageEvent(route="chat"))
    assert (again.first, again.charged) == (False, 7)
    assert (await svc.balances.reserve(account, "req_a", 10, lease)).status == ReserveStatus.ALREADY_SETTLED
    # The release's retry finds no marker; it moves nothing all the same.
    released = await svc.balances.settle(account, "req_b", 0)
    assert (released.first, released.charged, released.released) == (True, 0, 0)
    assert (await sidecar.balance(account))["balance"] == 993
    assert await svc.store.ledger_sum(account) == 993
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
    # The marker expires with the request's window (plus the slack), as the settle's own would.
    ttl = await svc.redis.pttl(svc.keys.account(account).settled("req_a"))
    assert 0 < ttl <= svc.balances.settled_marker_ms + MARKER_SLACK_MS


async def test_the_rebuild_writes_no_marker_for_a_debit_older_than_the_window(sidecar: Sidecar) -> None:
    """Only a request still inside its window can be retried: older debits get no marker back."""
    account, _ = await sidecar.account(1_000)
    svc = sidecar.services
    old_ms = int(time.time() * 1000) - svc.balances.settled_marker_ms - MARKER_SLACK_MS - 1_000
    await svc.balances.settle(account, "req_old", 5, UsageEvent(route="chat", settled_ms=old_ms))
    await svc.balances.settle(account, "req_new", 5, UsageEvent(route="chat"))
    await svc.flusher().drain()
    assert await svc.store.ledger_sum(account) == 990
    await _lose_redis(sidecar)
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    k = svc.keys.account(account)
    assert await svc.redis.exists(k.settled("req_new")) == 1
    assert await svc.redis.exists(k.settled("req_old")) == 0


async def test_a_request_whose_account_redis_lost_meanwhile_is_charged_once_after_the_rebuild(
    make_sidecar: SidecarFactory, aiohttp_server: Any
) -> None:
    """Seen before (the fault suite): Redis lost (and not yet rebuilt) while a request ran, so its settle
    found no account and was dropped as "no longer exists": the answer was served, the charge lost.
    Accounts are never deleted, so it now waits in the settlement queue and lands once after the rebuild
    (or, if no rebuild comes within its window, goes to the ledger directly)."""
    app, arrived, release = held_upstream()
    server = await aiohttp_server(app)
    sc = await make_sidecar(models=MODELS, upstream_url=str(server.make_url("/v1")))
    account, key = await sc.account(10_000_000)
    svc = sc.services
    request = asyncio.create_task(
        post(sc, "/v1/chat/completions", {"model": "test-model", "messages": HELLO}, key)
    )
    await arrived.wait()
    await _lose_redis(sc)  # every key of ours, the account and the hold too
    release.set()
    resp = await request
    assert resp.status == 200
    await settled(sc)
    pending = sc.client.app[PROXY].pending
    assert len(pending.pending) == 1  # kept, not dropped
    assert pending.dropped == 0
    assert await rebuild_if_empty(
        svc.redis, svc.keys, svc.store, settled_marker_ms=svc.balances.settled_marker_ms
    )
    assert await pending.retry() == 1
    charge = pooled(5 * 1000 + 16 * 2000)  # the answer's usage at test-model's prices, on the pooled key
    assert (await sc.balance(account))["balance"] == 10_000_000 - charge
    rows = await usage_rows(sc, account)  # the sidecar's flusher, its consumer group made again
    assert [r["amount"] for r in rows] == [-charge]
    assert await svc.store.ledger_sum(account) == 10_000_000 - charge
    assert await reconcile(svc.redis, svc.keys, svc.store) == []
