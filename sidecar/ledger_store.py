"""Postgres, the durable truth: migrations, accounts and keys, money in, usage batches, reconcile reads.

Nothing on the request path calls this module; the admin API, the flusher and the reconciler do.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import operator
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import asyncpg

from .ledger_schema import LedgerConnection as LedgerConnection
from .ledger_schema import add_partitions, migrate
from .ledger_sql import (
    COMPACT_ROLLUPS,
    FOLD_BALANCES,
    FOLD_GRANT_DRAWS,
    INSERT_NEW_USAGE,
    INSERT_USAGE,
    LEDGER_BARRIER,
    scoped,
)
from .money_in_store import MoneyIn as MoneyIn
from .money_in_store import MoneyInStore

log = logging.getLogger("creditgate.store")


_ACCOUNT_THEN_ID = operator.itemgetter(1, 0)  # a batch row's (account, request id)
FOLD_SECONDS = 1.0  # how often a flushing store folds the balance deltas and grant draws (see ledger_sql)
COMPACT_SECONDS = 60.0  # how often a flushing store compacts the usage roll-ups
PARTITIONS_SECONDS = 3600.0  # how often a flushing store makes sure the partitions ahead exist


class LedgerStore(MoneyInStore):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # Monthly partitions ahead, kept by the flushing store (hourly) once set; None: not by this one.
        self.partitions_ahead: int | None = None
        self._next_fold = 0.0
        self._next_partitions = time.monotonic() + PARTITIONS_SECONDS
        self._next_compact = time.monotonic() + COMPACT_SECONDS
        self._folding = False

    @classmethod
    async def connect(cls, dsn: str, *, min_size: int = 1, max_size: int = 4) -> LedgerStore:
        pool = await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size)
        return cls(pool)

    async def close(self) -> None:
        with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            async with asyncio.timeout(2):
                await self.fold_balances()  # leave accounts.balance whole for readers of the table
        await self.pool.close()

    async def fold_balances(self) -> None:
        """Fold the usage batches' balance deltas into accounts.balance (a no-op while another folds)."""
        await self.pool.execute(FOLD_BALANCES)

    async def fold_grant_draws(self) -> None:
        """Fold the batches' grant draws into grants.drawn (a no-op while another folds)."""
        await self.pool.execute(FOLD_GRANT_DRAWS)

    async def compact_rollups(self) -> None:
        """Merge the roll-up rows batches appended into one row per account, day, dimension and value."""
        await self.pool.execute(COMPACT_ROLLUPS)

    async def migrate(self) -> list[str]:
        async with self.pool.acquire() as conn:
            return await migrate(conn)

    async def add_partitions(self, ahead: int, now: dt.datetime | None = None) -> list[str]:
        """The ledger partitions of this month and `ahead` more, where missing (see ledger_schema)."""
        async with self.pool.acquire() as conn:
            return await add_partitions(conn, ahead, now)

    # ---- accounts and keys -----------------------------------------------------------------------

    async def create_account(self, account: str) -> bool:
        """False when it already exists."""
        status = await self.pool.execute(
            "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING", account
        )
        return bool(status == "INSERT 0 1")

    async def account_exists(self, account: str) -> bool:
        return bool(await self.pool.fetchval("SELECT true FROM accounts WHERE id = $1", account))

    async def add_key(
        self,
        key_id: str,
        account: str,
        key_hash: str,
        *,
        name: str | None = None,
        expires_at: dt.datetime | None = None,
        prefix: str | None = None,
    ) -> None:
        await self.pool.execute(
            "INSERT INTO api_keys (id, account_id, key_hash, name, expires_at, display_prefix)"
            " VALUES ($1, $2, $3, $4, $5, $6)",
            key_id,
            account,
            key_hash,
            name,
            expires_at,
            prefix,
        )

    async def revoke_key(self, key_id: str) -> tuple[str, str] | None:
        """(account, key hash) of the revoked key, or None when there is no such key."""
        row = await self.pool.fetchrow(
            "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1"
            " RETURNING account_id, key_hash",
            key_id,
        )
        return (row["account_id"], row["key_hash"]) if row else None

    async def active_keys(self) -> list[tuple[str, str, str]]:
        rows = await self.pool.fetch("SELECT id, account_id, key_hash FROM api_keys WHERE revoked_at IS NULL")
        return [(r["id"], r["account_id"], r["key_hash"]) for r in rows]

    # ---- usage (the flusher) -----------------------------------------------------------------------

    async def insert_usage(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Write a batch of usage rows in one transaction; request ids already present are skipped, so a
        replayed batch changes nothing. Accounts the ledger has not seen yet (Redis rebuilt from an older
        backup, say) are added first, so one unknown account cannot block the batch."""
        # Rows in (account, request id) order, so concurrent batches lock index entries and account rows
        # in one order; a deadlock Postgres still detects (it aborts one of the two statements, which
        # changed nothing) is retried: the insert is idempotent.
        ordered = sorted(rows, key=_ACCOUNT_THEN_ID)
        if not ordered:
            return
        for attempt in range(5):
            try:
                await self._insert_usage(ordered)
                break
            except asyncpg.DeadlockDetectedError:
                if attempt == 4:
                    raise
                log.warning("a usage batch deadlocked with another; retrying it")
        await self._upkeep()

    async def _upkeep(self) -> None:
        """After a batch, now and then: fold the balance deltas and grant draws; every minute, compact the
        roll-ups; hourly, the partitions ahead (a sidecar running for months still has its months'
        partitions). One at a time per store."""
        now = time.monotonic()
        if self._folding or now < self._next_fold:
            return
        self._next_fold, self._folding = now + FOLD_SECONDS, True
        try:
            await self.fold_balances()
            await self.fold_grant_draws()
            if now >= self._next_compact:
                self._next_compact = now + COMPACT_SECONDS
                await self.compact_rollups()
            if self.partitions_ahead is not None and now >= self._next_partitions:
                self._next_partitions = now + PARTITIONS_SECONDS
                await self.add_partitions(self.partitions_ahead)
        finally:
            self._folding = False

    async def _insert_usage(self, rows: list[tuple[Any, ...]]) -> None:
        try:
            try:
                await self.pool.execute(INSERT_NEW_USAGE, rows)
            except asyncpg.UniqueViolationError:  # some were written before (a redelivery): skip them
                await self.pool.execute(INSERT_USAGE, rows)
        except asyncpg.ForeignKeyViolationError:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    "INSERT INTO accounts (id) SELECT DISTINCT unnest($1::text[]) ON CONFLICT DO NOTHING",
                    sorted({row[1] for row in rows}),
                )
                await conn.execute(INSERT_USAGE, rows)

    # ---- reconcile reads ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def barrier(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy]:
        """Hold back usage batches and money-in completions while the caller compares Redis with the
        ledger; yields the connection to read the ledger through."""
        async with self.pool.acquire() as conn:
            await conn.execute(f"SELECT pg_advisory_lock({scoped('$1')})", LEDGER_BARRIER)
            try:
                yield conn
            finally:
                await conn.execute(f"SELECT pg_advisory_unlock({scoped('$1')})", LEDGER_BARRIER)

    @staticmethod
    async def ledger_view(
        conn: LedgerConnection,
    ) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str, int]]]:
        """In one snapshot: account -> (ledger balance, money in not yet applied), and the unapplied rows."""
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            rows = await conn.fetch(
                "SELECT a.id, a.balance + coalesce(d.delta, 0) AS balance, coalesce(u.pending, 0) AS pending"
                " FROM accounts a"
                " LEFT JOIN (SELECT account_id, sum(delta) AS delta FROM ledger_balance_deltas"
                " GROUP BY account_id) d ON d.account_id = a.id"
                " LEFT JOIN (SELECT account_id, sum(amount) AS pending FROM ledger WHERE NOT applied"
                " GROUP BY account_id) u ON u.account_id = a.id"
            )
            unapplied = await conn.fetch(
                "SELECT idempotency_id, account_id, amount FROM ledger WHERE NOT applied ORDER BY created_at"
            )
        return (
            {r["id"]: (int(r["balance"]), int(r["pending"])) for r in rows},
            [(r["idempotency_id"], r["account_id"], int(r["amount"])) for r in unapplied],
        )

    @staticmethod
    async def unapplied_ages(conn: LedgerConnection) -> dict[str, float]:
        """Money in not yet marked applied: idempotency id -> seconds since its row was written."""
        rows = await conn.fetch(
            "SELECT idempotency_id, extract(epoch FROM now() - created_at)::float8 AS age"
            " FROM ledger WHERE NOT applied"
        )
        return {r["idempotency_id"]: float(r["age"]) for r in rows}

    @staticmethod
    async def present(conn: LedgerConnection, usage: Sequence[tuple[str, str, int]]) -> set[str]:
        """Which of these (account, request id, created_ms) usage rows the ledger holds: one primary-key
        probe each, in the one partition of its time."""
        if not usage:
            return set()
        accounts, ids, times = (list(column) for column in zip(*usage, strict=True))
        rows = await conn.fetch(
            "SELECT l.idempotency_id FROM unnest($1::text[], $2::text[], $3::bigint[]) AS p(a, i, ms)"
            " JOIN ledger l ON l.account_id = p.a AND l.idempotency_id = p.i"
            " AND l.created_at = timestamptz 'epoch' + p.ms * interval '1 millisecond'",
            accounts,
            ids,
            times,
        )
        return {r["idempotency_id"] for r in rows}

    @staticmethod
    async def recent_debits(
        conn: LedgerConnection, since_ms: int
    ) -> AsyncIterator[tuple[str, str, int, int]]:
        """(account, request id, charge, created ms) of every usage row that charged something from
        `since_ms` on, read through a cursor (the rebuild's settled markers; the BRIN index on created_at
        keeps it to the recent blocks of the recent partitions)."""
        since = dt.datetime.fromtimestamp(since_ms / 1000, dt.UTC)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            async for r in conn.cursor(
                "SELECT account_id, idempotency_id, -amount AS charge,"
                " floor(extract(epoch FROM created_at) * 1000)::bigint AS ms"
                " FROM ledger WHERE kind = 'usage' AND amount < 0 AND created_at >= $1",
                since,
                prefetch=2_000,
            ):
                yield r["account_id"], r["idempotency_id"], int(r["charge"]), int(r["ms"])

    async def ledger_sum(self, account: str) -> int:
        return int(
            await self.pool.fetchval(
                "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = $1", account
            )
        )
