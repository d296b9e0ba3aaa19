"""Redis memory of settled markers: what 1,000,000 requests leave behind, per design (run by hand).

Starts a throwaway redis-server of its own (Debian's /usr/bin/redis-server, or --redis-server PATH) on a
free loopback port, without persistence, and drives the real reserve and settle scripts through
`Balances` on the request path's auto-pipelined connection, for --requests requests spread over
--accounts accounts (16 partitions, key prefix `cg:` as deployed). After each run the partitions' outbox
streams are deleted (the flusher would have moved them to Postgres), so what remains is the markers.

Designs measured:

- **old** (before issue 14): every settle leaves `settled:<request id>` for 7 days;
- **window** (now): the same marker, expiring at the settle's window end (`settled_marker_seconds`,
  1 h by default); then the same run with a 20 s window, waiting for Redis' active expiry to reclaim it;
- **hits**: cache hits (record-only zero-charge settles), which no longer leave a marker;
- **buckets**: the alternative of one hourly set (SADD request id) or hash (HSET request id -> charge, as
  the settle's "settled before" answer needs the first charge) per partition, filled directly.

    python bench/marker_memory.py [--requests 1000000] [--accounts 10000] [--concurrency 512]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.autopipeline import AutoPipeline
from sidecar.balances import Balances
from sidecar.keys import KeySpace
from sidecar.outbox import UsageEvent

PARTITIONS = 16
DAY_MS = 24 * 3600 * 1000


@contextlib.contextmanager
def throwaway_redis(binary: str) -> Iterator[str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=directory,
            stdout=subprocess.DEVNULL,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            client = redis.Redis.from_url(url)
            deadline = time.monotonic() + 20
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            yield url
        finally:
            proc.terminate()
            proc.wait(10)


async def used_memory(r: Redis) -> int:
    return int((await r.info("memory"))["used_memory"])


async def drop_outboxes(r: Redis, keys: KeySpace) -> None:
    await r.delete(*(keys.outbox(p) for p in range(PARTITIONS)))


async def run_requests(
    balances: Balances, accounts: list[str], requests: int, concurrency: int, window_ms: int, hits: bool
) -> float:
    """Reserve + settle `requests` requests (or, with `hits`, record-only cache-hit settles); seconds."""
    event = UsageEvent(
        route="chat", model="gpt-4o-mini", outcome="ok", prompt_tokens=20, completion_tokens=50
    )
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            account = accounts[i % len(accounts)]
            request_id = "req_" + secrets.token_hex(16)  # as the sidecar makes them
            now = int(time.time() * 1000)
            if hits:
                await balances.settle(
                    account, request_id, 0, event, record=True, window_end_ms=now + window_ms
                )
                continue
            await balances.reserve(account, request_id, 20_000, now + 900_000, window_end_ms=now + window_ms)
            await balances.settle(account, request_id, 7_500, event, window_end_ms=now + window_ms)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


async def bucket_sets(r: Redis, requests: int, as_hash: bool) -> int:
    """Fill one hourly bucket per partition with `requests` request ids; returns the bytes added."""
    before = await used_memory(r)
    hour = int(time.time() // 3600)
    pipe = r.pipeline(transaction=False)
    for i in range(requests):
        bucket = f"cg:{{p{i % PARTITIONS}}}:settled-bucket:{hour}"
        rid = "req_" + secrets.token_hex(16)
        if as_hash:
            pipe.hset(bucket, rid, "7500")
        else:
            pipe.sadd(bucket, rid)
        if i % 2000 == 1999:
            await pipe.execute()
    await pipe.execute()
    for p in range(PARTITIONS):
        await r.pexpire(f"cg:{{p{p}}}:settled-bucket:{hour}", 7_200_000)
    added = await used_memory(r) - before
    await r.delete(*(f"cg:{{p{p}}}:settled-bucket:{hour}" for p in range(PARTITIONS)))
    return added


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "/usr/bin/redis-server")
    args = parser.parse_args()
    n = args.requests
    with throwaway_redis(args.redis_server) as url:
        r = Redis.from_url(url)
        keys = KeySpace("cg:", PARTITIONS)
        balances = Balances(r, keys, settled_marker_ms=3600_000, pipeline=AutoPipeline(url))
        await balances.load_scripts()
        accounts = [f"acct_{i:06d}" for i in range(args.accounts)]
        pipe = r.pipeline(transaction=False)
        for account in accounts:
            pipe.hset(keys.account(account).balance, mapping={"balance": 10**15, "held": 0})
        await pipe.execute()
        info = await r.info("server")
        print(
            f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; redis {info['redis_version']}; "
            f"Python {platform.python_version()}; {cpu_model()}; {n:,} requests, {len(accounts):,} accounts"
        )
        rows = []
        for name, window_ms, hits in (
            ("old: 7-day marker", 7 * DAY_MS, False),
            ("window: marker until the window end (1 h)", 3600_000, False),
            ("cache hits (record-only settles)", 3600_000, True),
        ):
            before = await used_memory(r)
            seconds = await run_requests(balances, accounts, n, args.concurrency, window_ms, hits)
            await drop_outboxes(r, keys)
            added = await used_memory(r) - before
            sample = None
            async for key in r.scan_iter("cg:*:settled:*", count=1000):
                sample = await r.memory_usage(key)
                break
            alive = await r.dbsize() - len(accounts)
            rows.append((name, added, alive, sample, window_ms // 1000, seconds, n if hits else 2 * n))
            await r.flushdb()  # back to the accounts alone for the next design
            pipe = r.pipeline(transaction=False)
            for account in accounts:
                pipe.hset(keys.account(account).balance, mapping={"balance": 10**15, "held": 0})
            await pipe.execute()
        print(
            "| design | used_memory added | per request | markers alive | MEMORY USAGE of one marker | "
            "lifetime | at 1,000 req/s, steady state | run |"
        )
        print("|---|--:|--:|--:|--:|--:|--:|--:|")
        for name, added, alive, sample, life, seconds, scripts in rows:
            per = added / n
            steady = per * 1000 * life if alive else 0
            print(
                f"| {name} | {added / 2**20:,.1f} MiB | {per:,.1f} B | {alive:,} | "
                f"{sample if sample is not None else '–'} B | {life:,} s | {steady / 2**30:,.2f} GiB | "
                f"{seconds:,.0f} s ({scripts / seconds:,.0f} scripts/s) |"
            )
        for as_hash in (False, True):
            added = await bucket_sets(r, n, as_hash)
            kind = "hash (request id -> charge)" if as_hash else "set (request id)"
            print(
                f"| buckets: one hourly {kind} per partition | {added / 2**20:,.1f} MiB | "
                f"{added / n:,.1f} B | {n:,} members | – | 3,600–7,200 s | "
                f"{added / n * 1000 * 5400 / 2**30:,.2f} GiB (mean 1.5 h) | – |"
            )
        # The bound is real: a short window, then Redis' own expiry reclaims the markers.
        before = await used_memory(r)
        await run_requests(balances, accounts, n, args.concurrency, 20_000, False)
        await drop_outboxes(r, keys)
        peak = await used_memory(r) - before
        started = time.monotonic()
        while await r.dbsize() > len(accounts) and time.monotonic() - started < 300:  # noqa: ASYNC110
            await asyncio.sleep(1)  # Redis' active expiry at work: polled, with a deadline
        left = await used_memory(r) - before
        print(
            f"\nwith a 20 s window: +{peak / 2**20:,.1f} MiB right after the run, "
            f"+{left / 2**20:,.1f} MiB {time.monotonic() - started:,.0f} s later "
            f"({await r.dbsize() - len(accounts):,} markers left)"
        )
        assert balances.pipeline is not None
        await balances.pipeline.aclose()
        await r.aclose()


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} × {os.cpu_count()}"
    return platform.processor()


if __name__ == "__main__":
    asyncio.run(main())
