"""The redis-py client of the admin, flusher, reconcile, reaper, lease and health paths: one node
(``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster (``redis+cluster://``, see redis_urls).

On a cluster no command may span two hash slots. The callers keep to that: every money key of one
partition shares the partition's ``{p<N>}`` tag, a MULTI (``pipeline(transaction=True)``) only ever
holds keys of one partition, and reads or writes over several partitions are non-transactional
pipelines, which redis-py's cluster client splits per node. ``RedisCluster`` walks SCAN over every
primary and splits DEL/UNLINK/EXISTS of many keys by slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from typing import Any

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from .redis_urls import is_cluster_url, parse_cluster_url

_HOLDING = contextvars.ContextVar("creditgate_redis_gate", default=False)


class _Gate:
    """At most `slots` commands or pipelines at once; a caller beyond waits up to `timeout` for a turn,
    then gets the ConnectionError a full BlockingConnectionPool gives. Re-entrant within one call (redis-py
    sends a pipeline's redirected commands through the client again)."""

    def __init__(self, slots: int, timeout: float) -> None:
        self.semaphore = asyncio.Semaphore(slots)
        self.timeout = timeout

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if _HOLDING.get():
            yield
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.semaphore.acquire()
        except TimeoutError:
            raise rx.ConnectionError("No connection available.") from None
        token = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self.semaphore.release()


class GatedRedisCluster(RedisCluster):
    """redis-py's cluster client, whose per-node pool raises MaxConnectionsError when a burst finds every
    connection busy, made to wait instead, as the one-node client's BlockingConnectionPool does: no more
    than `max_connections` commands and pipelines run at once (each takes at most one connection of a
    node), so no node's pool is ever exhausted."""

    def __init__(self, *args: Any, gate: _Gate, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = gate

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with self.gate.turn():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        if shard_hint:
            raise rx.RedisClusterException("shard_hint is deprecated in cluster mode")
        return _GatedPipeline(self, transaction)  # type: ignore[abstract]  # as redis-py builds its own


class _GatedPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        client = self.cluster_client
        assert isinstance(client, GatedRedisCluster)
        async with client.gate.turn():
            return await super().execute(raise_on_error, allow_redirections)


RedisClient = Redis | RedisCluster
REDIS_RETRIES = 3  # the default of redis_retries


def _retry(retries: int) -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries)


def connect_redis(
    url: str, max_connections: int = 64, timeout: float = 5.0, retries: int = REDIS_RETRIES
) -> RedisClient:
    """A client whose pool makes callers wait for a free connection rather than fail under a burst.
    A command that times out or whose connection drops is sent again up to `retries` times, with
    exponential backoff: only idempotent commands go through this client (scripts idempotent by an id,
    reads, ZADD XX GT, XACK/XDEL, XREADGROUP/XAUTOCLAIM whose entries stay pending until acknowledged).
    On a cluster, `max_connections` is per node, and MOVED/ASK/CLUSTERDOWN are followed by redis-py."""
    if is_cluster_url(url):
        cluster = parse_cluster_url(url)
        seeds = cluster.seed_urls
        return GatedRedisCluster.from_url(
            seeds[0],
            gate=_Gate(max_connections, timeout),
            startup_nodes=[ClusterNode(host, port) for host, port in cluster.nodes],
            max_connections=max_connections,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            retry=_retry(retries),
            retry_on_error=[rx.ConnectionError, rx.TimeoutError],
        )
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=_retry(retries),
        retry_on_error=[rx.ConnectionError, rx.TimeoutError],
    )
    return Redis.from_pool(pool)


async def read_group(
    redis: RedisClient, group: str, consumer: str, streams: list[str], count: int
) -> list[tuple[Any, list[Any]]]:
    """XREADGROUP of new entries (``>``) from `streams`, up to `count` per stream, without blocking:
    [(stream, entries)] for the streams that had some. On one node one command; on a cluster one per
    stream (each partition's stream is a slot of its own, and one read of several would span slots),
    pipelined by redis-py per node, so still one round trip per node."""
    if isinstance(redis, RedisCluster):
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)
            return [found for one in await pipe.execute() for found in one or []]
    reply: Any = await redis.xreadgroup(group, consumer, dict.fromkeys(streams, ">"), count=count)
    return list(reply or [])
