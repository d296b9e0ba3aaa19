"""Micro-benchmark of the request path's auto-pipelined Redis connection: client CPU per script call.

    python bench/autopipeline.py [--url redis://127.0.0.1:6379/0 | --cluster] [--concurrency 64]
                                 [--calls 20000] [--rounds 5]
                                 [--client pipeline|redis-py|glide|coredis]

``--concurrency`` tasks share one client and call a one-key EVALSHA (a script that returns its argument:
Redis' own cost kept small) until ``--calls`` are done. Reported per round: this process's CPU µs per
call (``time.process_time``: the CPU of every thread of the process, so the Rust core glide runs in
threads of its own is counted; the figure the pipeline exists to lower) and calls/s; then the median of
each over the rounds. Keys are spread over 16 ``{p<N>}`` tags as the money keys are. ``--cluster``
starts a 6-node cluster on loopback (3 masters, 3 replicas: ``tests/support_cluster.LocalCluster``) and
runs against it; a ``redis+cluster://`` ``--url`` uses a running one.

Clients:

- ``pipeline`` (ours): ``sidecar.cluster_pipeline.pipeline_for``: one node's ``AutoPipeline``, or the
  per-node ``ClusterAutoPipeline`` behind a slot map.
- ``redis-py``: redis-py's asyncio ``Redis`` / ``RedisCluster`` (``sidecar.redis_client.connect_redis``,
  a pool of ``--concurrency`` connections), ``evalsha``.
- ``glide``: valkey-glide's asyncio ``GlideClient`` / ``GlideClusterClient`` (one multiplexed connection
  per node, a Rust core in threads of this process), ``invoke_script(Script)`` (EVALSHA, loading the
  script on NOSCRIPT).
- ``coredis``: ``coredis.Redis`` / ``coredis.RedisCluster`` (multiplexes non-blocking commands on its
  pooled connections), ``evalsha``.

glide and coredis are not dependencies of the sidecar: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sidecar.cluster_pipeline import pipeline_for
from sidecar.redis_client import connect_redis
from sidecar.redis_urls import is_cluster_url, parse_cluster_url

SCRIPT = "return ARGV[1]"
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
CLIENTS = ("pipeline", "redis-py", "glide", "coredis")
EXTRA_PACKAGES = {"glide": "valkey-glide", "coredis": "coredis"}

Call = Callable[[str], Awaitable[Any]]


def _nodes(url: str) -> list[tuple[str, int]]:
    if is_cluster_url(url):
        return list(parse_cluster_url(url).nodes)
    parts = urlsplit(url)
    return [(parts.hostname or "127.0.0.1", parts.port or 6379)]


def _db(url: str) -> int:
    path = urlsplit(url).path.strip("/")
    return int(path) if path else 0


def _require(client: str) -> None:
    """Exit naming the extra to install when glide or coredis is missing."""
    package = EXTRA_PACKAGES.get(client)
    if package is None:
        return
    try:
        importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"--client {client} needs {package}, not installed: pip install -e '.[bench]'")


@contextlib.asynccontextmanager
async def open_client(client: str, url: str, concurrency: int) -> Any:
    """Yield ``call(key)``: one EVALSHA of SCRIPT on ``key`` through the chosen client."""
    cluster = is_cluster_url(url)
    if client == "pipeline":
        pipeline = pipeline_for(url)
        try:
            yield lambda key: pipeline.evalsha(SHA, SCRIPT, [key], ["x"])
        finally:
            await pipeline.aclose()
    elif client == "redis-py":
        redis = connect_redis(url, max_connections=concurrency)
        try:
            yield lambda key: redis.evalsha(SHA, 1, key, "x")
        finally:
            await redis.aclose()
    elif client == "glide":
        import glide

        addresses = [glide.NodeAddress(host, port) for host, port in _nodes(url)]
        config: Any
        if cluster:
            config = glide.GlideClusterClientConfiguration(addresses, request_timeout=5000)
            glide_client: Any = await glide.GlideClusterClient.create(config)
        else:
            config = glide.GlideClientConfiguration(addresses, request_timeout=5000, database_id=_db(url))
            glide_client = await glide.GlideClient.create(config)
        script = glide.Script(SCRIPT)
        try:
            yield lambda key: glide_client.invoke_script(script, keys=[key], args=["x"])
        finally:
            await glide_client.close()
    elif client == "coredis":
        import coredis

        host, port = _nodes(url)[0]
        core: Any
        if cluster:
            startup = [coredis.connection.TCPLocation(h, p) for h, p in _nodes(url)]
            core = coredis.RedisCluster(startup_nodes=startup, max_connections=concurrency)
        else:
            core = coredis.Redis(host, port, db=_db(url), max_connections=concurrency)
        async with core:
            yield lambda key: core.evalsha(SHA, keys=[key], args=["x"])
    else:
        raise ValueError(f"--client: unknown client {client!r}, one of {', '.join(CLIENTS)}")


async def one_round(url: str, concurrency: int, calls: int, client: str) -> tuple[float, float, int]:
    redis = connect_redis(url)
    await redis.script_load(SCRIPT)  # on every primary
    await redis.aclose()
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    keys = [f"{prefix}{{p{n}}}:k" for n in range(16)]
    async with open_client(client, url, concurrency) as call:
        for key in keys:  # connect (to every node that owns a key)
            await call(key)
        remaining = calls

        async def worker(n: int) -> None:
            nonlocal remaining
            key = keys[n % len(keys)]
            while remaining > 0:
                remaining -= 1
                await call(key)

        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(n) for n in range(concurrency)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        threads = _threads()
    return cpu / calls * 1e6, calls / wall, threads


def _threads() -> int:
    """This process's threads (glide's Rust core runs in some of them), 0 where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _versions(client: str) -> str:
    names = ["redis", *([EXTRA_PACKAGES[client]] if client in EXTRA_PACKAGES else [])]
    return ", ".join(f"{name} {importlib.metadata.version(name)}" for name in names)


async def run(args: argparse.Namespace, url: str) -> None:
    print(f"client {args.client} ({_versions(args.client)}), {url}, load average {_loadavg()}")
    cpus, rates = [], []
    for n in range(args.rounds):
        cpu, rate, threads = await one_round(url, args.concurrency, args.calls, args.client)
        cpus.append(cpu)
        rates.append(rate)
        print(f"round {n + 1}: {cpu:6.2f} µs CPU per call, {rate:9,.0f} calls/s ({threads} threads)")
    print(f"median: {statistics.median(cpus):6.2f} µs CPU per call, {statistics.median(rates):9,.0f} calls/s")
    print(f"load average after: {_loadavg()}")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", action="store_true", help="start a 3-master cluster on loopback")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--client", choices=CLIENTS, default="pipeline")
    args = parser.parse_args()
    _require(args.client)
    if not args.cluster:
        asyncio.run(run(args, args.url))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's tests package
    from tests.support_cluster import LocalCluster

    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        cluster = LocalCluster(Path(directory))
        try:
            asyncio.run(run(args, cluster.start()))
        finally:
            cluster.stop()


if __name__ == "__main__":
    main()
