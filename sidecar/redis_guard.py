"""What creditgate asks of the Redis it keeps money in, checked once at startup.

Balances, holds, settled markers, grant markers and the outbox live in Redis; under an ``allkeys-*``
eviction policy a full Redis deletes any of them (a balance gone, an outbox entry never written to the
ledger, a marker gone early so a retry charges twice). Those keys have no TTL, or only the window's, so
``noeviction`` (a full Redis refuses new holds: 503s, nothing lost) or a ``volatile-*`` policy (only keys
with a TTL go: cache entries, then markers at the end of their window) keep them. Without ``maxmemory``
Redis grows until the host's memory runs out. Managed Redis often renames or disables ``CONFIG``: then
the policy cannot be read, and a warning says what to check by hand.
"""

from __future__ import annotations

import logging
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from .errors import ConfigError

log = logging.getLogger("creditgate.redis")


def _value(reply: Any, name: str) -> str | None:
    value = reply.get(name, reply.get(name.encode())) if isinstance(reply, dict) else None
    return value.decode() if isinstance(value, bytes) else value


async def check_redis(redis: Redis) -> None:
    """Refuse an ``allkeys-*`` maxmemory-policy (ConfigError naming it: `serve` exits 2); warn when no
    maxmemory is set, or when CONFIG is unavailable."""
    try:
        policy = _value(await redis.config_get("maxmemory-policy"), "maxmemory-policy")
        limit = _value(await redis.config_get("maxmemory"), "maxmemory")
    except ResponseError as exc:  # renamed or disabled (managed Redis): cannot tell
        log.warning(
            "cannot read Redis' maxmemory-policy (CONFIG GET: %s); make sure it is noeviction or "
            "volatile-ttl, never allkeys-*, and that maxmemory is set",
            exc,
        )
        return
    if policy is not None and policy.startswith("allkeys-"):
        raise ConfigError(
            f"Redis' maxmemory-policy is {policy!r}: when Redis is full it would evict balances, holds, "
            "settled markers and the outbox. Set maxmemory-policy to noeviction or volatile-ttl.",
            param="maxmemory-policy",
        )
    if limit is not None and limit.strip() == "0":
        log.warning(
            "Redis has no maxmemory set (maxmemory-policy %s): it grows until the host runs out of "
            "memory; set maxmemory, with maxmemory-policy noeviction or volatile-ttl",
            policy,
        )
