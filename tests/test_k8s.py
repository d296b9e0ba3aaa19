"""Running under Kubernetes: service-link variables are not settings; readiness by mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from sidecar.app import SERVICES
from sidecar.balances import Balances
from sidecar.config import load_settings, service_links
from sidecar.errors import ConfigError
from sidecar.health import READINESS
from sidecar.keys import KeySpace

from .conftest import SidecarFactory, clean_env, new_key_prefix, serve_process

# Exactly what the kubelet injects for a Service named creditgate (port 8080, named "http") and one
# named creditgate-ops (port 9090, named "ops").
SERVICE_LINKS = {
    "CREDITGATE_SERVICE_HOST": "10.96.0.12",
    "CREDITGATE_SERVICE_PORT": "8080",
    "CREDITGATE_SERVICE_PORT_HTTP": "8080",
    "CREDITGATE_PORT": "tcp://10.96.0.12:8080",
    "CREDITGATE_PORT_8080_TCP": "tcp://10.96.0.12:8080",
    "CREDITGATE_PORT_8080_TCP_ADDR": "10.96.0.12",
    "CREDITGATE_PORT_8080_TCP_PORT": "8080",
    "CREDITGATE_PORT_8080_TCP_PROTO": "tcp",
    "CREDITGATE_OPS_SERVICE_HOST": "10.96.0.13",
    "CREDITGATE_OPS_SERVICE_PORT": "9090",
    "CREDITGATE_OPS_SERVICE_PORT_OPS": "9090",
    "CREDITGATE_OPS_PORT": "tcp://10.96.0.13:9090",
    "CREDITGATE_OPS_PORT_9090_TCP": "tcp://10.96.0.13:9090",
    "CREDITGATE_OPS_PORT_9090_TCP_ADDR": "10.96.0.13",
    "CREDITGATE_OPS_PORT_9090_TCP_PORT": "9090",
    "CREDITGATE_OPS_PORT_9090_TCP_PROTO": "tcp",
}


def test_service_links_are_not_settings() -> None:
    settings = load_settings(environ={**SERVICE_LINKS, "CREDITGATE_LOG_LEVEL": "DEBUG"})
    assert settings.port == 8080  # the default, not "tcp://10.96.0.12:8080"
    assert settings.log_level == "DEBUG"
    assert service_links(SERVICE_LINKS) == sorted(SERVICE_LINKS)
    assert service_links({"CREDITGATE_PORT": "9000", "CREDITGATE_HOST": "0.0.0.0"}) == []


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"CREDITGATE_PROT": "8080"}, "CREDITGATE_PROT"),
        ({"CREDITGATE_SERVICE_HOSTS": "x"}, "CREDITGATE_SERVICE_HOSTS"),
        ({"CREDITGATE_PORT_TCP": "8080"}, "CREDITGATE_PORT_TCP"),
        ({"CREDITGATE_PORT": "tcp://nowhere"}, "port"),
        ({**SERVICE_LINKS, "CREDITGATE_ADMIN_TOKN": "x"}, "CREDITGATE_ADMIN_TOKN"),
    ],
)
def test_a_mistyped_setting_still_stops_startup(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert caught.value.param == setting


async def test_serve_starts_with_the_service_links_of_its_namespace(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    config = tmp_path / "creditgate.yaml"
    config.write_text("port: 0\n")  # CREDITGATE_PORT is the service link's, as in a pod
    env = clean_env(
        CREDITGATE_CONFIG=str(config),
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=new_key_prefix(),
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
        CREDITGATE_UPSTREAM_URL="http://127.0.0.1:9/v1",  # serve needs one; never called here
        **SERVICE_LINKS,
    )
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        assert f"ignoring {len(SERVICE_LINKS)} Kubernetes service-link variables" in served.log
        assert "CREDITGATE_SERVICE_HOST" in served.log
        assert "Unknown setting" not in served.log
        assert await served.stop() == 0


DEAD_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("overrides", "checks_redis"),
    [
        ({}, True),  # standalone: today's Redis check
        ({"mode": "standalone"}, True),
        # a shared Redis blip must not empty every app's Service (sidecar mode: /readyz on the ops
        # listener; the admin API, off by default there, funds the test's account)
        ({"mode": "sidecar", "admin_enabled": True}, False),
        ({"mode": "sidecar", "admin_enabled": True, "readiness_checks_redis": True}, True),
        ({"mode": "standalone", "readiness_checks_redis": False}, False),
    ],
)
async def test_readiness_checks_redis_by_mode(
    make_sidecar: SidecarFactory, overrides: dict[str, Any], checks_redis: bool
) -> None:
    sc = await make_sidecar(readiness_grace_seconds=0, models={"tm": {"prompt": "0.001"}}, **overrides)
    _, key = await sc.account(1_000_000)
    dead = Redis.from_url(DEAD_REDIS, socket_connect_timeout=1, retry_on_error=[])
    try:
        sc.client.app[READINESS].balances = Balances(dead, KeySpace("x:", 16), settled_marker_ms=1000)
        accounts = sc.client.app[SERVICES].accounts
        accounts.redis = dead
        first = await sc.health.get("/readyz")  # the first failing check opens the (zero) grace window
        assert first.status == 200
        resp = await sc.health.get("/readyz")
        assert resp.status == (503 if checks_redis else 200), await resp.text()
        # either way a request that needs Redis gets a 503 while it is gone
        chat = await sc.client.post(
            "/v1/chat/completions",
            json={"model": "tm", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert chat.status == 503
    finally:
        await dead.aclose()


def test_mode_is_validated() -> None:
    assert load_settings(environ={"CREDITGATE_MODE": "sidecar"}).readiness_redis is False
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CREDITGATE_MODE": "daemonset"})
    assert caught.value.param == "mode"
