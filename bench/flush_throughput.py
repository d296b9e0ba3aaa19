"""Flush throughput against its limit: settled debits per second one flusher moves from the Redis outbox
into the partitioned Postgres ledger, and the rate Postgres takes the same rows at when nothing else is
done, in the same run.

    python bench/flush_throughput.py [--rows 100000] [--accounts 100] [--batch 2000] [--concurrency 3]
                                     [--rounds 1]

* **limit**: the same rows (built from the same outbox entries by the flusher's own ``ledger_row``), in
  the same batches, inserted by bare ``INSERT … SELECT FROM unnest(…)`` statements (no barrier, no
  dedup, no balance update) over as many connections as the flusher has batches in flight, in both
  encodings: one array of the ``ledger_usage_row`` type (what the flusher sends) and one array per
  column (what it sent before); the ratio is against the faster;
* **flusher**: the outbox filled with real settle-script entries, then one flusher draining it (Redis
  reads, parsing, the real insert, acknowledgements); only the drain is timed.

Each measurement gets a fresh schema (migrated, its partitions created ahead); the rows' times spread
over the current month, so they land in its partition. Uses CREDITGATE_REDIS_URL /
CREDITGATE_DATABASE_URL (defaults: the local servers at 127.0.0.1) and throw-away key prefixes and
schemas, removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import msgspec

from sidecar.app import Services, services
from sidecar.config import Settings
from sidecar.ledger_schema import add_partitions, migrate
from sidecar.ledger_sql import BARE_INSERT, BATCH_FIELDS
from sidecar.outbox import UsageEvent, encode_event, ledger_row

LEASE = 4_000_000_000_000
_TYPES = (
    dict.fromkeys(BATCH_FIELDS, "bigint")
    | dict.fromkeys(
        (
            "idempotency_id",
            "account_id",
            "kind",
            "route",
            "model",
            "provider",
            "key_source",
            "multiplier",
            "outcome",
            "key_id",
            "end_user",
            "tags",  # a text[] per row: sent as its text form here (the bench's rows have none)
            "upstream_model",
        ),
        "text",
    )
    | {"drawn": "jsonb", "attempts": "integer", "marked_up": "boolean"}
)
# The same insert with one array per column (the flusher's encoding before ledger_usage_row).
PER_COLUMN = BARE_INSERT.replace(
    "unnest($1::ledger_usage_row[]) AS b",
    f"unnest({', '.join(f'${i + 1}::{_TYPES[c]}[]' for i, c in enumerate(BATCH_FIELDS))})"
    f" AS b({', '.join(BATCH_FIELDS)})",
).replace("b.tags,", "b.tags::text[],")
REDIS = os.environ.get("CREDITGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVER = os.environ.get("CREDITGATE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
EVENT = UsageEvent(
    route="chat",
    model="gpt-4o-mini",
    provider="default",
    key_source="pooled",
    multiplier="5/4",
    prompt_tokens=120,
    completion_tokens=300,
    hold=5000,
    outcome="ok",
)


def entries(rows: int, accounts: list[str]) -> list[tuple[str, int, bytes]]:
    """(account, charge, outbox entry) of every settlement, settled over the current month's second day."""
    now = dt.datetime.now(dt.UTC)
    base = int(now.replace(day=2, hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
    made = []
    for i in range(rows):
        account, charge, at = accounts[i % len(accounts)], 1 + i % 977, base + i
        event = msgspec.structs.replace(
            EVENT, request_id=f"req_{i:09d}", account=account, charge=charge, started_ms=at - 9, settled_ms=at
        )
        made.append((account, charge, encode_event(event)))
    return made


@asynccontextmanager
async def schema() -> AsyncIterator[str]:
    """A fresh schema's DSN; dropped afterwards."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(SERVER)
    await admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield f"{SERVER}{'&' if '?' in SERVER else '?'}search_path={name}"
    finally:
        await admin.execute(f"DROP SCHEMA {name} CASCADE")
        await admin.close()


def account_names(count: int) -> list[str]:
    return [f"acct_{n:05d}" for n in range(count)]


async def limit(rows: int, accounts: int, batch: int, concurrency: int, per_column: bool) -> float:
    """Rows/s of bare batch inserts of the flusher's rows into a fresh partitioned ledger."""
    names = account_names(accounts)
    made = [ledger_row({b"d": data}, f"{i}-0") for i, (_, _, data) in enumerate(entries(rows, names))]
    batches = [sorted(made[i : i + batch], key=lambda r: (r[1], r[0])) for i in range(0, rows, batch)]
    params = [[list(c) for c in zip(*b, strict=True)] if per_column else [b] for b in batches]
    async with schema() as dsn:
        pool = await asyncpg.create_pool(dsn, min_size=concurrency, max_size=concurrency)
        try:
            async with pool.acquire() as conn:
                await migrate(conn)
                await add_partitions(conn, 1)
                await conn.execute("INSERT INTO accounts (id) SELECT unnest($1::text[])", names)
            queue = list(reversed(params))

            async def worker() -> None:
                async with pool.acquire() as conn:
                    statement = await conn.prepare(PER_COLUMN if per_column else BARE_INSERT)
                    while queue:
                        await statement.fetch(*queue.pop())

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
            count = await pool.fetchval("SELECT count(*) FROM ledger")
            assert count == rows, (count, rows)
        finally:
            await pool.close()
    return rows / elapsed


async def fill(svc: Services, made: list[tuple[str, int, bytes]]) -> None:
    """The outbox, filled by the real settle script (a hold-less settle of each request)."""
    window_end = svc.balances.window_end()  # the settle's window: Redis refuses it after this
    for first in range(0, len(made), 2000):
        async with svc.redis.pipeline(transaction=False) as pipe:
            for i in range(first, min(len(made), first + 2000)):
                account, charge, data = made[i]
                rid = f"req_{i:09d}"
                keys, args = svc.balances.settle_call(account, rid, charge, data, window_end_ms=window_end)
                pipe.evalsha(svc.balances._settle.sha, len(keys), *keys, *args)
            await pipe.execute()


async def flusher(rows: int, accounts: int, batch: int, concurrency: int) -> tuple[float, dict[str, Any]]:
    """Rows/s of one flusher draining a filled outbox into a fresh partitioned ledger."""
    async with schema() as dsn:
        prefix = f"bench_{uuid.uuid4().hex[:8]}:"
        raw = {
            "redis_url": REDIS,
            "database_url": dsn,
            "key_prefix": prefix,
            "flush_batch_size": batch,
            "flush_concurrency": concurrency,
            "ledger_partitions_ahead": 1,
        }
        async with services(msgspec.convert(raw, Settings)) as svc:
            try:
                names = account_names(accounts)
                for name in names:
                    await svc.admin.create_account(name)
                    await svc.admin.grant(name, 10**12, "bench")
                await fill(svc, entries(rows, names))
                drainer = svc.flusher()
                started, cpu = time.perf_counter(), time.process_time()
                written = await drainer.drain()
                elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
                count = await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'")
                assert written == rows == count, (written, rows, count)
                size = await svc.store.pool.fetchval(
                    "SELECT sum(pg_total_relation_size(inhrelid)) FROM pg_inherits"
                    " WHERE inhparent = 'ledger'::regclass"
                )
                return rows / elapsed, {
                    "transactions": drainer.stats.batches,
                    "bytes_per_row": size / rows,
                    "cpu_us_per_row": cpu / rows * 1e6,
                }
            finally:
                left = [n async for n in svc.redis.scan_iter(match=f"{prefix}*")]
                if left:
                    await svc.redis.delete(*left)


async def main(rows: int, accounts: int, batch: int, concurrency: int, rounds: int) -> None:
    print(f"{rows} rows, {accounts} accounts, batches of {batch}, {concurrency} in flight")
    for _ in range(rounds):
        composite = await limit(rows, accounts, batch, concurrency, per_column=False)
        rate, stats = await flusher(rows, accounts, batch, concurrency)
        per_column = await limit(rows, accounts, batch, concurrency, per_column=True)
        ceiling = max(composite, per_column)
        print(f"limit, bare INSERT … SELECT FROM unnest(ledger_usage_row[]): {composite:,.0f} rows/s")
        print(f"limit, bare INSERT … SELECT FROM unnest(one array per column): {per_column:,.0f} rows/s")
        print(f"flusher, Redis outbox → Postgres ({stats['transactions']} transactions): {rate:,.0f} rows/s")
        print(f"flusher process CPU: {stats['cpu_us_per_row']:.1f} µs per row")
        print(f"ratio flusher / limit: {rate / ceiling:.2f}")
        print(f"ledger size (rows, indexes, TOAST): {stats['bytes_per_row']:.0f} bytes per usage row")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="measurements of all three in turn")
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.accounts, args.batch, args.concurrency, args.rounds))
