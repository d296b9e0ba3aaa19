"""The hold bounds the charge: what a request can cost is held before the model is called.

Real sidecar, real Redis and Postgres, real HTTP: the demo upstream, or a small completions upstream of
this file's own that bills every completion a request asks for, as a provider does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.config import load_settings
from sidecar.errors import BadRequest, ConfigError
from sidecar.money import MAX_CHARGE
from sidecar.pricing import PriceTable, estimate_prompt_tokens, unseen_prompt_tokens, worst_case

from .conftest import SidecarFactory

MODEL = "gpt-3.5-turbo-instruct"  # completion 0.002 credits per 1K tokens, pooled ×1.25


def _prompts(prompt: Any) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        return len(prompt)
    return 1


@pytest.fixture
async def billing_upstream() -> AsyncIterator[str]:
    """/v1/completions that generates max_tokens for each of best_of (or n) completions per prompt and
    reports all of them in its usage, as a provider bills them."""

    async def completions(request: web.Request) -> web.Response:
        body = msgspec.json.decode(await request.read())
        prompts = _prompts(body.get("prompt"))
        choices = max(body.get("n") or 1, body.get("best_of") or 1)
        completion = prompts * choices * body["max_tokens"]
        usage = {
            "prompt_tokens": prompts,
            "completion_tokens": completion,
            "total_tokens": prompts + completion,
        }
        return web.json_response(
            {
                "id": "cmpl-1",
                "object": "text_completion",
                "model": body["model"],
                "choices": [{"index": i, "text": "x", "finish_reason": "length"} for i in range(prompts)],
                "usage": usage,
            }
        )

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("/v1"))
    await server.close()


BIG = {"model": MODEL, "prompt": ["a"] * 500, "max_tokens": 4096, "best_of": 4}


async def test_prompts_times_best_of_is_held(make_sidecar: SidecarFactory, billing_upstream: str) -> None:
    sidecar = await make_sidecar(upstream_url=billing_upstream, cache_enabled=False)
    account, key = await sidecar.account(1_000_000)  # 1 credit; the request costs about 20.5
    resp = await sidecar.client.post("/v1/completions", json=BIG, headers={"Authorization": f"Bearer {key}"})
    error = (await resp.json())["error"]
    assert resp.status == 402, error
    # 500 prompts × 4 × 4096 tokens at 0.002 credits per 1K × 1.25, plus the prompt bytes.
    assert error["required"] >= 500 * 4 * 4096 * 2000 * 5 // 4 // 1000
    assert (await sidecar.balance(account))["balance"] == 1_000_000


async def test_concurrent_requests_cannot_overdraw(
    make_sidecar: SidecarFactory, billing_upstream: str
) -> None:
    sidecar = await make_sidecar(upstream_url=billing_upstream, cache_enabled=False)
    account, key = await sidecar.account(100_000_000)  # 100 credits: four ~20.5-credit requests fit
    headers = {"Authorization": f"Bearer {key}"}

    async def one() -> tuple[int, int]:
        resp = await sidecar.client.post("/v1/completions", json=BIG, headers=headers)
        await resp.read()
        return resp.status, int(resp.headers.get("x-creditgate-charged", "0"))

    results = await asyncio.gather(*(one() for _ in range(30)))
    statuses = sorted(status for status, _ in results)
    assert set(statuses) == {200, 402}, statuses
    charged = sum(charge for _, charge in results)
    after = await sidecar.balance(account)
    assert after["held"] == 0
    assert after["balance"] == 100_000_000 - charged
    assert after["balance"] >= 0, after  # every admitted request's charge was within its hold
    assert statuses.count(200) == 4


@pytest.mark.parametrize(
    ("body", "choices"),
    [
        ({"prompt": "one prompt", "max_tokens": 7}, 1),
        ({"prompt": [1, 2, 3], "max_tokens": 7}, 1),  # one prompt of token ids
        ({"prompt": ["a", "b", "c"], "max_tokens": 7}, 3),
        ({"prompt": [[1, 2], [3], [4]], "max_tokens": 7, "n": 2}, 6),
        ({"prompt": "x", "max_tokens": 7, "n": 2, "best_of": 5}, 5),
    ],
)
async def test_completions_output_budget(
    make_sidecar: SidecarFactory, body: dict[str, Any], choices: int
) -> None:
    """Streamed, so the hold is in x-creditgate-held: prompts × max(n, best_of) × max_tokens."""
    sidecar = await make_sidecar(cache_enabled=False)
    _, key = await sidecar.account(50_000_000)
    sent = msgspec.json.encode({"model": MODEL, "stream": True, **body})
    resp = await sidecar.client.post(
        "/v1/completions",
        data=sent,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    await resp.read()
    assert resp.status == 200
    price = PriceTable.from_settings(sidecar.settings).resolve(MODEL)
    prompt = estimate_prompt_tokens(len(sent), 1)
    expected = worst_case(price, prompt, choices * 7, PriceTable.from_settings(sidecar.settings).pooled)
    assert int(resp.headers["x-creditgate-held"]) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 0}, "best_of"),
        ({"best_of": "3"}, "best_of"),
        ({"best_of": 1.5}, "best_of"),
    ],
)
async def test_bad_best_of_is_refused(make_sidecar: SidecarFactory, body: dict[str, Any], param: str) -> None:
    sidecar = await make_sidecar()
    account, key = await sidecar.account(10_000_000)
    resp = await sidecar.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": "x", **body},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    after = await sidecar.balance(account)
    assert (after["balance"], after["held"]) == (10_000_000, 0)


IMAGE_CHAT = {
    "model": "gpt-4o-mini",
    "stream": True,
    "max_tokens": 5,
    "messages": [
        {"role": "system", "content": "plain"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-1"}},
            ],
        },
    ],
}
RESPONSES = {
    "model": "gpt-4o-mini",
    "stream": True,
    "max_output_tokens": 5,
    "previous_response_id": "resp_1",
    "input": [
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/b.png"}]},
        {"type": "item_reference", "id": "msg_1"},
    ],
}
CEILINGS = {"image_input_tokens": 1000, "audio_input_tokens": 300, "file_input_tokens": 20000}


@pytest.mark.parametrize(
    ("route", "body", "ceilings", "extra"),
    [
        ("/v1/chat/completions", IMAGE_CHAT, CEILINGS, 1000 + 300 + 20000),
        # Stored state once at its ceiling however many references, plus the image.
        ("/v1/responses", RESPONSES, {**CEILINGS, "stored_input_tokens": 128000}, 128000 + 1000),
        # Plain string content: nothing added, nothing needed.
        (
            "/v1/chat/completions",
            {**IMAGE_CHAT, "messages": [{"role": "user", "content": "an image of a file, audio"}]},
            {},
            0,
        ),
    ],
)
async def test_unseen_inputs_are_held_at_their_ceilings(
    make_sidecar: SidecarFactory, route: str, body: dict[str, Any], ceilings: dict[str, int], extra: int
) -> None:
    models = {"gpt-4o-mini": {"prompt": "0.00015", "completion": "0.0006", **ceilings}}
    sidecar = await make_sidecar(models=models, cache_enabled=False)
    _, key = await sidecar.account(50_000_000)
    sent = msgspec.json.encode(body)
    resp = await sidecar.client.post(
        route, data=sent, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    await resp.read()
    assert resp.status == 200
    table = PriceTable.from_settings(sidecar.settings)
    price = table.resolve("gpt-4o-mini")
    expected = worst_case(price, estimate_prompt_tokens(len(sent), 1) + extra, 5, table.pooled)
    assert int(resp.headers["x-creditgate-held"]) == expected


@pytest.mark.parametrize(
    ("route", "body", "ceilings", "param"),
    [
        ("/v1/chat/completions", IMAGE_CHAT, {}, "messages[1].content[1].image_url"),
        (
            "/v1/chat/completions",
            IMAGE_CHAT,
            {"image_input_tokens": 1000},
            "messages[1].content[2].input_audio",
        ),
        (
            "/v1/chat/completions",
            IMAGE_CHAT,
            {**CEILINGS, "file_input_tokens": None},
            "messages[1].content[3].file",
        ),
        ("/v1/responses", RESPONSES, {}, "input[0].content[0].image_url"),
        ("/v1/responses", RESPONSES, CEILINGS, "input[1].type"),
        (
            "/v1/responses",
            {"model": "gpt-4o-mini", "input": "hi", "conversation": "conv_1"},
            CEILINGS,
            "conversation",
        ),
        # An escaped name is the same name.
        (
            "/v1/chat/completions",
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": [{"image\\u005furl": {}}]}]},
            {},
            "messages[0].content[0].image_url",
        ),
    ],
)
async def test_unbounded_inputs_are_refused(
    make_sidecar: SidecarFactory, route: str, body: dict[str, Any], ceilings: dict[str, Any], param: str
) -> None:
    models = {"gpt-4o-mini": {"prompt": "0.00015", "completion": "0.0006", **ceilings}}
    sidecar = await make_sidecar(models=models)
    account, key = await sidecar.account(50_000_000)
    sent = msgspec.json.encode(body).replace(b"image\\\\u005furl", b"image\\u005furl")
    resp = await sidecar.client.post(
        route, data=sent, headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    )
    error = (await resp.json())["error"]
    assert resp.status == 400, error
    assert error["param"] == param
    assert (await sidecar.balance(account))["held"] == 0


async def test_an_overdrawn_account_gets_only_free_work(make_sidecar: SidecarFactory) -> None:
    models = {
        "gpt-4o-mini": {"prompt": "0.00015", "completion": "0.0006"},
        "free-model": {"prompt": "0", "completion": "0"},
    }
    sidecar = await make_sidecar(models=models)
    account, key = await sidecar.account(1_000)
    auth = {"Authorization": f"Bearer {key}"}
    cached = {
        "model": "gpt-4o-mini",
        "max_tokens": 1,
        "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}],
    }
    first = await sidecar.client.post("/v1/chat/completions", json=cached, headers=auth)
    assert first.status == 200, await first.text()
    # The upstream reports far more than the hold: the account is overdrawn.
    over = await sidecar.client.post(
        "/v1/chat/completions",
        json={**cached, "messages": [{"role": "user", "content": "more"}]},
        headers={**auth, "x-demo-tokens": "100000", "x-demo-ignore-limit": "1"},
    )
    assert over.status == 200, await over.text()
    balance = (await sidecar.balance(account))["balance"]
    assert balance < 0
    paid = await sidecar.client.post(
        "/v1/chat/completions", json={**cached, "messages": [{"role": "user", "content": "x"}]}, headers=auth
    )
    assert paid.status == 402, await paid.text()
    hit = await sidecar.client.post("/v1/chat/completions", json=cached, headers=auth)
    assert hit.status == 200
    assert hit.headers["X-Cache"] == "HIT"
    free = await sidecar.client.post(
        "/v1/chat/completions", json={**cached, "model": "free-model"}, headers=auth
    )
    assert free.status == 200, await free.text()
    assert free.headers["x-creditgate-charged"] == "0"
    after = await sidecar.balance(account)
    assert after["balance"] == balance
    assert after["held"] == 0


@pytest.mark.parametrize(
    ("model", "setting"),
    [
        ({"prompt": "1", "image_input_tokens": -1}, "models.m.image_input_tokens"),
        ({"prompt": "1", "stored_input_tokens": "lots"}, "models.m.stored_input_tokens"),
    ],
)
def test_bad_ceilings_are_named(model: dict[str, Any], setting: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CREDITGATE_MODELS": msgspec.json.encode({"m": model}).decode()})
    assert caught.value.param == setting


@pytest.mark.parametrize(
    ("inputs", "tokens"),
    [
        ([], 0),
        ([("image", "p"), ("image", "q"), ("audio", "r"), ("file", "s")], 2 * 10 + 20 + 30),
        ([("stored", "previous_response_id"), ("stored", "input[3].type")], 40),  # once, however many
        ([("image", "p"), ("stored", "conversation")], 10 + 40),
    ],
)
def test_unseen_prompt_tokens(inputs: list[tuple[str, str]], tokens: int) -> None:
    settings = load_settings(
        environ={
            "CREDITGATE_MODELS": '{"m": {"prompt": "1", "image_input_tokens": 10, "audio_input_tokens": 20,'
            ' "file_input_tokens": 30, "stored_input_tokens": 40}}'
        }
    )
    assert unseen_prompt_tokens(PriceTable.from_settings(settings).resolve("m"), inputs) == tokens


def test_a_missing_ceiling_names_the_part_and_the_setting() -> None:
    settings = load_settings(environ={"CREDITGATE_MODELS": '{"m": {"prompt": "1", "image_input_tokens": 0}}'})
    price = PriceTable.from_settings(settings).resolve("m")
    assert unseen_prompt_tokens(price, [("image", "input[0].content[0].image_url")]) == 0
    with pytest.raises(BadRequest) as caught:
        unseen_prompt_tokens(price, [("image", "x"), ("file", "messages[2].content[0].file")])
    assert caught.value.param == "messages[2].content[0].file"
    assert "models.m.file_input_tokens" in caught.value.message


async def test_a_huge_worst_case_is_held_at_the_charge_ceiling(make_sidecar: SidecarFactory) -> None:
    """A worst case above any charge (and above 2**53) is held at MAX_CHARGE, which bounds every charge:
    a 402, never a Redis error."""
    models = {"gpt-4o-mini": {"prompt": "1000000000", "completion": "1000000000"}}
    sidecar = await make_sidecar(models=models)
    account, key = await sidecar.account(1_000_000)
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "a " * 10_000}]}
    resp = await sidecar.client.post(
        "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    )
    error = (await resp.json())["error"]
    assert resp.status == 402, error
    assert error["required"] == MAX_CHARGE
    after = await sidecar.balance(account)
    assert (after["balance"], after["held"]) == (1_000_000, 0)
