"""What a new user hits first: the CLI (as a real process) and the models list (the price table)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar import __version__

from .conftest import (
    Sidecar,
    SidecarFactory,
    Upstream,
    clean_env,
    new_key_prefix,
    serve_process,
)

MODELS: dict[str, Any] = {
    "test-model": {"prompt": "1", "completion": "1", "aliases": ["test-alias"]},
    "test-embed": {"prompt": "1"},
}


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


def model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "default"}


async def test_models_lists_the_priced_models_and_aliases_without_calling_upstream(
    priced: Sidecar, upstream: Upstream
) -> None:
    account, key = await priced.account(0)
    auth = {"Authorization": f"Bearer {key}"}
    resp = await priced.client.get("/v1/models", headers=auth)
    assert resp.status == 200
    assert await resp.json() == {
        "object": "list",
        "data": [model("test-model"), model("test-embed"), model("test-alias")],
    }
    for name in ("test-model", "test-alias"):
        resp = await priced.client.get(f"/v1/models/{name}", headers=auth)
        assert (resp.status, await resp.json()) == (200, model(name))
    resp = await priced.client.get("/v1/models/gpt-9", headers=auth)
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert (error["code"], error["type"]) == ("model_not_found", "invalid_request_error")
    assert (await priced.client.get("/v1/models")).status == 401
    assert (await priced.client.get("/v1/models/test-model")).status == 401
    assert upstream.calls() == 0
    assert upstream.seen_headers == []
    assert (await priced.balance(account))["balance"] == 0


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/a/b",
        "/v1/models/test-model/extra",
        "/v1/models/..%2Ffiles",
        "/v1/models/%2e%2e/files",
        "/v1/models/..%2F..%2Fadmin",
        "/v1/models/../files",
        "/v1/models/.",
        "/v1/models/..",
    ],
)
async def test_models_paths_other_than_one_priced_id_are_404_and_reach_nothing(
    priced: Sidecar, upstream: Upstream, path: str
) -> None:
    _, key = await priced.account(0)
    resp = await priced.client.get(path, headers={"Authorization": f"Bearer {key}"}, allow_redirects=False)
    assert resp.status == 404, await resp.text()
    assert "error" in await resp.json()
    assert upstream.calls() == 0
    assert upstream.seen_headers == []


# ---- the CLI, as a real process ------------------------------------------------------------------


def creditgate(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def services_env(redis_url: str, database_url: str) -> dict[str, str]:
    return clean_env(
        CREDITGATE_REDIS_URL=redis_url,
        CREDITGATE_DATABASE_URL=database_url,
        CREDITGATE_KEY_PREFIX=new_key_prefix(),
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
    )


def test_version_and_plain_help(tmp_path: Path) -> None:
    run = creditgate(clean_env(), "--version", cwd=tmp_path)
    assert (run.returncode, run.stdout) == (0, f"creditgate {__version__}\n")
    run = creditgate(clean_env(), "--help", cwd=tmp_path)
    assert run.returncode == 0
    assert "``" not in run.stdout
    assert "`" not in run.stdout.split("positional arguments")[0]
    serve = creditgate(clean_env(), "serve", "--help", cwd=tmp_path)
    assert "--host" in serve.stdout
    assert "--port" in serve.stdout


def test_config_is_taken_after_the_subcommand(services_env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("partitions: 0\n")
    before = creditgate(services_env, "--config", str(config), "account", "balance", "x", cwd=tmp_path)
    assert before.returncode == 2, before.stderr
    assert "partitions" in before.stderr
    run = creditgate(services_env, "account", "balance", "x", "--config", str(config), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("creditgate: "), run.stderr
    assert "partitions" in run.stderr


def test_serve_without_an_upstream_exits_2_naming_the_settings(
    services_env: dict[str, str], tmp_path: Path
) -> None:
    run = creditgate(services_env, "serve", "--port", "0", cwd=tmp_path)
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.startswith("creditgate: ")
    assert "upstream_url" in run.stderr
    assert "upstreams" in run.stderr
    assert len(run.stderr.splitlines()) == 1


def test_a_busy_port_is_one_line_naming_it_and_exit_2(
    services_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    env = {**services_env, "CREDITGATE_UPSTREAM_URL": upstream.url, "CREDITGATE_LOG_LEVEL": "ERROR"}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = creditgate(env, "serve", "--host", "127.0.0.1", "--port", str(port), cwd=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("creditgate: cannot listen")
    assert str(port) in lines[0]


async def test_serve_listens_on_the_host_and_port_given(
    services_env: dict[str, str], upstream: Upstream, tmp_path: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**services_env, "CREDITGATE_UPSTREAM_URL": upstream.url, "CREDITGATE_PORT": "1"}
    async with (
        serve_process(env, tmp_path, "--host", "127.0.0.1", "--port", str(port)) as (served, url),
        aiohttp.ClientSession() as session,
    ):
        assert url == f"http://127.0.0.1:{port}"
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
        assert await served.stop() == 0, served.log
