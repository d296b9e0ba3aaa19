"""What creditgate asks of the Redis it keeps money in, checked once at startup (on every primary of a
cluster).

Balances, holds, settled markers, grant markers and the outbox live in Redis. Under an ``allkeys-*``
eviction policy a full Redis deletes any of them (a balance gone, an outbox entry never written to the
ledger): refused. Under a ``volatile-*`` policy it deletes keys that have a TTL: cache entries, but also
settled markers inside their window, and a settle retried after its marker was evicted would charge
again: a warning. ``noeviction`` keeps everything (a full Redis refuses new holds: 503s, nothing lost).
Without ``maxmemory`` Redis grows until the host's memory runs out: a warning. Managed Redis often
renames or disables ``CONFIG``: then the policy cannot be read, and a warning says what to check by hand.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from .errors import ConfigError
from .redis_client import RedisClient

log = logging.getLogger("creditgate.redis")


def _value(reply: Any, name: str) -> str | None:
    value = reply.get(name, reply.get(name.encode())) if isinstance(reply, dict) else None
    return value.decode() if isinstance(value, bytes) else value


async def _configs(redis: RedisClient) -> list[tuple[str, Any]]:
    """(node, its maxmemory settings) of the Redis, or of every primary of a cluster."""
    if isinstance(redis, RedisCluster):
        await redis.initialize()  # the slot map (a no-op once read): a fresh client knows no nodes yet
        nodes = redis.get_primaries()
        return [(node.name, await redis.config_get("maxmemory*", target_nodes=node)) for node in nodes]
    return [("redis", await redis.config_get("maxmemory*"))]


async def check_redis(redis: RedisClient) -> None:
    """Refuse an ``allkeys-*`` maxmemory-policy (ConfigError naming it: `serve` exits 2); warn about a
    ``volatile-*`` one, no maxmemory, or CONFIG unavailable."""
    try:
        configs = await _configs(redis)
    except ResponseError as exc:  # renamed or disabled (managed Redis): cannot tell
        log.warning(
            "cannot read Redis' maxmemory-policy (CONFIG GET: %s); make sure it is noeviction, never "
            "allkeys-* (or volatile-*), and that maxmemory is set",
            exc,
        )
        return
    for node, config in configs:
        where = "" if node == "redis" else f" on {node}"
        policy, limit = _value(config, "maxmemory-policy"), _value(config, "maxmemory")
        if policy is not None and policy.startswith("allkeys-"):
            raise ConfigError(
                f"Redis' maxmemory-policy is {policy!r}{where}: when Redis is full it would evict balances, "
                "holds, settled markers and the outbox. Set maxmemory-policy to noeviction.",
                param="maxmemory-policy",
            )
        if policy is not None and policy.startswith("volatile-"):
            log.warning(
                "Redis' maxmemory-policy is %s%s: when Redis is full it evicts settled markers inside "
                "their window, and a settle retried then would charge again; set it to noeviction",
                policy,
                where,
            )
        if limit is not None and limit.strip() == "0":
            log.warning(
                "Redis has no maxmemory set%s (maxmemory-policy %s): it grows until the host runs out of "
                "memory; set maxmemory, with maxmemory-policy noeviction",
                where,
                policy,
            )
