"""Guard rails on the Redis creditgate keeps money in, checked at startup by a real `creditgate serve`
against a redis-server of the test's own: an allkeys-* eviction policy is refused (exit 2, naming it), a
volatile one starts, no maxmemory (or no CONFIG at all) starts with a warning."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster

from sidecar.errors import ConfigError
from sidecar.redis_client import connect_redis
from sidecar.redis_guard import check_redis

from .conftest import Upstream, new_key_prefix, process_env, serve_process
from .support import creditgate
from .support_cluster import LocalCluster
from .support_redis import redis_server

NO_MAXMEMORY = "Redis has no maxmemory set"
NO_CONFIG = "cannot read Redis' maxmemory-policy"
VOLATILE = "evicts settled markers inside their window"


@pytest.mark.parametrize("policy", ["allkeys-lru", "allkeys-lfu", "allkeys-random"])
def test_serve_refuses_an_allkeys_eviction_policy(database_url: str, tmp_path: Path, policy: str) -> None:
    with redis_server(tmp_path, "--maxmemory", "64mb", "--maxmemory-policy", policy) as redis_url:
        env = process_env(
            redis_url, database_url, new_key_prefix(), "http://127.0.0.1:9/v1", CREDITGATE_LOG_LEVEL="ERROR"
        )
        run = creditgate(env, "serve", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("creditgate: Redis' maxmemory-policy is")
    assert "maxmemory-policy" in lines[0]
    assert f"'{policy}'" in lines[0]


@pytest.mark.parametrize(
    ("options", "warning"),
    [
        (("--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"), VOLATILE),
        (("--maxmemory", "64mb", "--maxmemory-policy", "volatile-ttl"), VOLATILE),
        (("--maxmemory", "64mb", "--maxmemory-policy", "noeviction"), None),
        (("--maxmemory-policy", "noeviction"), NO_MAXMEMORY),  # no maxmemory: Debian's default
        (("--rename-command", "CONFIG", ""), NO_CONFIG),  # as managed Redis does
    ],
    ids=["volatile-lru", "volatile-ttl", "noeviction", "no-maxmemory", "no-config"],
)
async def test_serve_starts_on_a_policy_that_keeps_money_keys(
    database_url: str, upstream: Upstream, tmp_path: Path, options: tuple[str, ...], warning: str | None
) -> None:
    with redis_server(tmp_path, *options) as redis_url:
        env = process_env(redis_url, database_url, new_key_prefix(), upstream.url)
        async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as http:
            async with http.get(f"{url}/healthz") as health:  # served once its signal handlers are set
                assert health.status == 200
            assert await served.stop() == 0
    for possible in (NO_MAXMEMORY, NO_CONFIG, VOLATILE):
        assert (possible in served.log) == (possible == warning), served.log
    if warning == NO_CONFIG:
        assert "never allkeys-*" in served.log


async def test_every_primary_of_a_cluster_is_checked(redis_cluster: LocalCluster) -> None:
    client = connect_redis(redis_cluster.url)
    try:
        await check_redis(client)  # the test cluster: noeviction everywhere
        assert isinstance(client, RedisCluster)
        last = client.get_primaries()[-1]
        await client.config_set("maxmemory-policy", "allkeys-lru", target_nodes=last)
        try:
            with pytest.raises(ConfigError, match=f"'allkeys-lru' on {last.name}"):
                await check_redis(client)
        finally:
            await client.config_set("maxmemory-policy", "noeviction", target_nodes=last)
    finally:
        await client.aclose()
