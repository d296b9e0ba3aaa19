"""The cost of WAIT after settle (``settle_wait_replicas``) on a Redis Cluster (run by hand).

Starts a throwaway 6-node cluster (3 masters, 3 replicas; tests/support_cluster.LocalCluster, Redis 7
from PATH) and drives reserve + settle pairs through `sidecar.balances.Balances` on the request path's
cluster pipeline (`ClusterAutoPipeline`), over --accounts accounts spread on all three masters, at
concurrency 1 and 64, with WAIT off and with WAIT 1 (timeout --timeout-ms). With --degraded, one more
run of WAIT 1 at c=64 with one master's replica stopped (SIGSTOP): what a settle pays while a replica is
down. Reports pairs/s, the settle call's latency p50/p99 and this process's CPU per pair (user + system,
`time.process_time`). The outbox streams are emptied between runs (the flusher would move them).

    python bench/settle_wait.py [--accounts 1000] [--pairs-c1 2000] [--pairs-c64 20000] [--timeout-ms 100]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sidecar.balances import Balances
from sidecar.cluster_pipeline import ClusterAutoPipeline
from sidecar.keys import KeySpace
from sidecar.outbox import UsageEvent
from sidecar.redis_client import connect_redis
from sidecar.replicas import ReplicaWait
from tests.support_cluster import LocalCluster

PARTITIONS = 16


def replicas_synced(cluster: LocalCluster) -> bool:
    """Every master sees its replica online and acknowledging a real offset (the first sync is done)."""
    masters = 0
    for port in cluster.ports:
        info = redis.Redis(port=port).info("replication")
        if info["role"] != "master":
            continue
        masters += 1
        links = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if not links or any(v["state"] != "online" or not int(v["offset"]) for v in links):
            return False
    return masters == 3


async def run(
    balances: Balances, accounts: list[str], pairs: int, concurrency: int
) -> tuple[float, list[float], float]:
    """`pairs` reserve + settle pairs from `concurrency` workers: (seconds, settle latencies, CPU s)."""
    event = UsageEvent(
        route="chat", model="gpt-4o-mini", outcome="ok", prompt_tokens=20, completion_tokens=50
    )
    counter = iter(range(pairs))
    latencies: list[float] = []

    async def worker() -> None:
        for i in counter:
            account = accounts[i % len(accounts)]
            request_id = "req_" + secrets.token_hex(16)
            now = int(time.time() * 1000)
            await balances.reserve(account, request_id, 20_000, now + 900_000)
            started = time.perf_counter()
            await balances.settle(account, request_id, 7_500, event)
            latencies.append(time.perf_counter() - started)

    cpu, started = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, time.process_time() - cpu


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 1000) - 1] if len(values) > 1 else values[0]


async def bench(cluster: LocalCluster, args: argparse.Namespace) -> None:
    r: Any = connect_redis(cluster.url)
    keys = KeySpace("cg:", PARTITIONS)
    pipeline = ClusterAutoPipeline(cluster.url)
    accounts = [f"acct_{i:06d}" for i in range(args.accounts)]
    async with r.pipeline(transaction=False) as pipe:
        for account in accounts:
            pipe.hset(keys.account(account).balance, mapping={"balance": 10**15, "held": 0})
        await pipe.execute()
    plans: list[tuple[str, int, int]] = [("off", 1, args.pairs_c1), ("off", 64, args.pairs_c64)]
    plans += [("WAIT 1", 1, args.pairs_c1), ("WAIT 1", 64, args.pairs_c64)]
    if args.degraded:
        plans.append(("WAIT 1, one replica stopped", 64, args.pairs_degraded))
    print("| WAIT | c | pairs | pairs/s | settle p50 | settle p99 | client CPU per pair | unreplicated |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    stopped = None
    try:
        for label, concurrency, pairs in plans:
            wait = None if label == "off" else ReplicaWait(1, args.timeout_ms)
            balances = Balances(r, keys, settled_marker_ms=3_600_000, pipeline=pipeline, replicas=wait)
            await balances.load_scripts()
            if "stopped" in label and stopped is None:
                replica = next(
                    p for p in cluster.ports if redis.Redis(port=p).info("replication")["role"] == "slave"
                )
                stopped = cluster.processes[cluster.ports.index(replica)]
                stopped.send_signal(signal.SIGSTOP)
            await run(balances, accounts, min(pairs, 200), concurrency)  # warm-up: connections, map
            seconds, latencies, cpu = await run(balances, accounts, pairs, concurrency)
            print(
                f"| {label} | {concurrency} | {pairs:,} | {pairs / seconds:,.0f} | "
                f"{quantile(latencies, 0.5) * 1e3:.2f} ms | {quantile(latencies, 0.99) * 1e3:.2f} ms | "
                f"{cpu / pairs * 1e6:.0f} µs | {wait.short if wait else 0:,} |"
            )
            for partition in range(PARTITIONS):
                await r.delete(keys.outbox(partition))
    finally:
        if stopped is not None:
            stopped.send_signal(signal.SIGCONT)
        await pipeline.aclose()
        await r.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument("--pairs-c1", type=int, default=2000)
    parser.add_argument("--pairs-c64", type=int, default=20000)
    parser.add_argument("--pairs-degraded", type=int, default=5000)
    parser.add_argument("--timeout-ms", type=int, default=100)
    parser.add_argument("--degraded", action="store_true", help="also run with one replica stopped")
    args = parser.parse_args()
    logging.getLogger("creditgate.replicas").setLevel(logging.ERROR)  # each short settle's WARNING
    with tempfile.TemporaryDirectory() as directory:
        cluster = LocalCluster(Path(directory))
        cluster.start()
        try:
            deadline = time.monotonic() + 60
            while not replicas_synced(cluster):
                if time.monotonic() > deadline:
                    raise SystemExit("the replicas did not sync within 60 s")
                time.sleep(0.1)
            print(
                f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; Python {platform.python_version()};"
                f" load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}"
            )
            asyncio.run(bench(cluster, args))
            print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
