"""Rebuilding a lost Redis from the ledger (Postgres is the truth): accounts, balances, active keys, the
money in still on its way, the settled markers of the debits whose request could still be retried, the
billing modes' credit lines and blocks (credit_lines.py), and the BYOK vault's sealed keys (vault/mirror.py).

A Redis that comes up empty (first start, or lost without persistence), or a cluster shard that lost its
keys, is rebuilt partition by partition; see ``rebuild_if_empty``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from typing import Any

from .caps import restore_caps
from .credit_lines import ledger_lines, queue_line
from .keys import AccountKeys, KeySpace
from .keys_api import restore_key_expiries
from .ledger_store import LedgerConnection, LedgerStore
from .reconcile import redis_snapshot
from .redis_client import RedisClient
from .vault.mirror import restore_vault
from .wallet import Grant, draw

log = logging.getLogger("creditgate.rebuild")

# A restored marker lives this much past its debit's time plus the window: the window end a settle carries
# is taken a moment after its event's time (milliseconds), and the slack covers that and clock skew.
MARKER_SLACK_MS = 60_000
MARKER_BATCH = 2_000  # markers written per round trip


async def partitions_to_rebuild(redis: RedisClient, keys: KeySpace) -> list[int]:
    """Every partition when Redis holds nothing of ours; else those that lost their ready marker: on a
    Redis Cluster one shard can lose its data (a master restarted without persistence, no replica to
    take over) while the others, and the ``initialized`` marker, survive. A Redis initialised with no
    ready marker at all is a deployment from before the markers existed: it gets them, nothing is
    rebuilt."""
    if not await redis.exists(keys.initialized):
        return list(range(keys.partitions))
    async with redis.pipeline(transaction=False) as pipe:  # one key per command: split by node
        for partition in range(keys.partitions):
            pipe.exists(keys.ready(partition))
        present = await pipe.execute()
    missing = [partition for partition, found in enumerate(present) if not found]
    if len(missing) < keys.partitions:
        return missing
    async with redis.pipeline(transaction=False) as pipe:
        for partition in range(keys.partitions):
            pipe.set(keys.ready(partition), "1", nx=True)  # never overwritten
        await pipe.execute()
    return []


async def rebuild_if_empty(
    redis: RedisClient,
    keys: KeySpace,
    store: LedgerStore,
    *,
    settled_marker_ms: int,
    now_ms: int | None = None,
) -> bool:
    """When Redis holds nothing of ours (first start, or Redis was lost), or some partitions lost their
    keys (a cluster shard lost), load accounts, balances and active keys from the ledger for those
    partitions. One process does it (a lock); returns True when this one did.

    Balances are *set* to the ledger's figures (never added to), partition by partition in one
    transaction each, together with the partition's ready marker. Until that marker exists the credit
    script refuses money in, so no credit can land in Redis and then be counted again by the rebuild;
    a grant refused meanwhile stays "not applied" and is completed afterwards. Running the writes twice
    (a retry) leaves the same state. Partitions that kept their marker are not written.

    Before the balances, the settled markers of the ledger's debits from the last `settled_marker_ms`
    (the request window) are written again: a settle retried after the rebuild, or a reserve arriving
    late, then finds its request settled instead of charging it twice (see ``restore_settled_markers``).
    The grants are the ledger's (`restore_grants`), their last activity `now_ms` (the wallet's clock)."""
    if not await partitions_to_rebuild(redis, keys):
        return False
    if not await redis.set(keys.rebuild_lock, "1", nx=True, px=120_000):
        return False
    try:
        todo = set(await partitions_to_rebuild(redis, keys))  # again, under the lock
        if not todo:
            return False
        async with store.barrier() as conn:
            ledger_view, unapplied = await store.ledger_view(conn)
            unflushed = (await redis_snapshot(redis, keys, store, conn, list(ledger_view), [])).unflushed
            markers = await restore_settled_markers(redis, keys, conn, todo, settled_marker_ms)
            grants = await store.grant_remainders(conn)
            lines = await ledger_lines(conn)  # invoice mode's credit lines and blocks
            keys_rows = await conn.fetch(
                "SELECT id, account_id, key_hash FROM api_keys WHERE revoked_at IS NULL"
            )
            now = int(time.time())
            active_ms = now * 1000 if now_ms is None else now_ms  # the grants' last activity
            by_partition: dict[int, list[str]] = defaultdict(list)
            for account in ledger_view:
                by_partition[keys.partition_of(account)].append(account)
            unapplied_by_partition: dict[int, list[tuple[str, str, int]]] = defaultdict(list)
            for pending in unapplied:
                unapplied_by_partition[keys.partition_of(pending[1])].append(pending)
            for partition in sorted(todo):
                async with redis.pipeline(transaction=True) as pipe:  # one slot: the partition's
                    for account in by_partition.get(partition, []):
                        k = keys.account(account)
                        # The ledger's balance less the debits still in this Redis' outbox (they are
                        # already out of a surviving balance, and will reach the ledger).
                        balance = ledger_view[account][0] - unflushed.get(account, 0)
                        pipe.hset(k.balance, "balance", str(balance))
                        pipe.hsetnx(k.balance, "held", 0)
                        pipe.hsetnx(k.balance, "created_at", now)
                        restore_grants(pipe, k, within(grants.get(account, []), balance), active_ms)
                        queue_line(pipe, k.balance, *lines.get(account, ("", False)))
                    # The balances include the money in still on its way: its grant must not credit again.
                    for idempotency_id, account, amount in unapplied_by_partition.get(partition, []):
                        pipe.set(keys.account(account).credited(idempotency_id), f"{account} {amount}")
                    pipe.set(keys.ready(partition), "1")
                    await pipe.execute()
            async with redis.pipeline(transaction=False) as pipe:  # each is set, never added: idempotent
                if ledger_view:
                    pipe.sadd(keys.accounts, *ledger_view)
                for row in keys_rows:
                    pipe.hset(
                        keys.api_key(row["key_hash"]), mapping={"account": row["account_id"], "id": row["id"]}
                    )
                    pipe.set(keys.api_key_id(row["id"]), row["key_hash"])
                    pipe.sadd(keys.account(row["account_id"]).api_keys, row["id"])
                pipe.set(keys.initialized, now)
                await pipe.execute()
        # The caps, the time zones and the keys' expiries, from Postgres (the spend counts start again).
        await restore_caps(redis, keys, store)
        await restore_key_expiries(redis, keys, store)
        await restore_vault(redis, keys, store.pool, todo)  # the BYOK vault's sealed keys
        # Money in the rebuilt balances already count; in partitions left alone it is still pending.
        await store.mark_applied([p[0] for p in unapplied if keys.partition_of(p[1]) in todo])
        log.warning(
            "rebuilt Redis from the ledger: %d accounts in %d of %d partitions, %d settled markers",
            sum(len(by_partition.get(p, [])) for p in todo),
            len(todo),
            keys.partitions,
            markers,
        )
        return True
    finally:
        await redis.delete(keys.rebuild_lock)


def within(grants: list[Grant], balance: int) -> list[Grant]:
    """The grants, their remainders lowered (in draw order) until they sum to at most the balance: a
    payoff of a negative balance that Redis made and lost before the ledger had it is made again."""
    excess = sum(g.remaining for g in grants) - max(balance, 0)
    if excess <= 0:
        return grants
    taken = dict(draw(grants, excess, 0, 0))
    return [dataclasses.replace(g, remaining=g.remaining - taken.get(g.grant_id, 0)) for g in grants]


def restore_grants(pipe: Any, k: AccountKeys, grants: list[Grant], now_ms: int) -> None:
    """Queue the writes that give an account the ledger's grants (what flushed usage, expiries and payoffs
    left of each) and the wallet's summary fields; its last activity is taken as now (the rebuild lost it:
    an idle expiry restarts)."""
    pipe.delete(k.grants)
    due = 0
    idle = False
    for g in grants:
        if g.remaining <= 0:
            continue
        pipe.hset(k.grants, g.grant_id, g.encode())
        due = g.expires_ms if g.expires_ms and (due == 0 or g.expires_ms < due) else due
        idle = idle or g.idle
    pipe.hset(k.balance, mapping={"due": str(due), "idle": "1" if idle else "0", "active_ms": str(now_ms)})
    if due or idle:  # the sweeper looks at it by then; it expires nothing before a grant ends
        pipe.zadd(k.wallet_due, {k.account: due or now_ms})
    else:
        pipe.zrem(k.wallet_due, k.account)


async def restore_settled_markers(
    redis: RedisClient, keys: KeySpace, conn: LedgerConnection, partitions: set[int], settled_marker_ms: int
) -> int:
    """Write the settled marker of every debit in these partitions that the ledger holds from the last
    `settled_marker_ms` (its charge; expiring at its time + the window + MARKER_SLACK_MS), so that no
    settle or reserve still inside its window can move money for it again. Returns how many. A debit
    that never reached the ledger was lost with Redis: its retry is the settle that charges it. A release
    (nothing charged) left no row and gets no marker: its retry moves nothing either way. SET overwrites
    with the same value, so running it twice is harmless."""
    now_ms = time.time_ns() // 1_000_000
    written = 0
    async with redis.pipeline(transaction=False) as pipe:  # one key per command: split by node
        async for account, request_id, charge, created_ms in LedgerStore.recent_debits(
            conn, now_ms - settled_marker_ms - MARKER_SLACK_MS
        ):
            expires_ms = created_ms + settled_marker_ms + MARKER_SLACK_MS
            if keys.partition_of(account) not in partitions or expires_ms <= now_ms:
                continue
            pipe.set(keys.account(account).settled(request_id), str(charge), pxat=expires_ms)
            written += 1
            if written % MARKER_BATCH == 0:
                await pipe.execute()
        await pipe.execute()
    return written
