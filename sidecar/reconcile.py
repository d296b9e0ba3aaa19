"""Keeping Redis (the hot copy) true to Postgres (the ledger): complete half-done money in, measure
drift and repair it (rebuilding a lost Redis from the ledger is ``rebuild``'s).

For every account, Redis' balance should equal

    ledger balance − money in not yet applied to Redis − debits settled in Redis but not yet flushed

(active holds are kept apart, in the ``held`` field, and never touch the balance). The comparison holds
the ledger barrier (``LedgerStore.barrier``): while it reads Redis and then Postgres, no usage batch
commits and no money in is marked applied, so both reads describe the same moment. Settlements go on in Redis
meanwhile; they are either in the Redis snapshot and its outbox, or in neither.
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from dataclasses import dataclass

from .balances import Balances
from .errors import NotInitialized, UnknownAccount
from .keys import KeySpace
from .ledger_store import LedgerConnection, LedgerStore
from .outbox import decode_entry, ledger_time_ms
from .redis_client import RedisClient

log = logging.getLogger("creditgate.reconcile")


@dataclass(frozen=True, slots=True)
class Drift:
    account: str
    redis_balance: int | None  # None: the account is missing from Redis
    expected: int
    redis_held: int = 0  # the account's `held` field
    holds_total: int = 0  # the sum of its holds hash, which `held` must equal

    @property
    def amount(self) -> int:
        return (self.redis_balance or 0) - self.expected

    @property
    def held_amount(self) -> int:
        return self.redis_held - self.holds_total


@dataclass(frozen=True, slots=True)
class _RedisView:
    balance: int | None
    held: int
    holds_total: int


async def complete_money_in(store: LedgerStore, balances: Balances, older_than_seconds: float = 0) -> int:
    """Credit Redis for ledger rows written by a grant that died before its Redis step; returns how many.
    A row whose account Redis does not know is skipped (``repair`` adds the account) and stays pending."""
    done = []
    for idempotency_id, account, amount in await store.unapplied(older_than_seconds):
        try:
            await balances.credit(account, idempotency_id, amount)
        except NotInitialized:
            log.warning("money in %s waits: Redis was not rebuilt from the ledger yet", idempotency_id)
            continue
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


async def redis_snapshot(
    redis: RedisClient,
    keys: KeySpace,
    store: LedgerStore,
    conn: LedgerConnection,
    accounts: list[str],
    unapplied: list[tuple[str, str, int]],
) -> tuple[dict[str, _RedisView], dict[str, int], set[str]]:
    """Per account its Redis balance, held total and holds (read atomically per partition with the
    partition's outbox and with the markers of money in not yet marked applied); the debits still in the
    outbox that the ledger does not hold yet; and which of the `unapplied` money-in ids Redis has already
    credited. Call it inside ``store.barrier()``, after reading `unapplied` there."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    for account in accounts:
        by_partition[keys.partition_of(account)].append(account)
    pending_by_partition: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for idempotency_id, account, _ in unapplied:
        pending_by_partition[keys.partition_of(account)].append((idempotency_id, account))
    views: dict[str, _RedisView] = {}
    credited: set[str] = set()
    debits: list[tuple[str, str, int, int]] = []  # account, request id, charge, created_ms
    for partition in range(keys.partitions):
        members = by_partition.get(partition, [])
        pending = pending_by_partition.get(partition, [])
        async with redis.pipeline(transaction=True) as pipe:  # every key here is in the partition's slot
            pipe.xrange(keys.outbox(partition))
            for account in members:
                k = keys.account(account)
                pipe.hmget(k.balance, ["balance", "held"])
                pipe.hvals(k.holds)
            for idempotency_id, account in pending:
                pipe.exists(keys.account(account).credited(idempotency_id))
            outbox, *replies = await pipe.execute()
        for i, account in enumerate(members):
            (balance, held), holds = replies[2 * i], replies[2 * i + 1]
            views[account] = _RedisView(
                int(balance) if balance is not None else None,
                int(held or 0),
                sum(int(amount) for amount in holds),
            )
        for (idempotency_id, _), exists in zip(pending, replies[2 * len(members) :], strict=True):
            if exists:
                credited.add(idempotency_id)
        for entry_id, fields in outbox:
            entry = decode_entry(fields)
            debits.append((entry.account, entry.request_id, entry.charge, ledger_time_ms(entry, entry_id)))
    flushed = await store.present(conn, [(account, rid, ms) for account, rid, _, ms in debits])
    unflushed: dict[str, int] = defaultdict(int)
    for account, rid, charge, _ in debits:
        if rid not in flushed:
            unflushed[account] += charge
    return views, unflushed, credited


async def reconcile(redis: RedisClient, keys: KeySpace, store: LedgerStore) -> list[Drift]:
    """Accounts whose Redis balance disagrees with the ledger, or whose held total disagrees with the
    sum of their holds. Money in that Redis already credited but Postgres has not marked applied yet (a
    grant between its two steps) counts as applied: its credit marker is read with the balance."""
    async with store.barrier() as conn:
        ledger_view, unapplied = await store.ledger_view(conn)
        views, unflushed, credited = await redis_snapshot(
            redis, keys, store, conn, list(ledger_view), unapplied
        )
    waiting: dict[str, int] = defaultdict(int)  # money in not yet in Redis, per account
    for idempotency_id, account, amount in unapplied:
        if idempotency_id not in credited:
            waiting[account] += amount
    found = []
    for account, (ledger_balance, _) in sorted(ledger_view.items()):
        view = views[account]
        drift = Drift(
            account,
            view.balance,
            ledger_balance - waiting.get(account, 0) - unflushed.get(account, 0),
            view.held,
            view.holds_total,
        )
        if drift.redis_balance is None or drift.amount or drift.held_amount:
            found.append(drift)
    return found


async def repair(redis: RedisClient, keys: KeySpace, store: LedgerStore, balances: Balances) -> list[Drift]:
    """Add accounts missing from Redis, complete half-done money in, then move each drifting Redis
    balance onto the ledger's figure (by an idempotent adjustment, safe under redis-py's retries) and
    set each drifting held total to the sum of its holds. Returns the drifts found before repairing."""
    drifts = await reconcile(redis, keys, store)
    for drift in drifts:
        if drift.redis_balance is None:
            k = keys.account(drift.account)
            await redis.hsetnx(k.balance, "balance", 0)
            await redis.hsetnx(k.balance, "held", 0)
            await redis.sadd(keys.accounts, drift.account)
    await complete_money_in(store, balances)
    for drift in await reconcile(redis, keys, store):
        if drift.amount:
            await balances.adjust(drift.account, f"repair:{uuid.uuid4().hex}", -drift.amount)
            log.warning(
                "repaired %s: Redis balance %s -> %d", drift.account, drift.redis_balance, drift.expected
            )
        if drift.held_amount:
            before, after = await balances.fix_held(drift.account)
            log.warning("repaired %s: held %d -> %d (the sum of its holds)", drift.account, before, after)
    return drifts
