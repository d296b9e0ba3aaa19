"""What a new user hits first: the CLI (as a real process) and the models list (the price table)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from sidecar import __version__
from sidecar.afford import affordable_output_tokens, with_output_limit
from sidecar.money import format_credits
from sidecar.pricing import Multiplier, Price, worst_case

from .conftest import (
    Sidecar,
    SidecarFactory,
    Upstream,
    clean_env,
    new_key_prefix,
    serve_process,
)
from .support import creditgate

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


# ---- the 402 says what was required and what the balance affords --------------------------------


def price(prompt: int, completion: int, fee: int = 0, scale: int = 1, cap: int = 1000) -> Price:
    return Price("m", "default", cap, scale, prompt, completion, None, fee)


@pytest.mark.parametrize(
    ("available", "p", "prompt_tokens", "n", "mult", "expected"),
    [
        (10_000, price(10, 100), 10, 1, Multiplier(1, 1), 99),  # 100 + 99 × 100 = 10,000
        (9_999, price(10, 100), 10, 1, Multiplier(1, 1), 98),
        (100, price(10, 100), 10, 1, Multiplier(1, 1), 0),  # the prompt alone takes it all
        (99, price(10, 100), 10, 1, Multiplier(1, 1), 0),  # not even the prompt
        (0, price(10, 100), 10, 1, Multiplier(1, 1), 0),
        (-5, price(10, 100), 10, 1, Multiplier(1, 1), 0),
        (10_000, price(10, 100), 10, 3, Multiplier(1, 1), 33),  # n multiplies the output
        (12_500, price(10, 100), 10, 1, Multiplier(5, 4), 99),  # ceil(10,000 × 1.25)
        (12_499, price(10, 100), 10, 1, Multiplier(5, 4), 98),
        (10_000, price(10, 100, fee=1_000), 10, 1, Multiplier(1, 1), 89),
        (10**9, price(10, 100), 10, 1, Multiplier(1, 1), 1000),  # capped at the model's maximum
        (500, price(10, 0), 10, 1, Multiplier(1, 1), 1000),  # free output: the cap
        (1, price(1, 3, scale=7), 1, 1, Multiplier(1, 1), 2),  # 1/7 + 3k/7 ≤ 1
        (2**53 - 1, price(7, 11), 3, 1, Multiplier(5, 4), 1000),
    ],
)
def test_affordable_output_tokens(
    available: int, p: Price, prompt_tokens: int, n: int, mult: Multiplier, expected: int
) -> None:
    k = affordable_output_tokens(available, p, prompt_tokens, n, mult, p.max_output_tokens)
    assert k == expected
    if k:  # the hold for k fits, and (below the cap) the hold for k + 1 does not
        assert worst_case(p, prompt_tokens, n * k, mult) <= available
    if k < p.max_output_tokens:
        assert worst_case(p, prompt_tokens, n * (k + 1), mult) > available


async def test_402_says_required_available_and_the_output_tokens_it_affords(
    priced: Sidecar, upstream: Upstream
) -> None:
    body = msgspec.json.encode(
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    )
    size = len(body)  # a token per byte, at 1,000 micro-credits a token, × 1.25 (pooled)
    balance = 1250 * (size + 100) + 7
    account, key = await priced.account(balance)
    resp = await priced.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {key}"}
    )
    assert resp.status == 402
    assert resp.headers["x-should-retry"] == "false"
    error = (await resp.json())["error"]
    required = 1250 * (size + 1000)
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_credits")
    assert error["balance"] == error["available"] == balance
    assert error["balance_credits"] == format_credits(balance)
    assert error["required"] == required
    assert error["output_limit"] == 1000
    assert error["affordable_output_tokens"] == 100
    assert format_credits(required) in error["message"]
    assert "100 output tokens" in error["message"]
    assert "max_tokens" in error["message"]
    assert upstream.calls() == 0
    assert (await priced.balance(account))["held"] == 0


@pytest.mark.parametrize(
    ("body", "kind", "expected"),
    [
        (b'{"model":"m","max_tokens":900}', "chat", b'{"model":"m","max_tokens":7}'),
        (b'{"model":"m","max_completion_tokens":900}', "chat", b'{"model":"m","max_completion_tokens":7}'),
        (
            b'{"model":"m","max_tokens":5,"max_completion_tokens":900}',
            "chat",
            b'{"model":"m","max_tokens":7,"max_completion_tokens":7}',
        ),
        (b'{"model":"m"}', "chat", b'{"model":"m","max_tokens":7}'),
        (b'{"model":"m","max_tokens":null}', "chat", b'{"model":"m","max_tokens":7}'),
        (b'{"model":"m"}', "completions", b'{"model":"m","max_tokens":7}'),
        (b'{"model":"m"}', "responses", b'{"model":"m","max_output_tokens":7}'),
        (b'{"model":"m","max_output_tokens":99}', "responses", b'{"model":"m","max_output_tokens":7}'),
    ],
)
def test_with_output_limit(body: bytes, kind: str, expected: bytes) -> None:
    assert with_output_limit(body, kind, 7) == expected


async def test_what_the_402_says_fits_counts_every_prompt_and_best_of(
    priced: Sidecar, upstream: Upstream
) -> None:
    """The affordable output limit is figured like the hold: every prompt × max(n, best_of) completions,
    so lowering to it can never hold less than the charge."""
    body = msgspec.json.encode(
        {"model": "test-model", "prompt": ["a", "b"], "best_of": 3, "n": 1, "max_tokens": 1000}
    )
    size = len(body)
    balance = 1250 * (size + 6 * 100) + 7  # 2 prompts × 3 completions × 100 tokens fit
    _, key = await priced.account(balance)
    resp = await priced.client.post("/v1/completions", data=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status == 402
    error = (await resp.json())["error"]
    assert error["required"] == 1250 * (size + 6 * 1000)
    assert (error["output_limit"], error["affordable_output_tokens"]) == (1000, 100)
    assert upstream.calls() == 0


def chat_body(**fields: Any) -> bytes:
    return msgspec.json.encode(
        {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


async def test_fit_output_header_lowers_the_limit_to_what_the_balance_affords(
    priced: Sidecar, upstream: Upstream
) -> None:
    body = chat_body(max_tokens=1000)
    balance = 1250 * (len(body) + 100) + 7  # affords 100 output tokens (see the 402 test)
    account, key = await priced.account(balance)
    headers = {"Authorization": f"Bearer {key}", "x-demo-tokens": "5000", "x-creditgate-fit-output": "1"}
    resp = await priced.client.post("/v1/chat/completions", data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    answer = await resp.json()
    assert answer["usage"]["completion_tokens"] == 100
    charged = int(resp.headers["x-creditgate-charged"])
    assert 0 < charged <= balance
    assert int(resp.headers["x-creditgate-balance"]) == balance - charged >= 0
    assert "x-creditgate-fit-output" not in {name.lower() for name in upstream.seen_headers[-1]}
    assert (await priced.balance(account))["held"] == 0


async def test_afford_output_limit_setting_adds_a_limit_and_keeps_the_minimum(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS, afford_output_limit=True, afford_min_output_tokens=50)
    body = chat_body()  # no limit: held for the model's 4096
    _, key = await sc.account(1250 * (len(body) + 60))
    headers = {"Authorization": f"Bearer {key}", "x-demo-tokens": "5000"}
    resp = await sc.client.post("/v1/chat/completions", data=body, headers=headers)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["usage"]["completion_tokens"] == 60
    # Fewer than the minimum fit: the 402, saying what does.
    _, poor = await sc.account(1250 * (len(body) + 49))
    resp = await sc.client.post(
        "/v1/chat/completions", data=body, headers={"Authorization": f"Bearer {poor}"}
    )
    assert resp.status == 402
    error = (await resp.json())["error"]
    assert (error["output_limit"], error["affordable_output_tokens"]) == (4096, 49)
    assert upstream.calls() == 1
