"""The operator surface: the /admin API, the `creditgate` CLI verbs, and `creditgate demo` run for real."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from sidecar.accounts import hash_key
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.keys import as_text

from .conftest import ADMIN_TOKEN, Sidecar, SidecarFactory, clean_env, new_key_prefix

# ---- the admin API ------------------------------------------------------------------------------------


async def admin_call(
    sc: Sidecar, method: str, path: str, json: Any = None, **headers: str
) -> tuple[int, dict[str, Any]]:
    """Any admin request, whatever its status: (status, body)."""
    resp = await sc.client.request(method, f"/admin{path}", json=json, headers=sc.admin_headers(**headers))
    body: dict[str, Any] = await resp.json()
    return resp.status, body


async def test_admin_api_needs_the_token(sidecar: Sidecar) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {ADMIN_TOKEN}x"},
    ):
        resp = await sidecar.client.post("/admin/accounts", json={}, headers=headers)
        assert resp.status == 401, headers
        error = (await resp.json())["error"]
        assert (error["code"], error["type"]) == ("invalid_admin_token", "invalid_request_error")
    resp = await sidecar.client.post("/admin/accounts", json={}, headers=sidecar.admin_headers())
    assert resp.status == 201


async def test_admin_api_is_off_without_a_token(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(admin_token=None)
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}):
        resp = await sc.client.post("/admin/accounts", json={}, headers=headers)
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "forbidden"


async def test_an_empty_admin_token_does_not_open_the_admin_api(make_sidecar: SidecarFactory) -> None:
    # As an operator's template leaves it: `CREDITGATE_ADMIN_TOKEN=${ADMIN_TOKEN}` with ADMIN_TOKEN unset.
    refused: ConfigError | None = None
    try:
        settings = load_settings(environ={"CREDITGATE_ADMIN_TOKEN": ""})
    except ConfigError as exc:
        refused = exc
    if refused is not None:  # refusing the setting at startup is a fix too
        assert refused.param == "admin_token"
        return
    assert settings.admin_token == ""
    sc = await make_sidecar(admin_token=settings.admin_token)
    resp = await sc.client.post("/admin/accounts", json={"id": "mallory"})  # no Authorization at all
    assert resp.status in (401, 403)


async def test_create_account(sidecar: Sidecar) -> None:
    status, body = await admin_call(sidecar, "POST", "/accounts", {})
    assert status == 201
    assert re.fullmatch(r"acct_[0-9a-f]{16}", body["id"])
    named = f"acme-{uuid.uuid4().hex[:8]}"
    assert await admin_call(sidecar, "POST", "/accounts", {"id": named}) == (201, {"id": named})
    state = await sidecar.balance(named)
    assert (state["balance"], state["held"], state["available"], state["holds"]) == (0, 0, 0, [])
    status, body = await admin_call(sidecar, "POST", "/accounts", {"id": named})
    assert status == 409
    assert (body["error"]["code"], body["error"]["param"]) == ("conflict", "id")


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "ünïcode"])
async def test_create_account_with_a_bad_id(sidecar: Sidecar, bad: str) -> None:
    status, body = await admin_call(sidecar, "POST", "/accounts", {"id": bad})
    assert status == 400
    assert (body["error"]["type"], body["error"]["param"]) == ("invalid_request_error", "id")
    status, _ = await admin_call(sidecar, "GET", f"/accounts/{bad}")
    assert status == 404


async def redis_contents(redis: Redis, prefix: str) -> dict[str, list[str]]:
    """Every key under `prefix` with every name and value it holds, as text."""
    contents: dict[str, list[str]] = {}
    async for raw in redis.scan_iter(match=f"{prefix}*", count=10_000):
        name = as_text(raw)
        kind = as_text(await redis.type(name))
        values: list[Any]
        if kind == "string":
            values = [await redis.get(name)]
        elif kind == "hash":
            values = [item for pair in (await redis.hgetall(name)).items() for item in pair]
        elif kind == "set":
            values = list(await redis.smembers(name))
        elif kind == "zset":
            values = list(await redis.zrange(name, 0, -1))
        elif kind == "list":
            values = await redis.lrange(name, 0, -1)
        elif kind == "stream":
            entries = await redis.xrange(name) or []
            values = [v for _, entry in entries for pair in (entry or {}).items() for v in pair]
        else:
            raise AssertionError(f"{name} is a {kind}, which this test cannot read")
        contents[name] = [as_text(v) if isinstance(v, bytes | str) else str(v) for v in values]
    return contents


@pytest.mark.topologies  # keys over three slots; money in once
async def test_create_key_is_shown_once_and_stored_hashed(sidecar: Sidecar, redis_client: Redis) -> None:
    account, _ = await sidecar.account(1_000_000)
    status, created = await admin_call(sidecar, "POST", f"/accounts/{account}/keys")
    assert status == 201
    assert set(created) == {"id", "account", "key", "name", "prefix", "expires_at"}
    assert created["prefix"] == created["key"][:12]  # the display prefix: 8 characters past "cgk-"
    key = created["key"]
    assert key.startswith("cgk-")
    assert len(key) > 40
    assert created["account"] == account
    assert re.fullmatch(r"key_[0-9a-f]{16}", created["id"])
    # The key works ...
    resp = await sidecar.client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    # ... and nothing in Redis holds it, nor its secret part, in clear: only its SHA-256 is there.
    contents = await redis_contents(redis_client, sidecar.settings.key_prefix)
    texts = list(contents) + [value for values in contents.values() for value in values]
    assert any(hash_key(key) in text for text in texts)  # the scan does see the key's record
    assert account in contents[f"{sidecar.settings.key_prefix}api-key:{hash_key(key)}"]
    assert [text for text in texts if key in text or key.removeprefix("cgk-") in text] == []
    # A key for an account that does not exist is a 404.
    status, body = await admin_call(sidecar, "POST", "/accounts/nobody-here/keys")
    assert (status, body["error"]["code"]) == (404, "not_found")


async def grant(sc: Sidecar, account: str, body: Any, key: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    return await admin_call(sc, "POST", f"/accounts/{account}/grants", body, **headers)


async def test_grant_by_credits_or_amount(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    status, body = await grant(sidecar, account, {"credits": "12.5"}, "g1")
    assert status == 200
    assert body == {
        "account": account,
        "amount": 12_500_000,
        "kind": "grant",
        "credited": True,
        "balance": 12_500_000,
        "balance_credits": "12.5",
    }
    status, body = await grant(sidecar, account, {"amount": 7}, "g2")
    assert (status, body["amount"], body["balance"]) == (200, 7, 12_500_007)
    assert body["balance_credits"] == "12.500007"
    assert (await sidecar.balance(account))["balance"] == 12_500_007


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"amount": 5, "credits": "5"}, "amount"),
        ({}, "amount"),
        ({"credits": "0.0000001"}, "credits"),
        ({"credits": "twelve"}, "credits"),
        ({"credits": "NaN"}, "credits"),
        ({"credits": "-1"}, "amount"),
        ({"amount": 0}, "amount"),
        ({"amount": 10**15 + 1}, "amount"),
        ({"amount": 1.5}, None),
        ({"amount": 5, "colour": "red"}, None),
    ],
)
async def test_bad_grants_are_400_and_credit_nothing(
    sidecar: Sidecar, body: dict[str, Any], param: str | None
) -> None:
    account, _ = await sidecar.account(1_000)
    status, answer = await grant(sidecar, account, body, uuid.uuid4().hex)
    assert status == 400
    assert (answer["error"]["type"], answer["error"]["param"]) == ("invalid_request_error", param)
    assert (await sidecar.balance(account))["balance"] == 1_000


@pytest.mark.topologies  # keys over three slots; money in once
async def test_one_grant_sent_100_times_at_once_credits_once(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    answers = await asyncio.gather(
        *(grant(sidecar, account, {"amount": 4_000_000}, "once") for _ in range(100))
    )
    assert [status for status, _ in answers] == [200] * 100
    assert sorted(body["credited"] for _, body in answers) == [False] * 99 + [True]
    assert {body["balance"] for _, body in answers} == {4_000_000}
    assert (await sidecar.balance(account))["balance"] == 4_000_000


async def test_grant_idempotency_key_conflicts_and_absence(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(0)
    assert (await grant(sidecar, account, {"amount": 1_000}, "k"))[0] == 200
    status, body = await grant(sidecar, account, {"amount": 2_000}, "k")
    assert status == 409
    assert (body["error"]["code"], body["error"]["param"]) == ("conflict", "Idempotency-Key")
    # The same amount, given as credits, is the same grant.
    status, body = await grant(sidecar, account, {"credits": "0.001"}, "k")
    assert (status, body["credited"], body["balance"]) == (200, False, 1_000)
    status, body = await grant(sidecar, account, {"amount": 1_000}, None)
    assert status == 400
    assert body["error"]["param"] == "Idempotency-Key"
    status, body = await grant(sidecar, "nobody-here", {"amount": 1_000}, "k2")
    assert (status, body["error"]["code"]) == (404, "not_found")
    assert (await sidecar.balance(account))["balance"] == 1_000


async def test_balance_shows_active_holds(sidecar: Sidecar) -> None:
    account, _ = await sidecar.account(5_000_000)
    lease_end = int(time.time() * 1000) + 60_000
    await sidecar.balances.reserve(account, "req_held_one", 1_250_000, lease_end)
    await sidecar.balances.reserve(account, "req_held_two", 250_000, lease_end + 1)
    status, body = await admin_call(sidecar, "GET", f"/accounts/{account}")
    assert status == 200
    assert body == {
        "account": account,
        "balance": 5_000_000,
        "held": 1_500_000,
        "available": 3_500_000,
        "balance_credits": "5",
        "holds": [
            {"request_id": "req_held_one", "amount": 1_250_000, "lease_end_ms": lease_end},
            {"request_id": "req_held_two", "amount": 250_000, "lease_end_ms": lease_end + 1},
        ],
    }
    await sidecar.balances.settle(account, "req_held_one", 1_000_000)
    state = await sidecar.balance(account)
    assert (state["balance"], state["held"], [h["request_id"] for h in state["holds"]]) == (
        4_000_000,
        250_000,
        ["req_held_two"],
    )
    status, body = await admin_call(sidecar, "GET", "/accounts/nobody-here")
    assert (status, body["error"]["code"]) == (404, "not_found")


# ---- the CLI ------------------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        assert self.code == 0, self.stderr
        return json.loads(self.stdout)


async def creditgate(env: dict[str, str], *args: str, cwd: Path | None = None) -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
def cli_env(redis_url: str, database_url: str) -> dict[str, str]:
    return clean_env(
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=new_key_prefix(),
    )


@pytest.mark.topologies  # the CLI verbs on a cluster URL too
async def test_cli_account_key_grant_balance_revoke(
    cli_env: dict[str, str], make_sidecar: SidecarFactory, tmp_path: Path
) -> None:
    account = f"cli-{uuid.uuid4().hex[:8]}"
    assert (await creditgate(cli_env, "account", "create", account, cwd=tmp_path)).json() == {"id": account}
    again = await creditgate(cli_env, "account", "create", account, cwd=tmp_path)
    assert (again.code, again.stdout) == (1, "")
    assert json.loads(again.stderr)["error"]["code"] == "conflict"

    key = (await creditgate(cli_env, "key", "create", account, cwd=tmp_path)).json()
    assert set(key) == {"id", "account", "key", "name", "prefix", "expires_at"}
    assert key["account"] == account
    assert key["key"].startswith("cgk-")

    granted = {
        "account": account,
        "amount": 2_500_000,
        "kind": "grant",
        "balance": 2_500_000,
        "balance_credits": "2.5",
    }
    args = ("grant", account, "--credits", "2.5", "--idempotency-key", "k1")
    assert (await creditgate(cli_env, *args, cwd=tmp_path)).json() == {**granted, "credited": True}
    assert (await creditgate(cli_env, *args, cwd=tmp_path)).json() == {**granted, "credited": False}
    other = await creditgate(cli_env, "grant", account, "--amount", "7", "--idempotency-key", "k1")
    assert other.code == 1
    assert json.loads(other.stderr)["error"]["param"] == "Idempotency-Key"

    # A sidecar with the same settings sees what the CLI wrote: the key works and is charged.
    sc = await make_sidecar(key_prefix=cli_env["CREDITGATE_KEY_PREFIX"])
    headers = {"Authorization": f"Bearer {key['key']}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello world"}]}
    resp = await sc.client.post("/v1/chat/completions", json=chat, headers=headers)
    assert resp.status == 200
    charged = int(resp.headers["x-creditgate-charged"])
    assert 0 < charged == 2_500_000 - int(resp.headers["x-creditgate-balance"])

    balance = (await creditgate(cli_env, "account", "balance", account, cwd=tmp_path)).json()
    assert balance == {
        "account": account,
        "balance": 2_500_000 - charged,
        "held": 0,
        "available": 2_500_000 - charged,
        "balance_credits": str(Decimal(2_500_000 - charged) / 1_000_000),
        "holds": [],
    }
    revoked = (await creditgate(cli_env, "key", "revoke", key["id"], cwd=tmp_path)).json()
    assert revoked == {"id": key["id"], "account": account, "revoked": True}
    resp = await sc.client.post("/v1/chat/completions", json=chat, headers=headers)
    assert resp.status == 401
    # Revoking is idempotent (a retry after a crash between Postgres and Redis must finish the job).
    again_revoked = (await creditgate(cli_env, "key", "revoke", key["id"], cwd=tmp_path)).json()
    assert again_revoked == revoked
    gone = await creditgate(cli_env, "key", "revoke", "key_0000000000000000", cwd=tmp_path)
    assert (gone.code, json.loads(gone.stderr)["error"]["code"]) == (1, "not_found")
    nobody = await creditgate(cli_env, "account", "balance", "nobody-here", cwd=tmp_path)
    assert (nobody.code, json.loads(nobody.stderr)["error"]["code"]) == (1, "not_found")


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("CREDITGATE_PARTITIONS", "0", "partitions"),
        ("CREDITGATE_NOPE", "1", "CREDITGATE_NOPE"),
        ("CREDITGATE_POOLED_MULTIPLIER", "lots", "pooled_multiplier"),
    ],
)
async def test_cli_bad_setting_exits_2_naming_it(
    cli_env: dict[str, str], tmp_path: Path, variable: str, value: str, named: str
) -> None:
    # Without the bad setting this command reaches Redis and fails with 1 (no such account): see the
    # end of test_cli_account_key_grant_balance_revoke.
    run = await creditgate({**cli_env, variable: value}, "account", "balance", "nobody-here", cwd=tmp_path)
    assert run.code == 2
    assert run.stdout == ""
    assert run.stderr.startswith("creditgate: ")
    assert named in run.stderr


# ---- `creditgate demo` as a real process ------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def read_until(stream: asyncio.StreamReader, marker: str, seen: list[str]) -> None:
    """Read lines into `seen` until one contains `marker`; each line within a bounded wait."""
    while not any(marker in line for line in seen):
        async with asyncio.timeout(60):
            line = await stream.readline()
        if not line:
            raise AssertionError(f"stdout ended before {marker!r}: {''.join(seen)}")
        seen.append(line.decode())


def running_redis_sockets(log: Path) -> list[str]:
    """The sockets of the embedded Redis servers a demo's log says it started, if still there."""
    started = re.findall(r"embedded Redis at unix://(\S+)", log.read_text())
    return [path for path in started if Path(path).exists()]


async def stop_demo(proc: asyncio.subprocess.Process, log: Path) -> None:
    """After a failure: stop the demo gently, then not; never leave its embedded Redis running."""
    if proc.returncode is None:
        proc.terminate()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
    for path in running_redis_sockets(log):
        client = Redis(unix_socket_path=path, socket_timeout=5)
        with contextlib.suppress(RedisError, OSError):
            await client.shutdown(nosave=True)
        await client.aclose()


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
async def test_demo_runs_as_a_process(tmp_path: Path, stop: signal.Signals) -> None:
    port = free_port()
    errors = (tmp_path / "stderr.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "demo",
        cwd=tmp_path,
        env=clean_env(CREDITGATE_PORT=str(port)),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=errors,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        try:
            await read_until(proc.stdout, "Press Ctrl-C to stop", lines)
        except (TimeoutError, AssertionError) as exc:
            raise AssertionError(f"{exc!r}\n{(tmp_path / 'stderr.log').read_text()}") from None
        printed = "".join(lines)
        base = re.search(r"base URL : (\S+)", printed)
        api_key = re.search(r"API key  : (cgk-\S+)", printed)
        curl = re.search(r"curl -si (\S+)", printed)
        payload = re.search(r"-d '(.+)'", printed)
        assert base, printed
        assert api_key, printed
        assert curl, printed
        assert payload, printed
        assert base.group(1) == f"http://127.0.0.1:{port}/v1"
        assert curl.group(1) == f"{base.group(1)}/chat/completions"
        headers = {
            name.strip(): value.strip()
            for name, _, value in (h.partition(":") for h in re.findall(r"-H '([^']+)'", printed))
        }
        assert headers["Authorization"] == f"Bearer {api_key.group(1)}"
        redis_log = tmp_path / ".creditgate" / "redis.log"  # its own embedded Redis, under the cwd
        assert "ready to accept connections" in redis_log.read_text()

        async with (
            aiohttp.ClientSession() as session,
            session.post(curl.group(1), data=payload.group(1), headers=headers) as resp,
        ):
            body = await resp.json()
            assert resp.status == 200, body
            charged = int(resp.headers["x-creditgate-charged"])
            assert charged > 0
            assert int(resp.headers["x-creditgate-balance"]) == 10_000_000 - charged
            assert body["choices"][0]["message"]["content"].startswith("tok0 ")

        proc.send_signal(stop)
        async with asyncio.timeout(30):
            code = await proc.wait()
        assert code == 0, (tmp_path / "stderr.log").read_text()
        assert "Redis is now ready to exit" in redis_log.read_text()  # and stopped it on the way out
    finally:
        errors.close()
        await stop_demo(proc, tmp_path / "stderr.log")
