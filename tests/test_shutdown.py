"""Graceful shutdown of a real ``creditgate serve`` process on a real SIGTERM during a slow stream."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from sidecar.app import PROXY
from sidecar.keys import KeySpace

from .conftest import (
    ADMIN_TOKEN,
    Served,
    SidecarFactory,
    Upstream,
    new_key_prefix,
    process_env,
    serve_process,
)
from .support import HELLO, MODELS, post, start_stream

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def serve_env(
    redis_url: str, database_url: str, prefix: str, grace: str, upstream: Upstream
) -> dict[str, str]:
    # The demo upstream on a port of its own gives the slow streams below.
    return process_env(
        redis_url,
        database_url,
        prefix,
        upstream.url,
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITGATE_SHUTDOWN_GRACE_SECONDS=grace,
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
        CREDITGATE_FORWARD_REQUEST_HEADERS="x-demo-*",  # the demo upstream's steering headers
    )


async def funded_key(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    account = f"sd-{uuid.uuid4().hex[:8]}"
    async with session.post(f"{url}/admin/accounts", json={"id": account}, headers=ADMIN) as resp:
        assert resp.status == 201
    grant = {"Idempotency-Key": "g1", **ADMIN}
    async with session.post(
        f"{url}/admin/accounts/{account}/grants", json={"credits": "5"}, headers=grant
    ) as resp:
        assert resp.status == 200
    async with session.post(f"{url}/admin/accounts/{account}/keys", headers=ADMIN) as resp:
        return account, (await resp.json())["key"]


async def ledger_state(
    redis: Redis, database_url: str, prefix: str, account: str, request_id: str
) -> tuple[dict[str, Any], int, int, int]:
    """(the request's ledger row, ledger balance, Redis balance, Redis holds) after the process exited."""
    conn = await asyncpg.connect(database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM ledger WHERE idempotency_id = $1", request_id)
        balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account)
    finally:
        await conn.close()
    assert row is not None, f"no ledger row for {request_id}"
    k = KeySpace(prefix, 16).account(account)
    return (
        dict(row),
        int(balance),
        int(await redis.hget(k.balance, "balance") or -1),
        await redis.hlen(k.holds),
    )


@pytest.fixture
def prefix() -> str:
    return new_key_prefix()


async def read_into(resp: aiohttp.ClientResponse, received: bytearray) -> None:
    while chunk := await resp.content.readany():
        received += chunk


async def test_sigterm_lets_a_stream_finish_within_the_grace_period(
    redis_url: str,
    database_url: str,
    redis_client: Redis,
    prefix: str,
    tmp_path: Path,
    upstream: Upstream,
) -> None:
    env = serve_env(redis_url, database_url, prefix, grace="60", upstream=upstream)
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        account, key = await funded_key(session, url)
        resp, _, first = await start_stream(session, url, key, tokens=30, delay_ms=100)
        served.proc.terminate()
        await served.wait_for(r"waiting up to 60.0 s for 1 requests in flight")
        with pytest.raises(aiohttp.ClientConnectionError):  # no longer accepting
            await session.get(f"{url}/healthz")
        rest = await resp.content.read()
        request_id = resp.headers["x-request-id"]
        assert (first + rest).endswith(b"data: [DONE]\n\n")
        assert (first + rest).count(b"data: ") == 30 + 1
        assert await served.stop() == 0, served.log
    assert "final flush wrote" in served.log
    row, ledger_balance, redis_balance, holds = await ledger_state(
        redis_client, database_url, prefix, account, request_id
    )
    assert (row["outcome"], row["completion_tokens"]) == ("ok", 30)
    assert row["amount"] < 0
    assert ledger_balance == redis_balance == 5_000_000 + row["amount"]
    assert holds == 0


async def test_sigterm_cuts_a_stream_longer_than_the_grace_period_and_settles_it(
    redis_url: str,
    database_url: str,
    redis_client: Redis,
    prefix: str,
    tmp_path: Path,
    upstream: Upstream,
) -> None:
    env = serve_env(redis_url, database_url, prefix, grace="0.5", upstream=upstream)
    served: Served
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as session:
        account, key = await funded_key(session, url)
        resp, body, first = await start_stream(session, url, key, tokens=4000, delay_ms=50)
        request_id = resp.headers["x-request-id"]
        served.proc.terminate()
        received = bytearray(first)
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: no terminating chunk
            await read_into(resp, received)
        assert b"[DONE]" not in received
        assert await served.stop() == 0, served.log
    assert "cutting 1 requests still running after 0.5 s" in served.log
    row, ledger_balance, redis_balance, holds = await ledger_state(
        redis_client, database_url, prefix, account, request_id
    )
    # The disconnect policy: no usage came, so the prompt at 4 bytes a token plus one token per chunk
    # the client was sent.
    assert row["outcome"] == "shutdown_cut_estimated"
    assert row["prompt_tokens"] == -(-len(body) // 4)
    assert row["completion_tokens"] == received.count(b"data: ") > 0
    assert row["amount"] < 0
    assert ledger_balance == redis_balance == 5_000_000 + row["amount"]
    assert holds == 0


async def test_cut_at_the_deadline_settles_a_request_still_waiting_on_its_upstream(
    make_sidecar: SidecarFactory, aiohttp_server: Any
) -> None:
    arrived, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def stuck(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        arrived.set()
        await release.wait()
        return web.json_response({})

    slow = web.Application()
    slow.router.add_post("/v1/chat/completions", stuck)
    server = await aiohttp_server(slow)
    sc = await make_sidecar(models=MODELS, upstream_url=str(server.make_url("/v1")))
    account, key = await sc.account(1_000_000)
    body = {"model": "tm", "messages": HELLO, "max_tokens": 10}
    pending = asyncio.create_task(post(sc, "/v1/chat/completions", body, key))
    await arrived.wait()  # the upstream has the request and will not answer
    await sc.client.app[PROXY].finish(0)  # the grace period is over: cut
    resp = await pending
    assert (resp.status, (await resp.json())["error"]["code"]) == (503, "shutting_down")
    after_cut = 1_000_000  # the client got nothing: nothing is charged
    assert (await sc.balance(account))["balance"] == after_cut
    # Anything that still gets through after the cut is refused without calling the upstream.
    late = await post(sc, "/v1/chat/completions", body, key)
    assert (late.status, (await late.json())["error"]["code"]) == (503, "shutting_down")
    assert calls == 1
    assert (await sc.balance(account))["balance"] == after_cut
    assert (await sc.balance(account))["holds"] == []
    release.set()
