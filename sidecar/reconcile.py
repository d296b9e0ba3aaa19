"""Keeping Redis (the hot copy) true to Postgres (the ledger): complete half-done money in, measure
drift, repair it, and rebuild Redis from the ledger when it comes up empty.

For every account, Redis' balance should equal

    ledger balance − money in not yet applied to Redis − debits settled in Redis but not yet flushed

(active holds are kept apart, in the ``held`` field, and never touch the balance). The comparison holds
the ledger barrier (``Store.barrier``): while it reads Redis and then Postgres, no usage batch commits and
no money in is marked applied, so both reads describe the same moment. Settlements go on in Redis
meanwhile; they are either in the Redis snapshot and its outbox, or in neither.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import WatchError

from .keys import KeySpace
from .ledger import RedisLedger, UnknownAccount
from .outbox import decode_entry
from .store import LedgerConnection, Store

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
    """Credit Redis for ledger rows written by a grant that died before its Redis step; returns how many.
    A row whose account Redis does not know is skipped (``repair`` adds the account) and stays pending."""
    done = []
    for idempotency_id, account, amount in await store.unapplied(older_than_seconds):
        try:
            await ledger.credit(account, idempotency_id, amount)
        except UnknownAccount:
            log.error(
                "money in %s waits: account %s is missing from Redis (run reconcile --repair)",
                idempotency_id,
                account,
            )
            continue
        done.append(idempotency_id)
    await store.mark_applied(done)
    return len(done)


async def _snapshot(
    redis: Redis, keys: KeySpace, store: Store, conn: LedgerConnection, accounts: list[str]
) -> tuple[dict[str, int | None], dict[str, int]]:
    """Redis balances (read atomically per partition with its outbox) and, per account, the debits
    still in the outbox that the ledger does not hold yet. Call it inside ``store.barrier()``."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    for account in accounts:
        by_partition[keys.partition_of(account)].append(account)
    balances: dict[str, int | None] = {}
    debits: list[tuple[str, str, int]] = []
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
            debits.append((entry.account, entry.request_id, entry.charge))
    flushed = await store.present(conn, [rid for _, rid, _ in debits])
    unflushed: dict[str, int] = defaultdict(int)
    for account, rid, charge in debits:
        if rid not in flushed:
            unflushed[account] += charge
    return balances, unflushed


async def reconcile(redis: Redis, keys: KeySpace, store: Store) -> list[Drift]:
    """Accounts whose Redis balance disagrees with the ledger."""
    async with store.barrier() as conn:
        accounts = [r["id"] for r in await conn.fetch("SELECT id FROM accounts")]
        balances, unflushed = await _snapshot(redis, keys, store, conn, accounts)
        ledger_view, _ = await store.ledger_view(conn)
    found = []
    for account, (ledger_balance, unapplied) in sorted(ledger_view.items()):
        if account not in balances:
            continue  # created after the snapshot's account list: next pass
        drift = Drift(account, balances[account], ledger_balance - unapplied - unflushed.get(account, 0))
        if drift.redis_balance is None or drift.amount:
            found.append(drift)
    return found


async def repair(redis: Redis, keys: KeySpace, store: Store, ledger: RedisLedger) -> list[Drift]:
    """Add accounts missing from Redis, complete half-done money in, then move each drifting Redis
    balance onto the ledger's figure (by an idempotent adjustment, safe under redis-py's retries).
    Returns the drifts found before repairing."""
    drifts = await reconcile(redis, keys, store)
    for drift in drifts:
        if drift.redis_balance is None:
            k = keys.account(drift.account)
            await redis.hsetnx(k.balance, "balance", 0)
            await redis.hsetnx(k.balance, "held", 0)
            await redis.sadd(keys.accounts, drift.account)
    await complete_money_in(store, ledger)
    for drift in await reconcile(redis, keys, store):
        await ledger.adjust(drift.account, f"repair:{uuid.uuid4().hex}", -drift.amount)
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
        async with store.barrier() as conn:
            ledger_view, unapplied = await store.ledger_view(conn)
            _, unflushed = await _snapshot(redis, keys, store, conn, list(ledger_view))
            keys_rows = await conn.fetch(
                "SELECT id, account_id, key_hash FROM api_keys WHERE revoked_at IS NULL"
            )
            now = int(time.time())
            # Balances are added (HINCRBY), so this must never run twice: one MULTI/EXEC (all or
            # nothing, `initialized` included) under WATCH, which redis-py does not resend when its
            # reply is lost (it raises WatchError); `initialized` then tells whether it ran.
            async with redis.pipeline(transaction=True) as pipe:
                await pipe.watch(keys.initialized)
                pipe.multi()  # type: ignore[no-untyped-call]
                for account, (ledger_balance, _) in ledger_view.items():
                    k = keys.account(account)
                    # Added, not set: a grant that raced in (after the snapshot) has already credited.
                    pipe.hincrby(k.balance, "balance", ledger_balance - unflushed.get(account, 0))
                    pipe.hsetnx(k.balance, "held", 0)
                    pipe.hsetnx(k.balance, "created_at", now)
                    pipe.sadd(keys.accounts, account)
                # The balances include the money in still on its way: its grant must not credit again.
                for idempotency_id, account, amount in unapplied:
                    pipe.set(keys.account(account).credited(idempotency_id), f"{account} {amount}")
                for row in keys_rows:
                    pipe.hset(
                        keys.api_key(row["key_hash"]), mapping={"account": row["account_id"], "id": row["id"]}
                    )
                    pipe.set(keys.api_key_id(row["id"]), row["key_hash"])
                    pipe.sadd(keys.account(row["account_id"]).api_keys, row["id"])
                pipe.set(keys.initialized, now)
                try:
                    await pipe.execute()
                except WatchError:
                    if not await redis.exists(keys.initialized):
                        raise
        await store.mark_applied([row[0] for row in unapplied])
        log.warning("rebuilt Redis from the ledger: %d accounts", len(ledger_view))
        return True
    finally:
        await redis.delete(keys.rebuild_lock)
