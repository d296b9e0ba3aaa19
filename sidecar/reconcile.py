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
import time
from collections import defaultdict
from dataclasses import dataclass, field

from .balances import Balances
from .errors import NotInitialized, UnknownAccount
from .keys import KeySpace, as_text
from .ledger_sql import BATCH_FIELDS
from .ledger_store import LedgerConnection, LedgerStore
from .outbox import BadEntry, decode_entry, ledger_time_ms, move_row
from .redis_client import RedisClient

_ID, _ACCOUNT, _AMOUNT, _CREATED = (
    BATCH_FIELDS.index(f) for f in ("idempotency_id", "account_id", "amount", "created_ms")
)
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
class HoldDrift:
    """A hold nothing will release in time: `orphan_hold` (in the account's holds hash, with no member in
    the partition's hold-expiry zset, so no reaper ever finds it) or `stale_hold` (its lease ended more
    than `stale_hold_ms` ago and it is still there: the reaper is stuck or not running)."""

    kind: str
    account: str
    request_id: str
    amount: int  # the held micro-credits (0: an expiry member whose hold is gone already)
    lease_end_ms: int | None  # None for an orphan


@dataclass(frozen=True, slots=True)
class GrantDrift:
    """Money in the ledger holds but Redis was not credited with, `age_seconds` after its row was written
    (the reconciler completes those older than a minute; one still here could not be completed)."""

    idempotency_id: str
    account: str
    amount: int
    age_seconds: float


DRIFT_KINDS = ("balance", "held", "orphan_hold", "stale_hold", "grant_unapplied")


@dataclass(slots=True)
class Report:
    """One reconcile pass: every drift found, by kind, and (after a repair) what was repaired."""

    accounts: list[Drift] = field(default_factory=list)  # balance or held total differ
    holds: list[HoldDrift] = field(default_factory=list)
    grants: list[GrantDrift] = field(default_factory=list)
    repaired: dict[str, int] = field(default_factory=dict)  # kind -> items repaired now

    def by_kind(self) -> dict[str, tuple[int, int]]:
        """kind -> (items, Σ |micro-credits|): accounts for balance and held, holds, money-in rows."""
        out = dict.fromkeys(DRIFT_KINDS, (0, 0))
        balance = [d for d in self.accounts if d.redis_balance is None or d.amount]
        held = [d for d in self.accounts if d.held_amount]
        out["balance"] = (len(balance), sum(abs(d.amount) for d in balance))
        out["held"] = (len(held), sum(abs(d.held_amount) for d in held))
        for kind in ("orphan_hold", "stale_hold"):
            holds = [h for h in self.holds if h.kind == kind]
            out[kind] = (len(holds), sum(h.amount for h in holds))
        out["grant_unapplied"] = (len(self.grants), sum(abs(g.amount) for g in self.grants))
        return out

    @property
    def clean(self) -> bool:
        return not (self.accounts or self.holds or self.grants)


@dataclass(frozen=True, slots=True)
class _RedisView:
    balance: int | None
    held: int
    holds: dict[str, int]  # request id -> held

    @property
    def holds_total(self) -> int:
        return sum(self.holds.values())


@dataclass(frozen=True, slots=True)
class Snapshot:
    views: dict[str, _RedisView]  # per account of the ledger
    unflushed: dict[str, int]  # account -> debits in the outbox the ledger lacks
    credited: set[str]  # the money-in ids (of `unapplied`) Redis has credited
    leases: dict[str, int]  # hold-expiry member ("<account> <request id>") -> lease end (ms)


async def complete_money_in(store: LedgerStore, balances: Balances, older_than_seconds: float = 0) -> int:
    """Credit Redis for ledger rows written by a grant that died before its Redis step, and mark them
    applied; returns how many this call credited (a row Redis had credited already, by the grant itself
    or by another process completing it at once, is only marked). A row whose account Redis does not
    know is skipped (``repair`` adds the account) and stays pending."""
    done = []
    credited = 0
    for pending in await store.unapplied_grants(older_than_seconds):
        idempotency_id, account = pending.idempotency_id, pending.account
        try:
            now, _ = await balances.credit(
                account, idempotency_id, pending.amount, pending.terms, grant_id=pending.grant_id
            )
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
        credited += now
    await store.mark_applied(done)
    return credited


async def redis_snapshot(
    redis: RedisClient,
    keys: KeySpace,
    store: LedgerStore,
    conn: LedgerConnection,
    accounts: list[str],
    unapplied: list[tuple[str, str, int]],
) -> Snapshot:
    """Per account its Redis balance, held total and holds (read atomically per partition with the
    partition's outbox, its hold-expiry zset and the markers of money in not yet marked applied); the
    debits still in the outbox that the ledger does not hold yet; which of the `unapplied` money-in ids
    Redis has already credited; and every hold's lease end. Call it inside ``store.barrier()``, after
    reading `unapplied` there."""
    by_partition: dict[int, list[str]] = defaultdict(list)
    for account in accounts:
        by_partition[keys.partition_of(account)].append(account)
    pending_by_partition: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for idempotency_id, account, _ in unapplied:
        pending_by_partition[keys.partition_of(account)].append((idempotency_id, account))
    views: dict[str, _RedisView] = {}
    credited: set[str] = set()
    leases: dict[str, int] = {}
    debits: list[tuple[str, str, int, int]] = []  # account, request id, charge, created_ms
    for partition in range(keys.partitions):
        members = by_partition.get(partition, [])
        pending = pending_by_partition.get(partition, [])
        async with redis.pipeline(transaction=True) as pipe:  # every key here is in the partition's slot
            pipe.xrange(keys.outbox(partition))
            pipe.zrange(keys.hold_expiry(partition), 0, -1, withscores=True)
            for account in members:
                k = keys.account(account)
                pipe.hmget(k.balance, ["balance", "held"])
                pipe.hgetall(k.holds)
            for idempotency_id, account in pending:
                pipe.exists(keys.account(account).credited(idempotency_id))
            outbox, expiry, *replies = await pipe.execute()
        for member, score in expiry:
            leases[as_text(member)] = int(score)
        for i, account in enumerate(members):
            (balance, held), holds = replies[2 * i], replies[2 * i + 1]
            views[account] = _RedisView(
                int(balance) if balance is not None else None,
                int(held or 0),
                {as_text(rid): int(amount) for rid, amount in holds.items()},
            )
        for (idempotency_id, _), exists in zip(pending, replies[2 * len(members) :], strict=True):
            if exists:
                credited.add(idempotency_id)
        for entry_id, fields in outbox:
            try:
                moved = move_row(fields)  # an expiry or a payoff, as the flusher will write it
            except BadEntry:
                continue  # never a ledger row (a dead letter to be): what it moved is drift
            if moved is not None:
                if moved[_AMOUNT]:  # an expiry, a debit until its row is in (a payoff moves no balance)
                    debits.append((moved[_ACCOUNT], moved[_ID], -moved[_AMOUNT], moved[_CREATED]))
                continue
            entry = decode_entry(fields)
            debits.append((entry.account, entry.request_id, entry.charge, ledger_time_ms(entry, entry_id)))
    flushed = await store.present(conn, [(account, rid, ms) for account, rid, _, ms in debits])
    unflushed: dict[str, int] = defaultdict(int)
    for account, rid, charge, _ in debits:
        if rid not in flushed:
            unflushed[account] += charge
    return Snapshot(views, unflushed, credited, leases)


# A lease that ended this long ago should have been reaped: two reaper intervals, plus slack for the
# clocks of the sidecars that set the leases (see `stale_after_ms`).
STALE_HOLD_SLACK_MS = 30_000
GRANT_GRACE_SECONDS = 60.0  # money in younger than this may be a grant between its two steps


def stale_after_ms(reaper_interval_seconds: float) -> int:
    """How long after its lease end a hold still there counts as stale (the reaper is stuck)."""
    return int(reaper_interval_seconds * 2_000) + STALE_HOLD_SLACK_MS


async def inspect(
    redis: RedisClient,
    keys: KeySpace,
    store: LedgerStore,
    *,
    now_ms: int | None = None,
    stale_hold_ms: int = stale_after_ms(5.0),
    grant_grace_seconds: float = GRANT_GRACE_SECONDS,
) -> Report:
    """Every drift of every kind (``DRIFT_KINDS``), read in one snapshot under the ledger barrier:
    accounts whose balance or held total disagree (``reconcile``), orphan and stale holds, and money in
    older than `grant_grace_seconds` that Redis was not credited with."""
    async with store.barrier() as conn:
        ledger_view, unapplied = await store.ledger_view(conn)
        ages = await store.unapplied_ages(conn)
        snap = await redis_snapshot(redis, keys, store, conn, list(ledger_view), unapplied)
    now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    report = Report(accounts=_account_drifts(ledger_view, unapplied, snap))
    for account, view in sorted(snap.views.items()):
        k = keys.account(account)
        for request_id, amount in sorted(view.holds.items()):
            if k.expiry_member(request_id) not in snap.leases:
                report.holds.append(HoldDrift("orphan_hold", account, request_id, amount, None))
    for member, lease_end in sorted(snap.leases.items()):
        if lease_end < now_ms - stale_hold_ms:
            account, _, request_id = member.partition(" ")
            seen = snap.views.get(account)
            amount = seen.holds.get(request_id, 0) if seen else 0
            report.holds.append(HoldDrift("stale_hold", account, request_id, amount, lease_end))
    for idempotency_id, account, amount in unapplied:
        age = ages.get(idempotency_id, 0.0)
        if idempotency_id not in snap.credited and age >= grant_grace_seconds:
            report.grants.append(GrantDrift(idempotency_id, account, amount, age))
    return report


async def reconcile(redis: RedisClient, keys: KeySpace, store: LedgerStore) -> list[Drift]:
    """Accounts whose Redis balance disagrees with the ledger, or whose held total disagrees with the
    sum of their holds. Money in that Redis already credited but Postgres has not marked applied yet (a
    grant between its two steps) counts as applied: its credit marker is read with the balance."""
    async with store.barrier() as conn:
        ledger_view, unapplied = await store.ledger_view(conn)
        snap = await redis_snapshot(redis, keys, store, conn, list(ledger_view), unapplied)
    return _account_drifts(ledger_view, unapplied, snap)


def _account_drifts(
    ledger_view: dict[str, tuple[int, int]], unapplied: list[tuple[str, str, int]], snap: Snapshot
) -> list[Drift]:
    views, unflushed, credited = snap.views, snap.unflushed, snap.credited
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
