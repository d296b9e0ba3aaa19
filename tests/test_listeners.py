"""Listeners: the API on its own (loopback in sidecar mode), /healthz, /readyz and /metrics on the ops
port, the admin API off in sidecar mode, and the account header's secret."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import create_app, create_ops_app, services
from sidecar.config import ACCOUNT_SECRET_HEADER, is_loopback, load_settings
from sidecar.errors import ConfigError
from sidecar.logs import REDACTED, formatter, secrets_of

from .conftest import (
    ADMIN_TOKEN,
    Served,
    Sidecar,
    SidecarFactory,
    Upstream,
    clean_env,
    make_settings,
    new_key_prefix,
    process_env,
    serve_process,
)
from .support import HELLO, MODELS, creditgate, record, start_stream

SECRET = "account-header-secret-for-tests"
CHAT = msgspec.json.encode({"model": "test-model", "messages": HELLO})
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# test-model for the requests below, gpt-4o-mini for test_shutdown's streams
PRICES = {**MODELS, "gpt-4o-mini": {"prompt": "0.00015", "completion": "0.0006"}}


def chat_requests(metrics_text: str) -> float:
    """creditgate_requests_total of route chat, status 2xx, whatever the cache label."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "creditgate_requests_total"
        and (sample.labels["route"], sample.labels["status_class"]) == ("chat", "2xx")
    )


# ---- settings --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),  # aiohttp binds every address
        ("10.1.2.3", False),
        ("localhost.example.com", False),
        ("my-pod", False),
    ],
)
def test_loopback_addresses(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("env", "ops_port", "admin"),
    [
        ({}, None, True),  # standalone: health and metrics on the API listener, admin API on
        ({"CREDITGATE_MODE": "sidecar"}, 9090, False),
        ({"CREDITGATE_MODE": "sidecar", "CREDITGATE_OPS_PORT": "9100"}, 9100, False),
        ({"CREDITGATE_MODE": "sidecar", "CREDITGATE_ADMIN_ENABLED": "true"}, 9090, True),
        ({"CREDITGATE_OPS_PORT": "0"}, 0, True),
        ({"CREDITGATE_ADMIN_ENABLED": "false"}, None, False),
    ],
)
def test_ops_port_and_admin_api_by_mode(env: dict[str, str], ops_port: int | None, admin: bool) -> None:
    settings = load_settings(environ=env)
    assert (settings.ops_listen_port, settings.admin_api) == (ops_port, admin)
    assert settings.ops_host == "0.0.0.0"


@pytest.mark.parametrize(
    ("env", "param", "named"),
    [
        (
            {"CREDITGATE_ACCOUNT_HEADER": "x-account-id", "CREDITGATE_HOST": "0.0.0.0"},
            "account_header",
            ["account_header", "account_header_secret", "host", "0.0.0.0"],
        ),
        (
            {"CREDITGATE_ACCOUNT_HEADER": "x-account-id", "CREDITGATE_HOST": "10.0.0.7"},
            "account_header",
            ["account_header", "account_header_secret", "host", "10.0.0.7"],
        ),
        ({"CREDITGATE_ACCOUNT_HEADER_SECRET": "short"}, "account_header_secret", ["16"]),
        ({"CREDITGATE_OPS_PORT": "8080"}, "ops_port", ["ops_port", "port", "8080"]),
        ({"CREDITGATE_OPS_PORT": "65536"}, "ops_port", ["ops_port"]),
    ],
)
def test_refused_listener_settings(env: dict[str, str], param: str, named: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ=env)
    assert caught.value.param == param
    for word in named:
        assert word in caught.value.message


def test_account_header_is_accepted_on_loopback_or_with_its_secret() -> None:
    for host in ("127.0.0.1", "::1", "localhost"):
        env = {"CREDITGATE_ACCOUNT_HEADER": "x-account-id", "CREDITGATE_HOST": host}
        assert load_settings(environ=env).account_header == "x-account-id"
    env = {
        "CREDITGATE_ACCOUNT_HEADER": "x-account-id",
        "CREDITGATE_HOST": "0.0.0.0",
        "CREDITGATE_ACCOUNT_HEADER_SECRET": SECRET,
    }
    assert load_settings(environ=env).account_header_secret == SECRET
    # --host / --port are checked with the rest: the host in effect decides
    env = {"CREDITGATE_ACCOUNT_HEADER": "x-account-id", "CREDITGATE_HOST": "0.0.0.0"}
    assert load_settings(environ=env, overrides={"host": "127.0.0.1"}).host == "127.0.0.1"
    with pytest.raises(ConfigError):
        load_settings(environ={"CREDITGATE_ACCOUNT_HEADER": "x-account-id"}, overrides={"host": "0.0.0.0"})


def test_the_account_header_secret_is_redacted_from_logs() -> None:
    settings = make_settings("redis://127.0.0.1:6379/0", "postgresql://h/db", account_header_secret=SECRET)
    assert SECRET in secrets_of(settings)
    line = formatter(settings).format(
        record("settings in effect: %s", msgspec.json.encode(settings).decode())
    )
    assert SECRET not in line
    assert REDACTED in line


# ---- exit 2 from the real command ------------------------------------------------------------------


def test_serve_refuses_a_reachable_account_header_without_its_secret(tmp_path: Path) -> None:
    base = clean_env(
        CREDITGATE_UPSTREAM_URL="http://127.0.0.1:9/v1",
        CREDITGATE_REDIS_URL="redis://127.0.0.1:1/0",  # never reached: refused before anything starts
        CREDITGATE_DATABASE_URL="postgresql://postgres@127.0.0.1:1/none",
        CREDITGATE_ACCOUNT_HEADER="x-account-id",
    )
    for env, args in (
        ({**base, "CREDITGATE_HOST": "0.0.0.0"}, ()),
        ({**base, "CREDITGATE_MODE": "sidecar", "CREDITGATE_HOST": "0.0.0.0"}, ()),
        ({**base, "CREDITGATE_HOST": "127.0.0.1"}, ("--host", "0.0.0.0")),  # the flag is the host in effect
    ):
        run = creditgate(env, "serve", *args, cwd=tmp_path)
        assert run.returncode == 2, run.stderr
        assert run.stdout == ""
        lines = run.stderr.splitlines()
        assert len(lines) == 1, run.stderr
        assert lines[0].startswith("creditgate: account_header is set")
        for name in ("account_header", "account_header_secret", "host", "'0.0.0.0'"):
            assert name in lines[0]


def test_a_busy_ops_port_is_one_line_naming_the_ops_settings(
    redis_url: str, database_url: str, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = clean_env(
            CREDITGATE_UPSTREAM_URL="http://127.0.0.1:9/v1",
            CREDITGATE_REDIS_URL=redis_url,
            CREDITGATE_DATABASE_URL=database_url,
            CREDITGATE_KEY_PREFIX=new_key_prefix(),
            CREDITGATE_MODE="sidecar",
            CREDITGATE_PORT="0",
            CREDITGATE_OPS_HOST="127.0.0.1",
            CREDITGATE_OPS_PORT=str(port),
            CREDITGATE_LOG_LEVEL="ERROR",
        )
        run = creditgate(env, "serve", cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith(f"creditgate: cannot listen on 127.0.0.1:{port}")
    assert "ops_host / ops_port" in lines[0]


# ---- the listeners of a real process ---------------------------------------------------------------


def sidecar_env(
    redis_url: str, database_url: str, prefix: str, upstream: Upstream, **more: str
) -> dict[str, str]:
    return process_env(
        redis_url,
        database_url,
        prefix,
        upstream.url,
        CREDITGATE_MODE="sidecar",
        CREDITGATE_OPS_PORT="0",
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITGATE_MODELS=msgspec.json.encode(PRICES).decode(),
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
        CREDITGATE_FORWARD_REQUEST_HEADERS="x-demo-*",
        **more,
    )


async def funded_account(redis_url: str, database_url: str, prefix: str, micro: int) -> tuple[str, str]:
    """An account holding `micro` and a key for it, made with the operator actions the CLI uses (the admin
    API is off in sidecar mode)."""
    settings = make_settings(redis_url, database_url, key_prefix=prefix)
    account = f"ls-{uuid.uuid4().hex[:8]}"
    async with services(settings) as svc:
        await svc.admin.create_account(account)
        await svc.admin.grant(account, micro, "fund", note="test")
        key = await svc.admin.create_key(account)
    return account, key["key"]


async def ops_url_of(served: Served) -> str:
    found = await served.wait_for(r"creditgate ops listening on http://([0-9.]+):([0-9]+)")
    assert found.group(1) == "0.0.0.0"  # the ops listener takes every address by default
    return f"http://127.0.0.1:{found.group(2)}"


async def status(session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any) -> int:
    async with session.request(method, url, **kwargs) as resp:
        await resp.read()
        return resp.status


async def test_sidecar_mode_serves_the_api_on_loopback_and_health_on_the_ops_port(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    prefix = new_key_prefix()
    account, key = await funded_account(redis_url, database_url, prefix, 10_000_000)
    env = sidecar_env(redis_url, database_url, prefix, upstream, CREDITGATE_ACCOUNT_HEADER="x-account-id")
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        ops = await ops_url_of(served)
        assert url.startswith("http://127.0.0.1:")  # account_header on loopback: allowed, no secret needed
        auth = {"Authorization": f"Bearer {key}"}
        # the ops listener: health and metrics, never the API or the admin API
        assert await status(session, "GET", f"{ops}/healthz") == 200
        async with session.get(f"{ops}/readyz") as resp:
            assert (resp.status, (await resp.json())["status"]) == (200, "ready")
        async with session.post(f"{ops}/v1/chat/completions", data=CHAT, headers=auth) as resp:
            assert resp.status == 404
            assert set((await resp.json())["error"]) == {"message", "type", "param", "code"}
        assert await status(session, "GET", f"{ops}/v1/models", headers=auth) == 404
        assert await status(session, "POST", f"{ops}/admin/accounts", json={}, headers=ADMIN) == 404
        assert await status(session, "GET", f"{ops}/admin/ledger", headers=ADMIN) == 404
        # the API listener: the API only; the admin API is off in sidecar mode (though admin_token is set)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert await status(session, "GET", f"{url}{path}") == 404
        assert await status(session, "POST", f"{url}/admin/accounts", json={}, headers=ADMIN) == 404
        assert await status(session, "GET", f"{url}/admin/accounts/{account}", headers=ADMIN) == 404
        assert await status(session, "POST", f"{url}/v1/chat/completions", data=CHAT, headers=auth) == 200
        named = {"x-account-id": account}
        assert await status(session, "POST", f"{url}/v1/chat/completions", data=CHAT, headers=named) == 200
        async with session.get(f"{ops}/metrics") as resp:
            assert resp.status == 200
            metrics = await resp.text()
        assert chat_requests(metrics) == 2  # the ops listener reports the API listener's requests
        assert await served.stop() == 0, served.log
    assert "x-account-id" not in {name.lower() for name in upstream.seen_headers[-1]}


async def test_admin_enabled_puts_the_admin_api_on_the_api_listener_only(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    env = sidecar_env(redis_url, database_url, new_key_prefix(), upstream, CREDITGATE_ADMIN_ENABLED="true")
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        ops = await ops_url_of(served)
        assert await status(session, "POST", f"{url}/admin/accounts", json={}, headers=ADMIN) == 201
        assert await status(session, "POST", f"{url}/admin/accounts", json={}, headers={}) == 401
        assert await status(session, "POST", f"{ops}/admin/accounts", json={}, headers=ADMIN) == 404
        assert await served.stop() == 0, served.log


async def test_standalone_on_all_addresses_takes_the_account_header_with_its_secret(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    prefix = new_key_prefix()
    account, _ = await funded_account(redis_url, database_url, prefix, 10_000_000)
    env = sidecar_env(
        redis_url,
        database_url,
        prefix,
        upstream,
        CREDITGATE_ACCOUNT_HEADER="x-account-id",
        CREDITGATE_ACCOUNT_HEADER_SECRET=SECRET,
        CREDITGATE_HOST="0.0.0.0",
        CREDITGATE_LOG_LEVEL="DEBUG",  # the settings line: the secret must not be in it
    )
    env["CREDITGATE_MODE"] = "standalone"
    del env["CREDITGATE_OPS_PORT"]  # standalone: health on the API listener
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        local = url.replace("0.0.0.0", "127.0.0.1")
        named = {"x-account-id": account}
        chat = f"{local}/v1/chat/completions"
        assert await status(session, "POST", chat, data=CHAT, headers=named) == 401
        assert (
            await status(session, "POST", chat, data=CHAT, headers={**named, ACCOUNT_SECRET_HEADER: "x"})
            == 401
        )
        assert (
            await status(session, "POST", chat, data=CHAT, headers={**named, ACCOUNT_SECRET_HEADER: SECRET})
            == 200
        )
        assert await status(session, "GET", f"{local}/healthz") == 200
        assert await served.stop() == 0, served.log
    assert "settings in effect" in served.log
    assert SECRET not in served.log
    assert upstream.calls() == 1
    assert ACCOUNT_SECRET_HEADER not in {name.lower() for name in upstream.seen_headers[-1]}
    assert SECRET not in str(upstream.seen_headers)


async def test_the_ops_port_says_not_ready_while_the_api_drains(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    prefix = new_key_prefix()
    _, key = await funded_account(redis_url, database_url, prefix, 5_000_000)
    env = sidecar_env(redis_url, database_url, prefix, upstream, CREDITGATE_SHUTDOWN_GRACE_SECONDS="60")
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        ops = await ops_url_of(served)
        assert await status(session, "GET", f"{ops}/readyz") == 200
        resp, _, first = await start_stream(session, url, key, tokens=30, delay_ms=100)
        served.proc.terminate()
        await served.wait_for(r"waiting up to 60.0 s for 1 requests in flight")
        async with session.get(f"{ops}/readyz") as ready:
            assert (ready.status, await ready.json()) == (
                503,
                {"status": "not ready", "reason": "shutting down"},
            )
        assert await status(session, "GET", f"{ops}/healthz") == 200  # alive: no restart meanwhile
        assert await status(session, "GET", f"{ops}/metrics") == 200
        with pytest.raises(aiohttp.ClientConnectionError):  # the API listener takes no new connection
            await session.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        rest = await resp.content.read()
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert await served.stop() == 0, served.log
    with pytest.raises(aiohttp.ClientConnectionError):  # and the ops listener is gone with the process
        async with aiohttp.ClientSession() as session:
            await session.get(f"{ops}/healthz")


# ---- in process: the ops app, the account secret --------------------------------------------------


async def test_the_ops_app_is_not_ready_before_the_api_app_has_started(
    redis_url: str, database_url: str, aiohttp_client: Any
) -> None:
    settings = make_settings(redis_url, database_url, mode="sidecar")
    api = create_app(settings)  # not started: the ops listener is up first
    ops: TestClient[web.Request, web.Application] = await aiohttp_client(create_ops_app(api))
    resp = await ops.get("/readyz")
    assert (resp.status, await resp.json()) == (503, {"status": "not ready", "reason": "starting"})
    assert (await ops.get("/healthz")).status == 200


async def test_an_ops_port_in_standalone_mode_moves_health_and_metrics_off_the_api(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(models=MODELS, ops_port=0)
    assert sc.ops is not None
    _, key = await sc.account(10_000_000)  # the admin API stays on the API listener
    resp = await sc.client.post("/v1/chat/completions", data=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 200
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await sc.client.get(path)).status == 404
        assert (await sc.ops.get(path)).status == 200
    assert (await sc.ops.get("/admin/ledger", headers=ADMIN)).status == 404
    assert chat_requests(await (await sc.ops.get("/metrics")).text()) == 1


@pytest.fixture
async def with_secret(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS, account_header="x-account-id", account_header_secret=SECRET)


async def test_the_account_header_needs_its_secret(with_secret: Sidecar, upstream: Upstream) -> None:
    sc = with_secret
    account, key = await sc.account(10_000_000)
    named = {"x-account-id": account}
    for headers in (
        named,
        {**named, ACCOUNT_SECRET_HEADER: "wrong-secret"},
        {**named, ACCOUNT_SECRET_HEADER: ""},
    ):
        resp = await sc.client.post("/v1/chat/completions", data=CHAT, headers=headers)
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_account_secret"
        assert ACCOUNT_SECRET_HEADER in error["message"]
        assert "x-account-id" in error["message"]
        assert SECRET not in error["message"]
    # checked before the account is looked up: no one without the secret learns which accounts exist
    resp = await sc.client.post("/v1/chat/completions", data=CHAT, headers={"x-account-id": "nobody-here"})
    assert (await resp.json())["error"]["code"] == "invalid_account_secret"
    resp = await sc.client.get("/v1/models", headers=named)
    assert resp.status == 401
    assert upstream.calls() == 0
    assert (await sc.balance(account))["balance"] == 10_000_000  # refused requests changed nothing
    # the right secret
    resp = await sc.client.post(
        "/v1/chat/completions", data=CHAT, headers={**named, ACCOUNT_SECRET_HEADER: SECRET}
    )
    assert resp.status == 200
    assert resp.headers["x-creditgate-charged"] != "0"
    # a request with only its bearer key is unaffected (a stray secret header is not passed on either)
    bearer = {"Authorization": f"Bearer {key}"}
    assert (await sc.client.post("/v1/chat/completions", data=CHAT, headers=bearer)).status == 200
    spare = {**bearer, ACCOUNT_SECRET_HEADER: SECRET}
    assert (await sc.client.post("/v1/chat/completions", data=CHAT, headers=spare)).status == 200
    assert upstream.calls() == 3
    for seen in upstream.seen_headers:
        lowered = {name.lower(): value for name, value in seen.items()}
        assert ACCOUNT_SECRET_HEADER not in lowered
        assert "x-account-id" not in lowered
        assert SECRET not in lowered.values()
