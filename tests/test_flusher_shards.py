"""The flusher over every partition's outbox at once: on the cluster the 16 streams live on three masters
and are read one XREADGROUP per stream. Exactly once, claims from a dead consumer per stream, nothing
trimmed unacknowledged, and the reconcile barrier, with accounts in every partition."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sidecar.flusher import ACK_ENTRIES, GROUP
from sidecar.keys import KeySpace
from sidecar.outbox import UsageEvent
from sidecar.reconcile import reconcile
from sidecar.services import Services, services

from .conftest import make_settings

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

LEASE = 4_000_000_000_000
PARTITIONS = 16


@pytest.fixture
async def svc(redis_url: str, database_url: str) -> AsyncIterator[Services]:
    settings = make_settings(redis_url, database_url, partitions=PARTITIONS, flush_claim_idle_seconds=0)
    async with services(settings) as ready:
        yield ready


async def accounts_in_every_partition(svc: Services, credits: int) -> list[str]:
    keys = KeySpace(svc.keys.prefix, PARTITIONS)
    found: dict[int, str] = {}
    while len(found) < PARTITIONS:
        account = f"a{uuid.uuid4().hex[:10]}"
        found.setdefault(keys.partition_of(account), account)
    for account in found.values():
        await svc.admin.create_account(account)
        await svc.admin.grant(account, credits, "seed")
    return list(found.values())


async def settle_each(
    svc: Services, accounts: list[str], per_account: int, charge: int = 10, tag: str = "r"
) -> set[str]:
    ids = set()
    for account in accounts:
        for i in range(per_account):
            request_id = f"{tag}_{account}_{i}"
            await svc.balances.reserve(account, request_id, 100, LEASE)
            await svc.balances.settle(account, request_id, charge, UsageEvent(route="chat", model="m"))
            ids.add(request_id)
    return ids


async def usage_ids(svc: Services) -> list[str]:
    rows = await svc.store.pool.fetch("SELECT idempotency_id FROM ledger WHERE kind = 'usage'")
    return [r["idempotency_id"] for r in rows]


async def stream_lengths(svc: Services) -> list[int]:
    return [int(await svc.redis.xlen(svc.keys.outbox(p))) for p in range(PARTITIONS)]


async def test_two_flushers_write_every_partition_exactly_once(svc: Services) -> None:
    accounts = await accounts_in_every_partition(svc, 1_000_000)
    ids = await settle_each(svc, accounts, 5)
    assert all(n == 5 for n in await stream_lengths(svc))
    flushers = [svc.flusher(consumer=f"c{n}") for n in range(2)]
    loops = [asyncio.create_task(f.run()) for f in flushers]
    try:
        async with asyncio.timeout(60):
            while sum(f.stats.rows for f in flushers) < len(ids):  # noqa: ASYNC110
                await asyncio.sleep(0.02)  # polled: the rows of two flushers together
    finally:
        for f in flushers:
            f.stop()
        await asyncio.gather(*loops)
    written = await usage_ids(svc)
    assert sorted(written) == sorted(ids)  # every one, once
    assert await stream_lengths(svc) == [0] * PARTITIONS
    for account in accounts:
        assert await svc.store.ledger_sum(account) == (await svc.balances.balance(account)).balance


async def test_entries_a_dead_consumer_read_are_claimed_from_every_stream(svc: Services) -> None:
    accounts = await accounts_in_every_partition(svc, 1_000_000)
    ids = await settle_each(svc, accounts, 3)
    dead = svc.flusher(consumer="dead")
    batch = await dead.collect()  # read from every stream, then the process "dies": never written
    assert batch.size == len(ids)
    assert len(batch.entries) == PARTITIONS
    pending = [(await svc.redis.xpending(svc.keys.outbox(p), GROUP))["pending"] for p in range(PARTITIONS)]
    assert pending == [3] * PARTITIONS
    assert await svc.flusher(consumer="heir").drain() == len(ids)
    assert sorted(await usage_ids(svc)) == sorted(ids)
    pending = [(await svc.redis.xpending(svc.keys.outbox(p), GROUP))["pending"] for p in range(PARTITIONS)]
    assert pending == [0] * PARTITIONS
    assert await stream_lengths(svc) == [0] * PARTITIONS


async def test_nothing_unacknowledged_is_trimmed_while_postgres_refuses(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    accounts = await accounts_in_every_partition(svc, 1_000_000)
    ids = await settle_each(svc, accounts, 2)
    failures = 0

    async def refused(rows: object) -> None:
        nonlocal failures
        failures += 1
        raise asyncpg.CannotConnectNowError("the database system is starting up")

    flusher = svc.flusher()
    batch = await flusher.collect()
    monkeypatch.setattr(svc.store, "insert_usage", refused)
    writing = asyncio.create_task(flusher.write_until_done(batch))
    async with asyncio.timeout(30):
        while failures < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # polled: two refused tries
    assert await stream_lengths(svc) == [2] * PARTITIONS  # every entry still there, pending
    monkeypatch.undo()
    assert await writing
    assert sorted(await usage_ids(svc)) == sorted(ids)
    assert await stream_lengths(svc) == [0] * PARTITIONS


async def test_reconcile_sees_no_drift_while_every_partition_flushes(svc: Services) -> None:
    """The barrier: flushes and settlements in all partitions run while reconcile compares, and the
    comparison never takes a debit in flight for drift."""
    accounts = await accounts_in_every_partition(svc, 10_000_000)
    flusher = svc.flusher()
    loop = asyncio.create_task(flusher.run())
    try:
        for round_ in range(5):
            settling = asyncio.create_task(settle_each(svc, accounts, 2, charge=round_ + 1, tag=f"r{round_}"))
            while not settling.done():
                assert await reconcile(svc.redis, svc.keys, svc.store) == []
            await settling
        assert await reconcile(svc.redis, svc.keys, svc.store) == []
    finally:
        flusher.stop()
        await loop


async def test_acknowledging_a_batch_deletes_just_its_entries_and_can_run_twice(svc: Services) -> None:
    """The ack script takes a batch's ids as one argument and works through them in chunks: more ids than
    one chunk, sent twice, delete exactly those entries; an entry read but not in the batch stays pending."""
    stream = svc.keys.outbox(3)
    await svc.flusher().ensure_groups()
    ids = [await svc.redis.xadd(stream, {"d": b"x"}) for _ in range(1_203)]
    await svc.redis.xreadgroup(GROUP, "c", {stream: ">"}, count=2_000)
    batch, kept = [i.decode() if isinstance(i, bytes) else i for i in ids[:-1]], ids[-1]
    for expected in (1_202, 0):  # the second run finds nothing left to delete
        assert await svc.redis.eval(ACK_ENTRIES, 1, stream, GROUP, " ".join(batch)) == expected
    assert await svc.redis.xlen(stream) == 1
    pending = await svc.redis.xpending(stream, GROUP)
    assert pending["pending"] == 1
    left = await svc.redis.xrange(stream)
    assert left is not None
    assert [entry_id for entry_id, _ in left] == [kept]
    await svc.redis.delete(stream)
