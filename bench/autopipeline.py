"""Micro-benchmark of the request path's auto-pipelined Redis connection: client CPU per script call.

    python bench/autopipeline.py [--url redis://127.0.0.1:6379/0] [--concurrency 64] [--calls 20000]
                                 [--rounds 5] [--client pipeline|redis-py]

``--concurrency`` tasks share one pipeline (``sidecar.cluster_pipeline.pipeline_for``: one node's
``AutoPipeline``, or the per-node ``ClusterAutoPipeline`` for a ``redis+cluster://`` URL) and call a
one-key EVALSHA (a script that returns its argument: Redis' own cost kept small) until ``--calls`` are
done. Reported per round: this process's CPU µs per call (``time.process_time``, the figure the
pipeline exists to lower) and calls/s; then the median of each over the rounds. Keys are spread over 16
``{p<N>}`` tags as the money keys are. ``--client redis-py`` makes the same calls through redis-py's
client instead (``sidecar.redis_client.connect_redis``: ``Redis`` or ``RedisCluster``, a pool of
``--concurrency`` connections), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import time
import uuid

from sidecar.cluster_pipeline import pipeline_for
from sidecar.redis_client import connect_redis

SCRIPT = "return ARGV[1]"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


async def one_round(url: str, concurrency: int, calls: int, client: str) -> tuple[float, float]:
    pipeline = pipeline_for(url)
    redis = connect_redis(url, max_connections=concurrency)
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{p{n}}}:k" for n in range(16)]
    await redis.script_load(SCRIPT)  # on every primary
    await pipeline.evalsha(SHA, SCRIPT, [keys[0]], ["warm"])  # connect
    remaining = calls

    async def worker(n: int) -> None:
        nonlocal remaining
        key = [keys[n % len(keys)]]
        while remaining > 0:
            remaining -= 1
            if client == "redis-py":
                await redis.evalsha(SHA, 1, key[0], "x")
            else:
                await pipeline.evalsha(SHA, SCRIPT, key, ["x"])

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await pipeline.aclose()
    await redis.aclose()
    return cpu / calls * 1e6, calls / wall


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--client", choices=["pipeline", "redis-py"], default="pipeline")
    args = parser.parse_args()
    cpus, rates = [], []
    for n in range(args.rounds):
        cpu, rate = await one_round(args.url, args.concurrency, args.calls, args.client)
        cpus.append(cpu)
        rates.append(rate)
        print(f"round {n + 1}: {cpu:6.2f} µs CPU per call, {rate:9,.0f} calls/s")
    print(f"median: {statistics.median(cpus):6.2f} µs CPU per call, {statistics.median(rates):9,.0f} calls/s")


if __name__ == "__main__":
    asyncio.run(main())
