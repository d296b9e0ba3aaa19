"""The partitioned ledger: monthly partitions created ahead (idempotently, in UTC months, across the year's
end), the DEFAULT partition and rows moving out of it, and exactly-once across partitions: a redelivered
outbox entry and a retried grant insert nothing, whatever month it is when they come again."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from sidecar.app import Services, services
from sidecar.config import Settings
from sidecar.ledger_schema import add_partitions, migrate, partitions
from sidecar.ledger_sql import INSERT_USAGE
from sidecar.outbox import UsageEvent

from .conftest import make_settings

# The partitions themselves: each test starts from an empty schema, not a migrated and partitioned spare.
pytestmark = pytest.mark.empty_schema
LEASE = 4_000_000_000_000
UTC = dt.UTC


def ms(when: dt.datetime) -> int:
    return int(when.timestamp() * 1000)


@pytest.fixture
async def conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    # A session time zone far from UTC: months are UTC months whatever the session's zone.
    connection = await asyncpg.connect(database_url, server_settings={"timezone": "Pacific/Kiritimati"})
    await migrate(connection)
    await connection.execute("INSERT INTO accounts (id) VALUES ('acct_a')")
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture
def settings(redis_url: str, database_url: str) -> Settings:
    return make_settings(redis_url, database_url, partitions=4, flush_claim_idle_seconds=0)


@pytest.fixture
async def svc(settings: Settings) -> AsyncIterator[Services]:
    async with services(settings) as ready:
        yield ready


async def partition_of(conn: asyncpg.Connection, created_at: dt.datetime) -> str:
    """Where a row of this time lands (inserted, read back, removed)."""
    row_id = f"probe_{created_at.timestamp()}"
    name: str = await conn.fetchval(
        "INSERT INTO ledger (idempotency_id, account_id, kind, amount, created_at)"
        " VALUES ($1, 'acct_a', 'grant', 1, $2) RETURNING tableoid::regclass::text",
        row_id,
        created_at,
    )
    await conn.execute("DELETE FROM ledger WHERE idempotency_id = $1", row_id)
    return name


async def test_partitions_ahead_are_created_once_across_the_end_of_the_year(conn: asyncpg.Connection) -> None:
    december = dt.datetime(2026, 12, 15, 12, tzinfo=UTC)
    made = await add_partitions(conn, 2, now=december)
    assert made == ["ledger_2026_12", "ledger_2027_01", "ledger_2027_02"]
    assert await add_partitions(conn, 2, now=december) == []  # idempotent
    # The last hour of January (UTC): still January, one month more ahead.
    assert await add_partitions(conn, 2, now=dt.datetime(2027, 1, 31, 23, 59, tzinfo=UTC)) == [
        "ledger_2027_03"
    ]
    assert set(await partitions(conn)) >= {"ledger_default", *made, "ledger_2027_03"}
    # The bounds are UTC midnights on the first of the month.
    last = dt.datetime(2026, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    assert await partition_of(conn, last) == "ledger_2026_12"
    assert await partition_of(conn, last + dt.timedelta(microseconds=1)) == "ledger_2027_01"
    assert await partition_of(conn, dt.datetime(2027, 4, 1, tzinfo=UTC)) == "ledger_default"


async def test_sidecars_creating_the_same_partitions_at_once_both_succeed(
    conn: asyncpg.Connection, database_url: str
) -> None:
    others = [await asyncpg.connect(database_url) for _ in range(3)]
    try:
        at = dt.datetime(2030, 6, 1, tzinfo=UTC)
        made = await asyncio.gather(*(add_partitions(c, 4, now=at) for c in [conn, *others]))
    finally:
        for other in others:
            await other.close()
    created = sorted(name for names in made for name in names)
    assert created == [f"ledger_2030_{m:02d}" for m in range(6, 11)]  # each created exactly once


async def test_rows_of_a_month_without_a_partition_wait_in_default_and_move_when_it_is_made(
    conn: asyncpg.Connection,
) -> None:
    may = dt.datetime(2031, 5, 10, tzinfo=UTC)
    await conn.execute(
        "INSERT INTO ledger (idempotency_id, account_id, kind, amount, created_at)"
        " SELECT 'r' || n, 'acct_a', 'usage', -n, $1::timestamptz + n * interval '1 hour'"
        " FROM generate_series(1, 50) n",
        may,
    )
    where = "SELECT tableoid::regclass::text AS part, count(*) FROM ledger GROUP BY 1"
    assert {r["part"]: r["count"] for r in await conn.fetch(where)} == {"ledger_default": 50}
    assert await add_partitions(conn, 0, now=may) == ["ledger_2031_05"]
    assert {r["part"]: r["count"] for r in await conn.fetch(where)} == {"ledger_2031_05": 50}
    assert await conn.fetchval("SELECT sum(amount) FROM ledger") == -sum(range(1, 51))


async def settle(svc: Services, account: str, request_id: str, charge: int, **times: int) -> None:
    await svc.balances.reserve(account, request_id, 1000, LEASE)
    event = UsageEvent(route="chat", model="m", hold=1000, **times)  # type: ignore[arg-type]
    await svc.balances.settle(account, request_id, charge, event)


async def new_account(svc: Services, credits: int) -> str:
    account: str = (await svc.admin.create_account())["id"]
    await svc.admin.grant(account, credits, "seed")
    return account


async def test_a_redelivered_outbox_entry_inserts_nothing_across_a_month_boundary(svc: Services) -> None:
    account = await new_account(svc, 1_000_000)
    await svc.store.add_partitions(0, now=dt.datetime(2026, 12, 1, tzinfo=UTC))  # December; January missing
    end_of_year = dt.datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    await settle(svc, account, "req_dec", 100, settled_ms=ms(end_of_year))
    await settle(svc, account, "req_jan", 200, settled_ms=ms(end_of_year) + 1)
    await settle(svc, account, "req_untimed", 300)  # no times in the entry: its stream id's time
    flusher = svc.flusher()
    batch = await flusher.collect()
    assert batch.size == 3
    await flusher.write(batch)  # written (January's row into DEFAULT) ...
    # ... then January's partition is made (its row moves) and the same entries come again, as after a
    # crash between the commit and the acknowledgement, in a later month.
    await svc.store.add_partitions(1, now=dt.datetime(2027, 1, 2, tzinfo=UTC))
    await flusher.write(batch)
    assert flusher.stats.dead_letters == 0  # duplicates are skipped, never refused
    rows = await svc.store.pool.fetch(
        "SELECT idempotency_id, tableoid::regclass::text AS part, created_at FROM ledger"
        " WHERE kind = 'usage' ORDER BY idempotency_id"
    )
    assert [(r["idempotency_id"], r["part"]) for r in rows[:2]] == [
        ("req_dec", "ledger_2026_12"),
        ("req_jan", "ledger_2027_01"),
    ]
    assert [r["idempotency_id"] for r in rows] == ["req_dec", "req_jan", "req_untimed"]
    entry_ms = int(next(iter(batch.entries.values()))[-1][0].partition("-")[0])
    assert ms(rows[2]["created_at"]) == entry_ms
    assert await svc.store.ledger_sum(account) == 1_000_000 - 600
    assert (await svc.balances.balance(account)).balance == 1_000_000 - 600


async def test_a_grant_retried_in_a_later_month_credits_once(svc: Services) -> None:
    account = await new_account(svc, 1_000)
    first = await svc.admin.grant(account, 500, "topup")
    # The first attempt was last month: its row (and the key naming it) forty days back.
    ledger_id = f"in:{account}:topup"
    for table in ("ledger", "money_in_keys"):
        await svc.store.pool.execute(
            f"UPDATE {table} SET created_at = created_at - interval '40 days' WHERE idempotency_id = $1",
            ledger_id,
        )
    again = await svc.admin.grant(account, 500, "topup")
    assert (first["credited"], again["credited"]) == (True, False)
    assert again["balance"] == 1_500
    count = "SELECT count(*) FROM ledger WHERE idempotency_id = $1"
    assert await svc.store.pool.fetchval(count, ledger_id) == 1
    assert await svc.store.ledger_sum(account) == 1_500


def usage(request_id: str, account: str, amount: int, at_ms: int) -> tuple[Any, ...]:
    """A batch row as outbox.ledger_row builds it (no metadata)."""
    return (request_id, account, "usage", -amount, *[None] * 12, at_ms, at_ms, at_ms, *[None] * 8)


async def test_batches_on_the_same_accounts_do_not_wait_for_each_other(svc: Services) -> None:
    """Balances move by appended deltas, not by updating the accounts' rows: a batch commits while another
    over the same accounts is still open (under the old update it queued behind it, and batches in
    flight deadlocked); folded, accounts.balance is the exact sum, and reads before the fold see it."""
    accounts = [await new_account(svc, 10**9) for _ in range(40)]
    at = ms(dt.datetime.now(UTC))
    batches = [
        [usage(f"req_{b}_{i}", accounts[(i * 7 + b) % 40], 1 + i % 13, at + i) for i in range(400)]
        for b in range(12)
    ]
    async with svc.store.pool.acquire() as conn, conn.transaction():
        await conn.execute(INSERT_USAGE, sorted(batches[0], key=lambda r: (r[1], r[0])))  # open, uncommitted
        queue = batches[1:]

        async def loop() -> None:
            while queue:
                await svc.store.insert_usage(queue.pop())

        await asyncio.wait_for(asyncio.gather(*(loop() for _ in range(3))), 30)
    expected = dict.fromkeys(accounts, 10**9)
    for row in (row for batch in batches for row in batch):
        expected[row[1]] += row[3]
    async with svc.store.barrier() as conn:
        view, _ = await svc.store.ledger_view(conn)
    assert {a: view[a][0] for a in accounts} == expected  # deltas not yet folded included
    await asyncio.gather(svc.store.fold_balances(), svc.store.fold_balances())  # one folds, one skips
    await svc.store.fold_balances()
    folded = await svc.store.pool.fetch("SELECT id, balance FROM accounts WHERE id = ANY($1)", accounts)
    assert {r["id"]: r["balance"] for r in folded} == expected
    assert await svc.store.pool.fetchval("SELECT count(*) FROM ledger_balance_deltas") == 0


async def test_a_flushing_store_keeps_the_partitions_ahead(svc: Services) -> None:
    account = await new_account(svc, 1_000)
    now = dt.datetime.now(UTC)
    assert svc.store.partitions_ahead == svc.settings.ledger_partitions_ahead  # set at startup
    svc.store.partitions_ahead = svc.settings.ledger_partitions_ahead + 2
    svc.store._next_partitions = svc.store._next_fold = 0  # the hour is up
    await svc.store.insert_usage([usage("req_1", account, 5, ms(now))])
    async with svc.store.pool.acquire() as conn:
        names = await partitions(conn)
    month = dt.date(now.year, now.month, 1)
    for n in range(svc.store.partitions_ahead + 1):
        year, index = divmod(month.month - 1 + n, 12)
        assert f"ledger_{month.year + year}_{index + 1:02d}" in names
