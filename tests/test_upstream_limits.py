"""What an upstream answer may hold of the sidecar: a non-streamed body over upstream_max_body_bytes is
not buffered (a 502), and a stream whose client stopped reading does not hold its upstream connection.

Real sidecar, Redis and Postgres; fake upstreams that speak HTTP and SSE over real sockets.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import FLUSHER, PROXY, SERVICES

from .conftest import SidecarFactory, make_settings
from .support import MODELS, admin_balance, funded_key, pooled, post, serving

CAP = 256 * 1024
HUGE = 8 * CAP  # what the fake upstream answers
START = 100_000_000
CHAT = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
EMBED = {"model": "test-embed", "input": "hello " * 100}


def _huge_answer(route: str) -> bytes:
    """A valid answer of about HUGE bytes, its usage at the very end (where the cap never reaches)."""
    if route == "embeddings":
        data = [{"object": "embedding", "index": i, "embedding": [0.125] * 1000} for i in range(HUGE // 6000)]
        return msgspec.json.encode({"object": "list", "data": data, "usage": {"prompt_tokens": 7}})
    text = "x" * HUGE
    return msgspec.json.encode(
        {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 10},
        }
    )


class Big:
    """An upstream answering every request with a huge body: chunked or with its Content-Length."""

    def __init__(self) -> None:
        self.status = 200
        self.chunked = True
        self.served = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        route = request.path.rsplit("/", 1)[-1]
        body = _huge_answer(route)
        self.served += 1
        if not self.chunked:
            return web.Response(status=self.status, body=body, content_type="application/json")
        response = web.StreamResponse(status=self.status, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for i in range(0, len(body), 65536):
            await response.write(body[i : i + 65536])
        await response.write_eof()
        return response


@pytest.fixture
async def big() -> AsyncIterator[tuple[Big, str]]:
    upstream = Big()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    app.router.add_post("/v1/embeddings", upstream.handle)
    server = TestServer(app)
    await server.start_server()
    yield upstream, str(server.make_url("/v1"))
    await server.close()


async def _settled(sc: Any) -> None:
    proxy = sc.client.app[PROXY]
    async with asyncio.timeout(30):
        while proxy.in_flight:
            await asyncio.wait(set(proxy.in_flight))


@pytest.mark.parametrize("chunked", [True, False])
async def test_a_body_over_the_cap_is_a_502_charged_at_most_the_hold(
    make_sidecar: SidecarFactory, big: tuple[Big, str], chunked: bool
) -> None:
    upstream, url = big
    upstream.chunked = chunked
    sc = await make_sidecar(upstream_url=url, models=MODELS, upstream_max_body_bytes=CAP)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_body_too_large"
    assert "upstream_max_body_bytes" in error["message"]
    await _settled(sc)
    balance = await sc.balance(account)
    # The estimate (the answer's bytes at 4 per token) is far above the hold: charged the hold, no more.
    body = msgspec.json.encode(CHAT)
    hold = pooled(len(body) * 1000 + 10 * 2000)
    assert START - balance["balance"] == hold
    assert f"charged {hold} micro-credits" in error["message"]
    assert balance["held"] == 0


async def test_a_body_over_the_cap_is_charged_the_estimate_when_it_is_below_the_hold(
    make_sidecar: SidecarFactory, big: tuple[Big, str]
) -> None:
    upstream, url = big
    upstream.chunked = False  # its length is known: refused before a byte of it is read
    sc = await make_sidecar(upstream_url=url, models=MODELS, upstream_max_body_bytes=CAP)
    account, key = await sc.account(START)
    resp = await post(sc, "/v1/embeddings", EMBED, key)
    assert resp.status == 502
    await _settled(sc)
    # Embeddings have no output price: the estimate is the prompt at 4 bytes per token, below the hold.
    body_size = len(msgspec.json.encode(EMBED))
    assert START - (await sc.balance(account))["balance"] == pooled(-(-body_size // 4) * 100)


async def test_an_error_body_over_the_cap_and_no_usage_charge_free_cost_nothing(
    make_sidecar: SidecarFactory, big: tuple[Big, str]
) -> None:
    upstream, url = big
    sc = await make_sidecar(
        upstream_url=url, models=MODELS, upstream_max_body_bytes=CAP, no_usage_charge="free"
    )
    account, key = await sc.account(START)
    assert (await post(sc, "/v1/chat/completions", CHAT, key)).status == 502
    upstream.status = 500
    sc_errors = await make_sidecar(upstream_url=url, models=MODELS, upstream_max_body_bytes=CAP)
    other, other_key = await sc_errors.account(START)
    failed = await post(sc_errors, "/v1/chat/completions", CHAT, other_key)
    assert (failed.status, (await failed.json())["error"]["code"]) == (502, "upstream_body_too_large")
    await _settled(sc)
    await _settled(sc_errors)
    assert (await sc.balance(account))["balance"] == START
    assert (await sc_errors.balance(other))["balance"] == START


async def test_a_body_within_the_cap_is_relayed_whole(
    make_sidecar: SidecarFactory, big: tuple[Big, str]
) -> None:
    _, url = big
    sc = await make_sidecar(upstream_url=url, models=MODELS, upstream_max_body_bytes=HUGE * 2)
    _, key = await sc.account(START)
    resp = await post(sc, "/v1/chat/completions", CHAT, key)
    assert resp.status == 200
    assert await resp.read() == _huge_answer("completions")
    assert resp.headers["x-creditgate-charged"] == str(pooled(7 * 1000 + 10 * 2000))


# ---- a stream whose client stops reading ------------------------------------------------------------

STREAMED = 32 * 1024 * 1024  # far more than the socket buffers between the sidecar and its client hold


def _sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


async def test_a_stream_whose_client_stops_reading_releases_its_upstream_and_settles_once(
    redis_url: str, database_url: str
) -> None:
    finished = asyncio.Event()  # the upstream wrote its whole stream: the sidecar read it all
    piece = "y" * 16384

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = _sse({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
        for _ in range(STREAMED // len(chunk)):
            await response.write(chunk)
        await response.write(_sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 100}}))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        finished.set()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    server = TestServer(app)
    await server.start_server()
    settings = make_settings(
        redis_url,
        database_url,
        str(server.make_url("/v1")),
        models=MODELS,
        client_write_timeout_seconds=0.5,
        flush_interval_seconds=0.05,
    )
    try:
        async with serving(settings) as (host, port, sidecar):
            account, key = await funded_key(host, port, START)
            loop = asyncio.get_running_loop()
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window, soon full
            client.setblocking(False)
            await loop.sock_connect(client, (host, port))
            body = msgspec.json.encode({**CHAT, "max_tokens": 100, "stream": True})
            await loop.sock_sendall(
                client,
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: creditgate\r\n"
                b"Content-Type: application/json\r\n"
                + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
            first = await loop.sock_recv(client, 1024)  # the answer has begun; the client reads no more
            assert first.startswith(b"HTTP/1.1 200")
            async with asyncio.timeout(60):  # a guard: the stream must not hold its upstream forever
                await finished.wait()
                proxy = sidecar[PROXY]
                while proxy.in_flight:
                    await asyncio.wait(set(proxy.in_flight))
            client.close()
            charge = pooled(7 * 1000 + 100 * 2000)
            state = await admin_balance(host, port, account)
            assert (state["held"], state["balance"]) == (0, START - charge)  # once, from the drained usage
            async with asyncio.timeout(30):
                await sidecar[FLUSHER].wait_for_rows(1)  # this request's usage row
            rows = await sidecar[SERVICES].store.pool.fetch(
                "SELECT amount, outcome FROM ledger WHERE account_id = $1 AND kind = 'usage'", account
            )
            assert [(r["amount"], r["outcome"]) for r in rows] == [(-charge, "client_gone")]
    finally:
        await server.close()
