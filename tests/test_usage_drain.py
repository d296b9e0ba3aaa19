"""After a client leaves mid-stream, the drain reads on to the upstream's final usage (real HTTP).

vLLM-style upstreams (``continuous_usage_stats``) put a cumulative usage on every chunk; the drain used to
stop at the first usage it saw after the client left and charge that partial count.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import PROXY

from .conftest import SidecarFactory

MODELS = {"test-model": {"prompt": "1", "completion": "2", "max_output_tokens": 1000}}
TOKENS = 40


def _chunk(i: int) -> bytes:
    event = {
        "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
        "usage": {"prompt_tokens": 7, "completion_tokens": i + 1, "total_tokens": 8 + i},
    }
    return b"data: " + msgspec.json.encode(event) + b"\n\n"


async def test_the_drain_reads_to_the_final_cumulative_usage(make_sidecar: SidecarFactory) -> None:
    gate = asyncio.Event()  # opened once the client has gone

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_chunk(0))
        await gate.wait()
        for i in range(1, TOKENS):
            await response.write(_chunk(i))
        await response.write(b"data: [DONE]\n\n")
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    server = TestServer(app)
    await server.start_server()
    try:
        sc = await make_sidecar(upstream_url=str(server.make_url("/v1")), models=MODELS)
        account, key = await sc.account(10_000_000)
        body: dict[str, Any] = {
            "model": "test-model",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 100,
        }
        url = sc.client.make_url("/v1/chat/completions")
        async with aiohttp.ClientSession() as session:
            resp = await session.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
            assert resp.status == 200
            assert (await resp.content.readuntil(b"\n\n")).startswith(b"data: ")
            resp.close()  # the client leaves after its first event
        gate.set()
        proxy = sc.client.app[PROXY]
        async with asyncio.timeout(30):
            while proxy.in_flight:
                await asyncio.wait(set(proxy.in_flight))
        charged = 10_000_000 - (await sc.balance(account))["balance"]
        # The final usage: 7 prompt tokens, 40 completion tokens, x 1.25 (pooled).
        assert charged == -(-(7 * 1000 + TOKENS * 2000) * 5 // 4)
    finally:
        await server.close()
