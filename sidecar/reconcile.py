"""Keeping Redis (the hot copy) true to Postgres (the ledger): complete half-done money in, measure
drift, repair it, and rebuild Redis from the ledger when it comes up empty.

For every account, Redis' balance should equal

    ledger balance − money in not yet applied to Redis − debits settled in Redis but not yet flushed

(active holds are kept apart, in the ``held`` field, and never touch the balance). A comparison races
with settlements and flushes that happen between the Redis and the Postgres reads, so an account counts
as drifting only when two passes in a row find the same non-zero drift.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis

from .keys import KeySpace
from .ledger import RedisLedger
from .outbox import decode_entry
from .store import Store

log = logging.getLogger("creditgate.reconcile")


@dataclass(frozen=True, slots=True)
class Drift:
    account: str
    redis_balance: int | None  # None: the account is missing from Redis
    expected: int

    @property
    def amount(self) -> int:
        return (self.redis_balance or 0) - self.expected


async def complete_money_in(store: Store, ledger: RedisLedger, older_than_seconds: float = 0) -> int:
    """Credit Redis for ledger rows written by a grant that died before its Redis step; returns how many."""
    rows = await store.unapplied(older_than_seconds)
    for idempotency_id, account, amount in rows:
        await ledger.credit(account, idempotency_id, amount)
    await store.mark_applied([r[0] for r in rows])
    return len(rows)


async def _snapshot(
    redis: Redis, keys: KeySpace, accounts: list[str]
) -> tuple[dict[str, int | None], dict[str, list[tuple[str, int]]]]:
    """Redis balances and unflushed outbox debits, read atomically per partition."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    for account in accounts:
        by_partition[keys.partition_of(account)].append(account)
    balances: dict[str, int | None] = {}
    debits: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for partition in range(keys.partitions):
        members = by_partition.get(partition, [])
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xrange(keys.outbox(partition))
            for account in members:
                pipe.hget(keys.account(account).balance, "balance")
            outbox, *values = await pipe.execute()
        for account, value in zip(members, values, strict=True):
            balances[account] = int(value) if value is not None else None
        for _, fields in outbox:
            entry = decode_entry(fields)
            debits[entry.account].append((entry.request_id, entry.charge))
    return balances, debits


async def _drifts(redis: Redis, keys: KeySpace, store: Store) -> dict[str, Drift]:
    ledger_view = await store.balances()
    balances, debits = await _snapshot(redis, keys, list(ledger_view))
    flushed = await store.present([rid for entries in debits.values() for rid, _ in entries])
    found: dict[str, Drift] = {}
    for account, (ledger_balance, unapplied) in ledger_view.items():
        unflushed = sum(charge for rid, charge in debits.get(account, []) if rid not in flushed)
        drift = Drift(account, balances[account], ledger_balance - unapplied - unflushed)
        if drift.redis_balance is None or drift.amount:
            found[account] = drift
    return found


async def reconcile(redis: Redis, keys: KeySpace, store: Store) -> list[Drift]:
    """Accounts whose Redis balance disagrees with the ledger in two passes in a row, by the same amount."""
    first = await _drifts(redis, keys, store)
    if not first:
        return []
    second = await _drifts(redis, keys, store)
    return [d for a, d in sorted(second.items()) if a in first and first[a].amount == d.amount]


async def repair(redis: Redis, keys: KeySpace, store: Store, ledger: RedisLedger) -> list[Drift]:
    """Complete half-done money in, then move each drifting Redis balance onto the ledger's figure.
    Returns the drifts that were repaired."""
    await complete_money_in(store, ledger)
    drifts = await reconcile(redis, keys, store)
    for drift in drifts:
        k = keys.account(drift.account)
        if drift.redis_balance is None:
            await redis.hset(
                k.balance, mapping={"balance": drift.expected, "held": 0, "created_at": int(time.time())}
            )
            await redis.sadd(keys.accounts, drift.account)
        else:
            await redis.hincrby(k.balance, "balance", -drift.amount)
        log.warning("repaired %s: Redis balance %s -> %d", drift.account, drift.redis_balance, drift.expected)
    return drifts


async def rebuild_if_empty(redis: Redis, keys: KeySpace, store: Store) -> bool:
    """When Redis holds nothing of ours (first start, or Redis was lost), load accounts, balances and
    active keys from the ledger. One process does it (a lock); returns True when this one did."""
    if await redis.exists(keys.initialized):
        return False
    if not await redis.set(keys.rebuild_lock, "1", nx=True, px=120_000):
        return False
    try:
        if await redis.exists(keys.initialized):
            return False
        ledger_view = await store.balances()
        unapplied = await store.unapplied()
        _, debits = await _snapshot(redis, keys, list(ledger_view))
        flushed = await store.present([rid for entries in debits.values() for rid, _ in entries])
        now = int(time.time())
        async with redis.pipeline(transaction=False) as pipe:
            for account, (ledger_balance, _) in ledger_view.items():
                unflushed = sum(charge for rid, charge in debits.get(account, []) if rid not in flushed)
                pipe.hset(
                    keys.account(account).balance,
                    mapping={"balance": ledger_balance - unflushed, "held": 0, "created_at": now},
                )
                pipe.sadd(keys.accounts, account)
            # The balance now includes every ledger row: money in still on its way must not be
            # credited a second time by the grant that wrote it.
            for idempotency_id, account, amount in unapplied:
                pipe.set(keys.account(account).credited(idempotency_id), f"{account} {amount}")
            for key_id, account, key_hash in await store.active_keys():
                pipe.hset(keys.api_key(key_hash), mapping={"account": account, "id": key_id})
                pipe.set(keys.api_key_id(key_id), key_hash)
                pipe.sadd(keys.account(account).api_keys, key_id)
            pipe.set(keys.initialized, now)
            await pipe.execute()
        await store.mark_applied([row[0] for row in unapplied])
        log.warning("rebuilt Redis from the ledger: %d accounts", len(ledger_view))
        return True
    finally:
        await redis.delete(keys.rebuild_lock)
