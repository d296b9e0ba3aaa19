"""Flush throughput: settled debits per second moved from the Redis outbox into Postgres by one flusher.

    python bench/flush_throughput.py [--rows 100000] [--accounts 100] [--batch 500]

Uses CREDITGATE_REDIS_URL / CREDITGATE_DATABASE_URL (defaults: the local servers at 127.0.0.1) and a
throw-away key prefix and schema, removed afterwards. The outbox is filled first with real settle-script
entries, then the flusher drains it; only the drain is timed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

import asyncpg
import msgspec

from sidecar.app import services
from sidecar.config import Settings
from sidecar.outbox import UsageEvent, encode_event

LEASE = 4_000_000_000_000


async def main(rows: int, accounts: int, batch: int) -> None:
    redis_url = os.environ.get("CREDITGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
    server = os.environ.get("CREDITGATE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(server)
    await admin.execute(f"CREATE SCHEMA {schema}")
    raw = {
        "redis_url": redis_url,
        "database_url": f"{server}{'&' if '?' in server else '?'}search_path={schema}",
        "key_prefix": f"{schema}:",
        "flush_batch_size": batch,
    }
    settings = msgspec.convert(raw, Settings)
    try:
        async with services(settings) as svc:
            names = [(await svc.admin.create_account())["id"] for _ in range(accounts)]
            for name in names:
                await svc.admin.grant(name, 10**12, "bench")
            event = UsageEvent(
                route="chat",
                model="gpt-4o-mini",
                provider="default",
                key_source="pooled",
                multiplier="5/4",
                prompt_tokens=120,
                completion_tokens=300,
                hold=5000,
                outcome="ok",
                started_ms=1_700_000_000_000,
                settled_ms=1_700_000_001_000,
            )
            started = time.perf_counter()
            chunk = 2000
            for first in range(0, rows, chunk):
                async with svc.redis.pipeline(transaction=False) as pipe:
                    for i in range(first, min(rows, first + chunk)):
                        k = svc.keys.account(names[i % accounts])
                        rid = f"req_{i:09d}"
                        charge = 1 + i % 977
                        entry = encode_event(
                            msgspec.structs.replace(
                                event, request_id=rid, account=names[i % accounts], charge=charge
                            )
                        )
                        pipe.evalsha(
                            svc.balances._settle.sha,
                            5,
                            k.balance,
                            k.holds,
                            k.hold_expiry,
                            k.settled(rid),
                            k.outbox,
                            rid,
                            charge,
                            600_000,
                            k.expiry_member(rid),
                            "0",
                            entry,
                        )
                    await pipe.execute()
            fill = time.perf_counter() - started
            flusher = svc.flusher()
            started = time.perf_counter()
            written = await flusher.drain()
            elapsed = time.perf_counter() - started
            count = await svc.store.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'usage'")
            assert written == rows == count, (written, rows, count)
            print(f"outbox filled: {rows} settlements in {fill:.2f} s ({rows / fill:,.0f}/s)")
            print(
                f"flushed: {written} rows in {elapsed:.2f} s = {written / elapsed:,.0f} rows/s "
                f"(batch {batch}, {flusher.stats.batches} transactions, {accounts} accounts)"
            )
            names_left = [n async for n in svc.redis.scan_iter(match=f"{schema}:*")]
            if names_left:
                await svc.redis.delete(*names_left)
    finally:
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--batch", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.rows, args.accounts, args.batch))
