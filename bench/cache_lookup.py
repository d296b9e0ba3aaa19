"""What the response-cache lookup adds to a miss: the reserve script alone, the reserve script with the
cache lookup folded in (what creditgate does), and a separate GET before the reserve (the naive way).

    python bench/cache_lookup.py [--redis redis://127.0.0.1:6379/0] [--rounds 5] [--calls 2000]

Each round times `calls` sequential calls of each variant, interleaved (A B C A B C …) to cancel drift;
the table shows the median per-call latency over the rounds. Every reservation is released again.

    python bench/cache_lookup.py --keying [--rounds 5]

What computing the cache key of a 1 MiB cacheable body costs the event loop (no Redis): for bodies of
several shapes (one long message, many short messages, token-id arrays, numbers with a fraction, small
objects), the CPU time of one key, and the longest stall of the event loop while four such keys are
computed at once, on the loop itself and in the cache's key worker thread. The stall is what a
`/healthz` probe arriving then waits; a 1 ms ticker task measures it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import msgspec

from sidecar.app import connect_redis
from sidecar.balances import Balances
from sidecar.cachekey import cache_key
from sidecar.keys import KeySpace
from sidecar.redis_client import RedisClient


async def run(url: str, rounds: int, calls: int) -> None:
    redis: RedisClient = connect_redis(url)
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


MiB = 1024 * 1024


def _bodies() -> dict[str, bytes]:
    """1 MiB chat bodies (temperature 0: cacheable) of the shapes that cost the key the most and least."""

    def chat(**fields: object) -> bytes:
        return msgspec.json.encode({"model": "gpt-4o-mini", "temperature": 0, **fields})

    def array(unit: bytes) -> bytes:
        return b"[" + b",".join([unit] * (MiB // (len(unit) + 1))) + b"]"

    def spliced(field: str, value: bytes) -> bytes:
        return b'{"model":"gpt-4o-mini","temperature":0,"' + field.encode() + b'":' + value + b"}"

    return {
        "one long message": chat(messages=[{"role": "user", "content": "word " * (MiB // 5)}]),
        "short messages": chat(messages=[{"role": "user", "content": "hi there"}] * (MiB // 42)),
        "token-id arrays": spliced("input", array(b"[1234,5678]")),
        "numbers with a fraction": spliced("logit_bias", array(b"1.0")),
        "small objects": spliced("tools", array(b'{"b":1,"a":2}')),
    }


async def _stall(keys: Callable[[], Awaitable[None]]) -> float:
    """The longest gap (ms) between the ticks of a 1 ms ticker while `keys` runs."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    await keys()
    done.set()
    await task
    return max(gaps) * 1000


async def keying(rounds: int) -> None:
    worker = ThreadPoolExecutor(max_workers=1)  # as the cache's own key worker
    loop = asyncio.get_running_loop()
    print(
        f"| 1 MiB body ({rounds} rounds, medians) | one key, ms of CPU | loop stall, 4 keys on the loop "
        "| loop stall, 4 keys in the worker |"
    )
    print("|---|---|---|---|")
    for name, body in _bodies().items():
        cpu, inline, threaded = [], [], []
        for _ in range(rounds):
            started = time.process_time()
            cache_key("chat", "gpt-4o-mini", body, "account:bench")
            cpu.append((time.process_time() - started) * 1000)

            async def on_loop(body: bytes = body) -> None:
                for _ in range(4):  # the ticker gets a turn between keys, as a probe would
                    cache_key("chat", "gpt-4o-mini", body, "account:bench")
                    await asyncio.sleep(0.002)

            async def in_worker(body: bytes = body) -> None:
                await asyncio.gather(
                    *(
                        loop.run_in_executor(worker, cache_key, "chat", "gpt-4o-mini", body, "account:b")
                        for _ in range(4)
                    )
                )

            inline.append(await _stall(on_loop))
            threaded.append(await _stall(in_worker))
        print(
            f"| {name} | {statistics.median(cpu):.1f} | {statistics.median(inline):.1f} ms "
            f"| {statistics.median(threaded):.1f} ms |"
        )
    worker.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--keying", action="store_true", help="time the cache key instead (no Redis)")
    args = parser.parse_args()
    if args.keying:
        asyncio.run(keying(args.rounds))
    else:
        asyncio.run(run(args.redis, args.rounds, args.calls))


if __name__ == "__main__":
    main()
