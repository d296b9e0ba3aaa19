"""Settings: YAML file < environment, validated once, errors naming the setting."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.config import Settings, load_settings
from sidecar.errors import ConfigError


def test_defaults_need_nothing() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.demo_upstream
    assert settings.redis_url is None
    assert settings.port == 8080


def test_environment_overrides_the_file(config_file: Callable[[str], str]) -> None:
    path = config_file(
        """
port: 9000
log_level: DEBUG
upstreams:
  openai: {base_url: "https://api.openai.com/v1", api_key_env: MY_OPENAI_KEY}
models:
  gpt-4o-mini:
    prompt: "0.00015"
    completion: "0.0006"
    upstream: openai
    aliases: [mini]
"""
    )
    env = {"CREDITGATE_PORT": "9100", "CREDITGATE_HOLD_LEASE_SECONDS": "60", "MY_OPENAI_KEY": "sk-x"}
    settings = load_settings(path, environ=env)
    assert (settings.port, settings.log_level, settings.hold_lease_seconds) == (9100, "DEBUG", 60)
    assert settings.models["gpt-4o-mini"].aliases == ["mini"]
    assert not settings.demo_upstream
    assert settings.upstream_table()["openai"].base_url == "https://api.openai.com/v1"


def test_config_file_from_environment(config_file: Callable[[str], str]) -> None:
    path = config_file("admin_token: from-file\n")
    assert load_settings(environ={"CREDITGATE_CONFIG": path}).admin_token == "from-file"


def test_structured_settings_from_environment_json() -> None:
    env = {"CREDITGATE_MODELS": '{"m": {"prompt": "1", "max_output_tokens": 5}}'}
    assert load_settings(environ=env).models["m"].max_output_tokens == 5


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"CREDITGATE_PORT": "eighty"}, "port"),
        ({"CREDITGATE_PORT": "70000"}, "port"),
        ({"CREDITGATE_PARTITIONS": "0"}, "partitions"),
        ({"CREDITGATE_LOG_LEVEL": "LOUD"}, "log_level"),
        ({"CREDITGATE_HOLD_LEASE_SECONDS": "-1"}, "hold_lease_seconds"),
        ({"CREDITGATE_NO_SUCH_THING": "1"}, "CREDITGATE_NO_SUCH_THING"),
        ({"CREDITGATE_MODELS": "{not json"}, "CREDITGATE_MODELS"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": 0.5}}'}, "models.m.prompt"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "1", "colour": "red"}}'}, "models.m.colour"),
        (
            {"CREDITGATE_MODELS": '{"m": {"prompt": "1", "max_output_tokens": 0}}'},
            "models.m.max_output_tokens",
        ),
        ({"CREDITGATE_MODELS": '["m"]'}, "models"),
        ({"CREDITGATE_UPSTREAMS": '{"u": {"api_key": "k"}}'}, "upstreams.u.base_url"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "1", "upstream": "nowhere"}}'}, "models.m.upstream"),
        ({"CREDITGATE_MODELS": '{"m": {"prompt": "one"}}'}, "models.m.prompt"),
        ({"CREDITGATE_UPSTREAM_URL": "ftp://example"}, "upstreams.default"),
        ({"CREDITGATE_BYOK_HEADER": "Authorization"}, "byok_header"),
        ({"CREDITGATE_POOLED_MULTIPLIER": "0"}, "pooled_multiplier"),
    ],
)
def test_bad_settings_are_named(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert caught.value.param == setting
    assert setting in caught.value.message


def test_unreadable_or_odd_config_file(config_file: Callable[[str], str]) -> None:
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_settings("/nonexistent/creditgate.yaml", environ={})
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_settings(config_file("- a list\n"), environ={})


def test_every_setting_is_documented_with_its_default() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = [line for line in readme.splitlines() if line.startswith("| `")]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table}
    for name in Settings.__struct_fields__:
        assert name in rows, f"README has no row for setting {name}"
        assert rows[name].count("|") >= 4, f"README row for {name} lacks a default"


@pytest.mark.parametrize("value", ["chat, embeddings", '["chat", "embeddings"]'])
def test_cache_routes_from_the_environment(value: str) -> None:
    settings = load_settings(environ={"CREDITGATE_CACHE_ROUTES": value})
    assert settings.cache_routes == ["chat", "embeddings"]


def test_an_unknown_cache_route_is_named() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(environ={"CREDITGATE_CACHE_ROUTES": "chat,images"})
    assert raised.value.param == "cache_routes.1"  # the offending entry
    assert "'images'" in raised.value.message
