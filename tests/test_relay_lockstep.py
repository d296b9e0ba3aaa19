"""Events are relayed as they arrive: the upstream sends event k+1 only after the client has received
event k (a relay that buffered even one event would deadlock, and the test would fail on its bound)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from .conftest import Sidecar, SidecarFactory
from .support import HELLO, MODELS, pooled, post, settled

TOKENS = 8
BOUND = 10  # seconds any one step may take before the test fails: a bound, not a synchronisation


def chunk(k: int) -> bytes:
    return b'data: {"choices":[{"index":0,"delta":{"content":"t%d"}}],"usage":null}\n\n' % k


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d}}\n\n' % TOKENS


class Lockstep:
    """An upstream that waits, before each next event, until the test says the client has the last."""

    def __init__(self) -> None:
        self.received = [asyncio.Event() for _ in range(TOKENS)]
        self.sent = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream_options"] == {"include_usage": True}  # asked for on the client's behalf
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for k in range(TOKENS):
            await response.write(chunk(k))
            self.sent = k + 1
            await asyncio.wait_for(self.received[k].wait(), BOUND)
        await response.write(USAGE)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def lockstep() -> AsyncIterator[tuple[Lockstep, str]]:
    upstream = Lockstep()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    server = TestServer(app)
    await server.start_server()
    yield upstream, str(server.make_url("/v1"))
    await server.close()


async def test_the_client_has_event_k_before_the_upstream_sends_event_k_plus_1(
    make_sidecar: SidecarFactory, lockstep: tuple[Lockstep, str]
) -> None:
    upstream, url = lockstep
    sc: Sidecar = await make_sidecar(models=MODELS, upstream_url=url)
    account, key = await sc.account(10_000_000)
    body = {"model": "test-model", "messages": HELLO, "stream": True, "max_tokens": TOKENS}
    resp = await post(sc, "/v1/chat/completions", body, key)
    assert resp.status == 200
    got = b""
    for k in range(TOKENS):
        while chunk(k) not in got:
            got += await asyncio.wait_for(resp.content.readany(), BOUND)
        assert upstream.sent == k + 1  # the upstream has not sent event k+1 yet
        upstream.received[k].set()
    got += await asyncio.wait_for(resp.content.read(), BOUND)
    assert got == b"".join(chunk(k) for k in range(TOKENS)) + b"data: [DONE]\n\n"  # usage chunk withheld
    await settled(sc)
    state = await sc.balance(account)
    assert state["balance"] == 10_000_000 - pooled(5 * 1000 + TOKENS * 2000)  # settled once, from usage
    assert state["held"] == 0
