"""Running under Kubernetes: the service-link variables it injects into every pod are not settings."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from sidecar.config import load_settings, service_links
from sidecar.errors import ConfigError

from .conftest import clean_env, new_key_prefix, serve_process

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
        **SERVICE_LINKS,
    )
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        assert f"ignoring {len(SERVICE_LINKS)} Kubernetes service-link variables" in served.log
        assert "CREDITGATE_SERVICE_HOST" in served.log
        assert "Unknown setting" not in served.log
        assert await served.stop() == 0
