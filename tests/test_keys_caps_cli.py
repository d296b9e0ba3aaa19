"""The CLI verbs of key management and spend caps: what they write, a sidecar on the same servers sees."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from .conftest import SidecarFactory, clean_env, new_key_prefix
from .support import creditgate


async def cli(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, Any]:
    done = await asyncio.to_thread(creditgate, env, *args, cwd=cwd)
    return done.returncode, json.loads(done.stdout if done.returncode == 0 else done.stderr)


@pytest.fixture
def cli_env(redis_url: str, database_url: str) -> dict[str, str]:
    return clean_env(
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=new_key_prefix(),
    )


async def test_cli_keys_caps_and_time_zone(
    cli_env: dict[str, str], make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    account = f"cli-{uuid.uuid4().hex[:8]}"
    assert (await cli(cli_env, tmp_path, "account", "create", account))[0] == 0
    code, key = await cli(
        cli_env, tmp_path, "key", "create", account, "--name", "batch", "--expires-at", "2099-01-01T00:00:00Z"
    )
    assert code == 0, key
    assert (key["name"], key["expires_at"]) == ("batch", "2099-01-01T00:00:00Z")
    code, renamed = await cli(
        cli_env, tmp_path, "key", "update", key["id"], "--name", "nightly", "--never-expires"
    )
    assert code == 0, renamed
    assert (renamed["name"], renamed["expires_at"]) == ("nightly", None)
    code, listed = await cli(cli_env, tmp_path, "key", "list", account)
    assert [k["name"] for k in listed["data"]] == ["nightly"]
    assert listed["data"][0]["prefix"] == key["key"][:12]

    set_args = ("caps", "set", account, "--scope", f"key:{key['id']}", "--period", "day", "--credits", "1.5")
    code, cap = await cli(cli_env, tmp_path, *set_args)
    assert (code, cap["limit"]) == (0, 1_500_000), cap
    code, bad = await cli(
        cli_env, tmp_path, "caps", "set", account, "--scope", "nope", "--period", "day", "--limit", "1"
    )
    assert (code, bad["error"]["param"]) == (1, "scope")
    code, zone = await cli(cli_env, tmp_path, "time-zone", account, "America/New_York")
    assert (code, zone["time_zone"]) == (0, "America/New_York")
    code, caps = await cli(cli_env, tmp_path, "caps", "list", account)
    assert caps["time_zone"] == "America/New_York"
    assert [(c["scope"], c["period"], c["limit"]) for c in caps["caps"]] == [
        (f"key:{key['id']}", "day", 1_500_000)
    ]

    sc = await make_sidecar(key_prefix=cli_env["CREDITGATE_KEY_PREFIX"])
    resp = await sc.client.get("/v1/credits/caps", headers={"Authorization": f"Bearer {key['key']}"})
    assert (await resp.json())["caps"] == caps["caps"]
    raw = await sc.services.redis.hgetall(sc.services.keys.account(account).caps)
    assert raw == {f"key:{key['id']}|day".encode(): b"1500000", b"tz": b"America/New_York"}

    code, deleted = await cli(
        cli_env, tmp_path, "caps", "delete", account, "--scope", f"key:{key['id']}", "--period", "day"
    )
    assert (code, deleted["deleted"]) == (0, True)
    assert (await cli(cli_env, tmp_path, "caps", "list", account))[1]["caps"] == []
