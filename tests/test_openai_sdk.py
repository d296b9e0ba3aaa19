"""The official `openai` SDK, pointed at the sidecar, works unchanged: plain and streamed chat, raw
headers, and a 402 that surfaces as an APIStatusError and is never retried."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.types import CompletionUsage

from sidecar.app import create_app
from sidecar.demo import token_text

from .conftest import Sidecar, SidecarFactory, Upstream
from .support import MODELS, pooled, sdk, settled

CHAT = "/v1/chat/completions"
START = 10_000_000


def demo_text(tokens: int) -> str:
    """What the demo upstream generates for `tokens` completion tokens."""
    return "".join(token_text(i) for i in range(tokens))


@dataclass
class Counted:
    """A sidecar that logs every request reaching it (before its own middleware sees it)."""

    sidecar: Sidecar
    seen: list[str]

    def reached(self, path: str = CHAT) -> int:
        return self.seen.count(f"POST {path}")


@pytest.fixture
async def counted(make_sidecar: SidecarFactory, aiohttp_client: Any) -> Counted:
    seen: list[str] = []

    @web.middleware
    async def count(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(f"{request.method} {request.path}")
        response: web.StreamResponse = await handler(request)
        return response

    # A started app takes no more middleware: build a second one on the settings of a usual sidecar.
    settings = (await make_sidecar(models=MODELS)).settings
    app = create_app(settings)
    app.middlewares.insert(0, count)  # outermost: counts whatever the sidecar then does with it
    return Counted(Sidecar(await aiohttp_client(app), settings), seen)


async def test_non_streamed_chat(counted: Counted, upstream: Upstream) -> None:
    sc = counted.sidecar
    account, key = await sc.account(START)
    async with sdk(sc, key) as client:
        completion = await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hello world"}], max_tokens=7
        )
    assert completion.object == "chat.completion"
    assert completion.model == "test-model"
    assert [c.message.content for c in completion.choices] == [demo_text(7)]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (5, 7)
    assert completion.usage.total_tokens == 12
    assert (await sc.balance(account))["balance"] == START - pooled(5 * 1000 + 7 * 2000)
    assert upstream.calls("chat") == counted.reached() == 1


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_chat(counted: Counted, upstream: Upstream, include_usage: bool) -> None:
    sc = counted.sidecar
    account, key = await sc.account(START)
    deltas: list[str] = []
    usages: list[CompletionUsage] = []
    async with sdk(sc, key) as client:
        stream = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hello world"}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True} if include_usage else openai.omit,
        )
        async for chunk in stream:
            assert chunk.object == "chat.completion.chunk"
            if chunk.usage is not None:
                usages.append(chunk.usage)
            deltas.extend(choice.delta.content or "" for choice in chunk.choices)
    assert "".join(deltas) == demo_text(12)
    assert len(deltas) == 12  # one chunk per token, relayed as they came
    if include_usage:
        # The client asked for usage: it gets the final usage chunk.
        assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(5, 12)]
    else:
        # The sidecar asked for usage on the client's behalf and withheld that chunk.
        assert usages == []
    await settled(sc)
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START - pooled(5 * 1000 + 12 * 2000), 0)
    assert upstream.calls("chat") == counted.reached() == 1


async def test_raw_response_exposes_creditgate_headers(counted: Counted) -> None:
    sc = counted.sidecar
    account, key = await sc.account(START)
    async with sdk(sc, key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="test-model", messages=[{"role": "user", "content": "hello world"}], max_tokens=3
        )
    charge = pooled(5 * 1000 + 3 * 2000)
    assert raw.status_code == 200
    assert raw.headers["x-creditgate-charged"] == str(charge)
    assert raw.headers["x-creditgate-balance"] == str(START - charge)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.parse().choices[0].message.content == demo_text(3)
    assert (await sc.balance(account))["balance"] == START - charge


async def test_insufficient_credits_is_an_api_status_error_and_not_retried(
    counted: Counted, upstream: Upstream
) -> None:
    sc = counted.sidecar
    account, key = await sc.account(1_000)
    async with sdk(sc, key, max_retries=3) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hello world"}], max_tokens=10
            )
    error = caught.value
    assert error.status_code == 402
    # One request reached the sidecar, although the client was allowed three retries.
    assert counted.reached() == 1
    assert type(error) is openai.APIStatusError  # 402 has no subclass of its own in the SDK
    assert error.code == "insufficient_credits"
    assert error.type == "insufficient_quota"
    assert error.response.headers["x-should-retry"] == "false"
    assert "Insufficient credits" in error.message
    assert upstream.calls() == 0
    assert (await sc.balance(account))["balance"] == 1_000


async def test_retries_are_visible_to_the_request_counter(counted: Counted, upstream: Upstream) -> None:
    """Control for the test above: a retryable upstream 500 is retried by the SDK, and counted."""
    sc = counted.sidecar
    account, key = await sc.account(START)
    async with sdk(sc, key, max_retries=1) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="test-model",
                messages=[{"role": "user", "content": "hello world"}],
                max_tokens=3,
                extra_headers={"x-demo-status": "500"},
            )
    assert caught.value.status_code == 500
    assert counted.reached() == upstream.calls("chat") == 2
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START, 0)


async def test_models_list_is_the_price_table(counted: Counted, upstream: Upstream) -> None:
    sc = counted.sidecar
    _, key = await sc.account(0)
    async with sdk(sc, key) as client:
        models = await client.models.list()
    aliases = [a for m in sc.settings.models.values() for a in m.aliases]
    assert [m.id for m in models.data] == [*sc.settings.models, *aliases]
    assert counted.seen.count("GET /v1/models") == 1
    assert upstream.calls() == 0
