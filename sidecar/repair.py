"""Repairing what the reconciler finds (``reconcile.inspect``): every kind of drift, idempotently.

Run twice, or by two processes at once, a repair changes nothing the second time: every step sets a value
(a held total, a missing account), is keyed by an id (money in, a hold's release), or moves a balance by
``repair_balance``: keyed by a repair id derived from the snapshot and only while the balance is the one
that snapshot saw.
"""

from __future__ import annotations

import logging
import time
from weakref import WeakKeyDictionary

from redis.commands.core import AsyncScript

from .balances import Balances, load_lua
from .errors import IdempotencyConflict, NotInitialized, UnknownAccount
from .keys import KeySpace
from .ledger_store import LedgerStore
from .reconcile import (
    DRIFT_KINDS,
    GRANT_GRACE_SECONDS,
    Drift,
    Report,
    complete_money_in,
    inspect,
    reconcile,
    stale_after_ms,
)
from .redis_client import RedisClient

log = logging.getLogger("creditgate.reconcile")
_SCRIPTS: WeakKeyDictionary[Balances, AsyncScript] = WeakKeyDictionary()


async def repair_balance(balances: Balances, account: str, repair_id: str, observed: int, delta: int) -> int:
    """Move the Redis balance by `delta` (either sign), once per repair id and only while it is still
    `observed` (the balance the delta was computed from): lua/repair_balance.lua. Returns its status (1
    moved now, 0 moved before by this repair id, -3 the balance moved since: nothing done). The ledger
    is the truth; this brings the hot copy back to it. Sent again by redis-py when its reply is lost."""
    script = _SCRIPTS.get(balances)
    if script is None:
        script = _SCRIPTS[balances] = balances.redis.register_script(load_lua("repair_balance"))
    k = balances.keys.account(account)
    status, _ = await script(
        keys=[k.balance, k.credited(repair_id), k.ready],
        args=[str(observed), str(delta), f"{account} {delta}"],
    )
    if status == -1:
        raise UnknownAccount(account)
    if status == -2:
        raise IdempotencyConflict(repair_id)
    if status == -4:
        raise NotInitialized(account)
    return int(status)


async def repair(redis: RedisClient, keys: KeySpace, store: LedgerStore, balances: Balances) -> list[Drift]:
    """``repair_all``, returning the accounts whose balance or held total drifted before repairing."""
    return (await repair_all(redis, keys, store, balances)).accounts


async def repair_all(
    redis: RedisClient,
    keys: KeySpace,
    store: LedgerStore,
    balances: Balances,
    *,
    stale_hold_ms: int = stale_after_ms(5.0),
    grant_grace_seconds: float = GRANT_GRACE_SECONDS,
) -> Report:
    """Repair every drift ``inspect`` finds; returns what it found before repairing, with `repaired`
    counting what this call changed, per kind. Add accounts missing from Redis, complete half-done
    money in older than `grant_grace_seconds`, release orphan and stale holds through the reaper's
    script, then move each drifting Redis balance onto the ledger's figure and set each drifting held
    total to the sum of its holds.

    Idempotent, also when run twice or by two processes at once: every step either sets a value (held,
    a missing account) or is keyed by an id (money in; a release, by its hold), and a balance is moved
    by ``repair_balance``, keyed by a repair id derived from the snapshot (the balance seen and
    the ledger's figure, never a random id) and only while the balance is still the one seen. A balance
    that moved since the snapshot (traffic, or another repair) is left for the next pass."""
    now_ms = time.time_ns() // 1_000_000
    found = await inspect(
        redis,
        keys,
        store,
        now_ms=now_ms,
        stale_hold_ms=stale_hold_ms,
        grant_grace_seconds=grant_grace_seconds,
    )
    repaired = dict.fromkeys(DRIFT_KINDS, 0)
    for drift in found.accounts:
        if drift.redis_balance is None:
            k = keys.account(drift.account)
            await redis.hsetnx(k.balance, "balance", 0)
            await redis.hsetnx(k.balance, "held", 0)
            await redis.sadd(keys.accounts, drift.account)
    # Money in younger than the grace is most likely a grant between its two steps: its own.
    repaired["grant_unapplied"] = await complete_money_in(store, balances, grant_grace_seconds)
    for hold in found.holds:
        released = await balances.expire_hold(
            hold.account, hold.request_id, now_ms, orphan=hold.kind == "orphan_hold"
        )
        if released or hold.amount == 0:
            repaired[hold.kind] += 1
            log.warning(
                "repaired %s: released %s %s (%d)", hold.account, hold.kind, hold.request_id, released
            )
    moved, fixed = await repair_accounts(balances, await reconcile(redis, keys, store))
    repaired["balance"] += moved
    repaired["held"] += fixed
    found.repaired = repaired
    return found


async def repair_accounts(balances: Balances, drifts: list[Drift]) -> tuple[int, int]:
    """Move each drifting balance onto its ledger figure and set each drifting held total to the sum of
    its holds; returns (balances moved, held totals changed) by this call. A drift list applied again
    (a retry, or another process with the same or an older snapshot) moves nothing: each move is keyed
    by its snapshot and made only while the balance is the one that snapshot saw."""
    moved = fixed = 0
    for drift in drifts:
        if drift.amount:
            observed = drift.redis_balance or 0
            status = await repair_balance(
                balances, drift.account, f"repair:{observed}:{drift.expected}", observed, -drift.amount
            )
            if status == 1:
                moved += 1
                log.warning("repaired %s: Redis balance %d -> %d", drift.account, observed, drift.expected)
            elif status == -3:
                log.warning("repair of %s left for the next pass: its balance moved", drift.account)
        if drift.held_amount:
            before, after = await balances.fix_held(drift.account)
            if before != after:
                fixed += 1
                log.warning("repaired %s: held %d -> %d (the sum of its holds)", drift.account, before, after)
    return moved, fixed
