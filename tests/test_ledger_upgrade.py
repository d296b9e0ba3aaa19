"""Migration 002 on a ledger that already holds rows: every row kept, in its month's partition, the keys and
constraints in force; the redelivery of an entry flushed before the upgrade, and the retry of a grant made
before it, change nothing after it; and the per-account reads use the primary key, one partition each."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import asyncpg
import pytest

from sidecar.ledger_schema import LedgerConnection, add_partitions, migrate, migration_files
from sidecar.ledger_store import LedgerStore

# The migrations themselves: each test starts from an empty schema, not a migrated spare.
pytestmark = pytest.mark.empty_schema
UTC = dt.UTC
NOV = dt.datetime(2026, 11, 30, 23, 30, tzinfo=UTC)
DEC = dt.datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
JAN = dt.datetime(2027, 1, 1, 0, 0, 5, tzinfo=UTC)
COLUMNS = "idempotency_id, account_id, kind, amount, applied, route, model, outcome, note, settled_at"


def ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[LedgerStore]:
    ledger = await LedgerStore.connect(database_url)
    try:
        yield ledger
    finally:
        await ledger.close()


async def old_ledger(conn: LedgerConnection) -> None:
    """The schema of migration 001 with the rows a running creditgate leaves: grants (one not yet applied),
    usage flushed in January for requests settled in December (and one with no settle time)."""
    assert await migrate(conn, upto="001_ledger") == ["001_ledger"]
    await conn.execute("INSERT INTO accounts (id, balance) VALUES ('acct_a', 1700), ('acct_b', 400)")
    grant = (
        "INSERT INTO ledger (idempotency_id, account_id, kind, amount, applied, note, created_at)"
        " VALUES ($1, $2, $3, $4, $5, 'seed', $6)"
    )
    await conn.execute(grant, "in:acct_a:seed", "acct_a", "grant", 2000, True, NOV)
    await conn.execute(grant, "in:acct_b:p1", "acct_b", "purchase", 500, False, JAN)
    usage = (
        "INSERT INTO ledger (idempotency_id, account_id, kind, amount, route, model, outcome, started_at,"
        " settled_at, created_at) VALUES ($1, $2, 'usage', $3, 'chat', 'm', 'ok', $4, $4, $5)"
    )
    await conn.execute(usage, "req_1", "acct_a", -300, DEC, JAN)
    await conn.execute(usage, "req_2", "acct_b", -100, None, JAN)


async def test_the_upgrade_keeps_every_row_in_its_months_partition(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await old_ledger(conn)
        before = [dict(r) for r in await conn.fetch(f"SELECT {COLUMNS} FROM ledger ORDER BY 1")]
        assert await migrate(conn) == [v for v, _ in migration_files()][1:]  # 002 on
        after = await conn.fetch(
            f"SELECT {COLUMNS}, created_at, tableoid::regclass::text AS part FROM ledger ORDER BY 1"
        )
        assert [{k: r[k] for k in before[0]} for r in after] == before
        # Usage rows take their settle time as created_at (what a redelivery maps to); others keep theirs.
        assert [(r["idempotency_id"], r["created_at"], r["part"]) for r in after] == [
            ("in:acct_a:seed", NOV, "ledger_2026_11"),
            ("in:acct_b:p1", JAN, "ledger_2027_01"),
            ("req_1", DEC, "ledger_2026_12"),
            ("req_2", JAN, "ledger_2027_01"),
        ]
        keys = await conn.fetch("SELECT account_id, idempotency_id, created_at FROM money_in_keys ORDER BY 2")
        assert [tuple(k) for k in keys] == [
            ("acct_a", "in:acct_a:seed", NOV),
            ("acct_b", "in:acct_b:p1", JAN),
        ]
        balances = await conn.fetch("SELECT id, balance FROM accounts ORDER BY id")
        assert [tuple(b) for b in balances] == [("acct_a", 1700), ("acct_b", 400)]
        assert await conn.fetchval("SELECT to_regclass('ledger_unpartitioned')") is None
        # The constraints hold on the partitioned table.
        insert = (
            "INSERT INTO ledger (idempotency_id, account_id, kind, amount, created_at)"
            " VALUES ($1, $2, $3, -1, $4)"
        )
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(insert, "req_1", "acct_a", "usage", DEC)
        with pytest.raises(asyncpg.ForeignKeyViolationError):
            await conn.execute(insert, "req_9", "acct_nobody", "usage", DEC)
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, "req_9", "acct_a", "gift", DEC)
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO money_in_keys VALUES ('acct_a', 'in:acct_a:seed', now())")
    finally:
        await conn.close()


async def test_after_the_upgrade_a_redelivered_entry_and_a_retried_grant_change_nothing(
    database_url: str, store: LedgerStore
) -> None:
    async with store.pool.acquire() as conn:
        await old_ledger(conn)
    await store.migrate()
    # req_1, flushed before the upgrade (committed, not acknowledged), comes again: the same row.
    columns = [None] * 12
    attribution = [None] * 8  # key_id .. drawn, cost .. marked_up
    await store.insert_usage(
        [("req_1", "acct_a", "usage", -300, *columns, ms(DEC), ms(DEC), ms(DEC), *attribution)]
    )
    again = await store.record_money_in("in:acct_a:seed", "acct_a", "grant", 2000, "seed")
    assert (again.created, again.applied) == (False, True)
    assert await store.ledger_sum("acct_a") == 1700
    assert await store.pool.fetchval("SELECT balance FROM accounts WHERE id = 'acct_a'") == 1700
    async with store.pool.acquire() as conn:
        assert await store.present(conn, [("acct_a", "req_1", ms(DEC)), ("acct_b", "req_1", ms(DEC))]) == {
            "req_1"
        }


async def plan(conn: LedgerConnection, query: str) -> str:
    return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {query}"))


async def test_per_account_reads_use_the_primary_key_of_the_months_they_ask_for(store: LedgerStore) -> None:
    """An account's rows (its balance, its statement of a month) come through (account_id, created_at, ...),
    the primary key, never a scan of a month; a month's statement reads that month's partition only."""
    await store.migrate()
    await store.add_partitions(2, now=dt.datetime(2026, 11, 1, tzinfo=UTC))
    accounts = [f"acct_{n:03d}" for n in range(200)]
    await store.pool.execute("INSERT INTO accounts (id) SELECT unnest($1::text[])", accounts)
    start = ms(dt.datetime(2026, 11, 1, tzinfo=UTC))
    span = ms(dt.datetime(2027, 2, 1, tzinfo=UTC)) - start
    rows = [
        (f"req_{i}", accounts[i % 200], "usage", -1, *[None] * 14, start + i * span // 30_000, *[None] * 8)
        for i in range(30_000)
    ]
    await store.insert_usage(rows)
    async with store.pool.acquire() as conn:
        await conn.execute("ANALYZE ledger")
        balance = await plan(
            conn, "SELECT coalesce(sum(amount), 0) FROM ledger WHERE account_id = 'acct_007'"
        )
        statement = await plan(
            conn,
            "SELECT * FROM ledger WHERE account_id = 'acct_007' AND created_at >= '2026-12-01T00:00:00Z'"
            " AND created_at < '2027-01-01T00:00:00Z' ORDER BY created_at",
        )
    # (the empty DEFAULT partition is read by a scan: nothing to index)
    assert "Seq Scan on ledger_20" not in balance + statement, (balance, statement)
    for month in ("2026_11", "2026_12", "2027_01"):
        assert f"ledger_{month}_pkey" in balance
    assert "ledger_2026_12_pkey" in statement
    assert "ledger_2026_11" not in statement
    assert "ledger_2027_01" not in statement
    assert await store.ledger_sum("acct_007") == -150


async def test_the_upgrade_of_an_empty_ledger_then_partitions_ahead(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        assert await migrate(conn) == [v for v, _ in migration_files()]
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_inherits WHERE inhparent = 'ledger'::regclass") == 1
        )
        made = await add_partitions(conn, 1, now=dt.datetime(2026, 12, 6, tzinfo=UTC))
        assert made == ["ledger_2026_12", "ledger_2027_01"]
    finally:
        await conn.close()
