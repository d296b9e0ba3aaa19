"""The credit reads on a big account: 1M ledger rows (a year of usage over 10 models, 20 keys, 200 end
users and a few tags) and their roll-ups, loaded with COPY into a schema of its own; then the latency of
GET /v1/credits/summary and of a 30-day GET /v1/credits/usage?group_by=day over real HTTP (one
keep-alive connection, sequential calls, interleaved), p50 and p99. Target: p99 <= 20 ms each.

    python bench/credits_reads.py [--rows 1000000] [--calls 2000]

Uses CREDITGATE_REDIS_URL / CREDITGATE_DATABASE_URL (default: the local servers); drops its schema and
deletes its Redis keys at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import statistics
import time
import uuid
from typing import Any

import aiohttp
import asyncpg
import msgspec

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.ledger_schema import add_partitions, migrate
from sidecar.redis_client import connect_redis
from sidecar.serve import _site

REDIS = os.environ.get("CREDITGATE_REDIS_URL", "redis://127.0.0.1:6379/0")
SERVER = os.environ.get("CREDITGATE_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TOKEN = "bench-admin-token"
ACCOUNT = "acct_bench_reads"
COLUMNS = (
    "idempotency_id", "account_id", "kind", "amount", "model", "key_id", "end_user", "tags",
    "prompt_tokens", "completion_tokens", "saved", "created_at",
)  # fmt: skip
ROLLUPS = """
INSERT INTO usage_rollup (account_id, day, dim, value, requests, charge, saved, prompt_tokens,
    completion_tokens, compacted)
SELECT l.account_id, (l.created_at AT TIME ZONE 'UTC')::date, v.dim, v.value, count(*), sum(-l.amount),
    sum(coalesce(l.saved, 0)), sum(coalesce(l.prompt_tokens, 0)), sum(coalesce(l.completion_tokens, 0)), true
FROM ledger l CROSS JOIN LATERAL (
    SELECT 'total', '' UNION ALL SELECT 'model', l.model UNION ALL SELECT 'key', l.key_id
    UNION ALL SELECT 'user', l.end_user UNION ALL SELECT DISTINCT 'tag', t FROM unnest(l.tags) t
) AS v (dim, value)
WHERE l.kind = 'usage' GROUP BY 1, 2, 3, 4
ORDER BY 2  -- in day order, as the flusher appends them over time
"""


def records(n: int, now: dt.datetime) -> Any:
    span = dt.timedelta(days=365).total_seconds()
    tags = [["job=judge"], ["job=search", "team=a"], [], ["team=b"]]
    for i in range(n):
        at = now - dt.timedelta(seconds=span * (n - i) / n)
        yield (f"req_{i:07d}", ACCOUNT, "usage", -(100 + i % 997), f"model-{i % 10}", f"key_{i % 20}",
               f"user-{i % 200}", tags[i % 4], 10 + i % 50, 20 + i % 70, (i % 7) * 3, at)  # fmt: skip


async def load(dsn: str, rows: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await migrate(conn)
        now = dt.datetime.now(dt.UTC)
        await add_partitions(conn, 13, now - dt.timedelta(days=366))
        await conn.execute("INSERT INTO accounts (id, balance) VALUES ($1, 0)", ACCOUNT)
        started = time.perf_counter()
        await conn.copy_records_to_table("ledger", records=records(rows, now), columns=COLUMNS)
        loaded = time.perf_counter()
        await conn.execute(ROLLUPS)
        grant = 10**15
        await conn.execute(
            "INSERT INTO ledger (idempotency_id, account_id, kind, amount)"
            " VALUES ('in:seed', $1, 'grant', $2)",
            ACCOUNT,
            grant,
        )
        await conn.execute(
            "UPDATE accounts SET balance = (SELECT sum(amount) FROM ledger WHERE account_id = $1)"
            " WHERE id = $1",
            ACCOUNT,
        )
        await conn.execute("VACUUM ANALYZE")  # what autovacuum does to tables that stop changing
        rolled = time.perf_counter() - loaded
        print(f"loaded {rows:,} rows in {loaded - started:.1f} s, roll-ups in {rolled:.1f} s")
        count = await conn.fetchval("SELECT count(*) FROM usage_rollup")
        print(f"usage_rollup rows: {count:,}")
    finally:
        await conn.close()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(base: str, calls: int) -> None:
    admin = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/admin/accounts/{ACCOUNT}/keys", headers=admin) as resp:
            key = (await resp.json())["key"]
        grant = {"amount": 1_000_000_000, "kind": "purchase"}  # grants in Redis, as a real account has
        headers = {**admin, "Idempotency-Key": "bench-purchase"}
        async with session.post(
            f"{base}/admin/accounts/{ACCOUNT}/grants", json=grant, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
        auth = {"Authorization": f"Bearer {key}"}
        today = dt.datetime.now(dt.UTC).date()
        urls = {
            "summary": f"{base}/v1/credits/summary",
            "usage 30 days by day": f"{base}/v1/credits/usage?group_by=day"
            f"&from={today - dt.timedelta(days=29)}&to={today}",
        }
        timings: dict[str, list[float]] = {name: [] for name in urls}
        for name, url in urls.items():  # warm up, and show one answer's size
            async with session.get(url, headers=auth) as resp:
                body = await resp.read()
                assert resp.status == 200, body
            print(f"{name}: {len(body):,} bytes")
        for _ in range(calls):
            for name, url in urls.items():
                started = time.perf_counter()
                async with session.get(url, headers=auth) as resp:
                    await resp.read()
                    assert resp.status == 200
                timings[name].append((time.perf_counter() - started) * 1000)
    for name, ms in timings.items():
        p50, p99 = statistics.median(ms), quantile(ms, 0.99)
        print(f"{name:24s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms   ({calls} calls)")


def serve(raw: dict[str, Any], ready: multiprocessing.Queue[str], stop: Any) -> None:
    """The sidecar on a free port, in a process of its own; its URL goes to `ready`."""

    async def run() -> None:
        async with _site(create_app(msgspec.convert(raw, Settings)), "127.0.0.1", 0, 5.0) as url:
            ready.put(url)
            while not stop.is_set():  # noqa: ASYNC110
                await asyncio.sleep(0.1)

    asyncio.run(run())


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=2_000)
    args = parser.parse_args()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    prefix = f"{schema}:"
    conn = await asyncpg.connect(SERVER)
    await conn.execute(f"CREATE SCHEMA {schema}")
    dsn = f"{SERVER}{'&' if '?' in SERVER else '?'}options=-csearch_path%3D{schema}"
    try:
        await load(dsn, args.rows)
        raw = {"redis_url": REDIS, "database_url": dsn, "key_prefix": prefix, "admin_token": TOKEN,
               "upstream_url": "http://127.0.0.1:9/v1", "upstream_api_key": "sk-bench",
               "auth_cache_seconds": 60}  # fmt: skip
        ready: multiprocessing.Queue[str] = multiprocessing.Queue()
        stop = multiprocessing.Event()
        server = multiprocessing.Process(target=serve, args=(raw, ready, stop))  # its own process and core
        server.start()
        try:
            url = ready.get(timeout=120)
            avg = " ".join(f"{x:.2f}" for x in os.getloadavg())
            stamp = f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC"
            print(f"machine: {platform.node()} ({os.cpu_count()} cores), {stamp}, load average {avg}")
            await measure(url, args.calls)
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            stop.set()
            server.join(30)
    finally:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
        await conn.close()
        redis = connect_redis(REDIS)
        async for name in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.unlink(name)
        await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
