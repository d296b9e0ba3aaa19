"""What the response-cache lookup adds to a miss: the reserve script alone, the reserve script with the
cache lookup folded in (what creditgate does), and a separate GET before the reserve (the naive way).

    python bench/cache_lookup.py [--redis redis://127.0.0.1:6379/0] [--rounds 5] [--calls 2000]

Each round times `calls` sequential calls of each variant, interleaved (A B C A B C …) to cancel drift;
the table shows the median per-call latency over the rounds. Every reservation is released again.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from sidecar.app import connect_redis
from sidecar.balances import Balances
from sidecar.keys import KeySpace


async def run(url: str, rounds: int, calls: int) -> None:
    redis: Redis = connect_redis(url)
    keys = KeySpace(f"bench-{uuid.uuid4().hex[:8]}:", 16)
    balances = Balances(redis, keys, settled_marker_ms=60_000)
    await balances.load_scripts()
    account = "bench-account"
    k = keys.account(account)
    await redis.hset(k.balance, mapping={"balance": 10**15, "held": 0})
    lease = int(time.time() * 1000) + 600_000

    async def plain(i: int) -> None:
        await balances.reserve(account, f"p{i}", 1000, lease)

    async def folded(i: int) -> None:
        await balances.reserve(account, f"f{i}", 1000, lease, cache_key=k.cache(f"missing-{i}"))

    async def separate(i: int) -> None:
        await redis.get(k.cache(f"missing-{i}"))
        await balances.reserve(account, f"s{i}", 1000, lease)

    variants: dict[str, Callable[[int], Awaitable[None]]] = {
        "reserve only": plain,
        "reserve + lookup in one script (creditgate)": folded,
        "GET, then reserve": separate,
    }
    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, call in variants.items():
            started = time.perf_counter()
            for i in range(calls):
                await call(r * calls + i)
            per_call[name].append((time.perf_counter() - started) / calls * 1e6)
    base = statistics.median(per_call["reserve only"])
    print(f"| variant ({calls} calls x {rounds} rounds) | µs per call (median) | vs reserve only |")
    print("|---|---|---|")
    for name, samples in per_call.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.1f} | {median - base:+.1f} µs |")
    async for key in redis.scan_iter(match=f"{keys.prefix}*"):
        await redis.delete(key)
    await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(run(args.redis, args.rounds, args.calls))


if __name__ == "__main__":
    main()
