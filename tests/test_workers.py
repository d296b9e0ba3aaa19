"""`creditgate serve` with workers = 2: real processes sharing one port (SO_REUSEPORT) under a parent that
supervises them; one flusher per node; SIGTERM stops them all gracefully; a killed worker comes back."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.keys import KeySpace

from .conftest import ADMIN_TOKEN, Served, Upstream, new_key_prefix, process_env, serve_process
from .support import HELLO, start_stream

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEADLINE = 60  # seconds: a guard that fails the test, never a timing assertion


@pytest.fixture
def prefix() -> str:
    return new_key_prefix()


def workers_env(redis_url: str, database_url: str, prefix: str, upstream_url: str) -> dict[str, str]:
    return process_env(
        redis_url,
        database_url,
        prefix,
        upstream_url,
        CREDITGATE_WORKERS="2",
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITGATE_SHUTDOWN_GRACE_SECONDS="60",
        CREDITGATE_FORWARD_REQUEST_HEADERS="x-demo-*",
    )


def records(served: Served) -> list[dict[str, Any]]:
    """The JSON log lines (the parent's and the workers')."""
    return [json.loads(line) for line in served.lines if line.startswith("{")]


def worker_pids(served: Served) -> dict[int, list[int]]:
    """Worker index -> the pids it has had, in start order (the parent's "worker i started" lines)."""
    pids: dict[int, list[int]] = {}
    for rec in records(served):
        if found := re.fullmatch(r"worker (\d+) started \(pid (\d+)\)", rec["msg"]):
            pids.setdefault(int(found.group(1)), []).append(int(found.group(2)))
    return pids


async def funded_key(session: aiohttp.ClientSession, url: str) -> tuple[str, str]:
    account = f"wk-{uuid.uuid4().hex[:8]}"
    async with session.post(f"{url}/admin/accounts", json={"id": account}, headers=ADMIN) as resp:
        assert resp.status == 201
    grant = {"Idempotency-Key": "g1", **ADMIN}
    async with session.post(f"{url}/admin/accounts/{account}/grants", json={"credits": "50"}, headers=grant):
        pass
    async with session.post(f"{url}/admin/accounts/{account}/keys", headers=ADMIN) as resp:
        return account, (await resp.json())["key"]


async def served_by(served: Served, request_id: str) -> int:
    """The pid of the worker whose request log line names `request_id` (waits for the line)."""
    await served.wait_for(rf'"msg":"request".*"request_id":"{request_id}"')
    line = next(r for r in records(served) if r.get("request_id") == request_id and r["msg"] == "request")
    return int(line["pid"])


async def ledger(database_url: str, account: str) -> tuple[dict[str, int], int]:
    """(request id -> how many ledger rows it has, the ledger's balance) for `account`."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_id, count(*) AS n FROM ledger WHERE account_id = $1 GROUP BY idempotency_id",
            account,
        )
        balance = await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account)
    finally:
        await conn.close()
    return {r["idempotency_id"]: r["n"] for r in rows}, int(balance)


async def redis_state(redis: Redis, prefix: str, account: str) -> tuple[int, int]:
    k = KeySpace(prefix, 16).account(account)
    return int(await redis.hget(k.balance, "balance") or -1), await redis.hlen(k.holds)


async def test_two_workers_answer_on_one_port_and_only_one_flushes(
    redis_url: str, database_url: str, redis_client: Redis, prefix: str, tmp_path: Path, upstream: Upstream
) -> None:
    env = workers_env(redis_url, database_url, prefix, upstream.url)
    # A webhook channel: its delivery worker is a node task too (nothing is emitted, nothing is sent).
    env |= {
        "CREDITGATE_SIGNAL_WEBHOOK_URL": "http://127.0.0.1:9/hooks",
        "CREDITGATE_SIGNAL_WEBHOOK_SECRET": "s",
    }
    # A connection per request, so that the kernel spreads them over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession(connector=connector) as s:
        account, key = await funded_key(s, url)
        request_ids: list[str] = []
        pids: set[int] = set()
        async with asyncio.timeout(DEADLINE):
            while len(pids) < 2:
                async with s.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": HELLO},
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    request_ids.append(resp.headers["x-request-id"])
                pids.add(await served_by(served, request_ids[-1]))
        started = worker_pids(served)
        assert sorted(started) == [0, 1]
        assert pids == {started[0][0], started[1][0]}  # two worker processes, neither the parent
        assert served.proc.pid not in pids
        tasks = {
            r["pid"]: r["msg"].removeprefix("background tasks: ")
            for r in records(served)
            if r["msg"].startswith("background tasks:")
        }
        assert tasks == {  # the node-wide loops (flusher, reconciler, reaper, signals, meters): worker 0
            started[0][0]: (
                "lease-renewal, hold-reaper, wallet-sweeper, settlement-retry, reconciler, flusher,"
                " signal-delivery, auto-reload, meter-charges, invoicing"
            ),
            started[1][0]: "lease-renewal, settlement-retry",
        }
        assert await served.stop() == 0, served.log
    counts, ledger_balance = await ledger(database_url, account)
    assert {rid: counts.get(rid) for rid in request_ids} == dict.fromkeys(request_ids, 1)
    balance, holds = await redis_state(redis_client, prefix, account)
    assert (balance, holds) == (ledger_balance, 0)
    assert balance < 50_000_000


async def test_sigterm_stops_every_worker_after_its_streams_finish_and_settles_them(
    redis_url: str, database_url: str, redis_client: Redis, prefix: str, tmp_path: Path, upstream: Upstream
) -> None:
    env = workers_env(redis_url, database_url, prefix, upstream.url)
    connector = aiohttp.TCPConnector(force_close=True)
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession(connector=connector) as s:
        account, key = await funded_key(s, url)
        for index in (0, 1):  # both listening: the streams below may go to either
            await served.wait_for(rf'"msg":"creditgate listening on[^\n]*"worker":{index}')
        streams = [await start_stream(s, url, key, tokens=20, delay_ms=100) for _ in range(6)]
        served.proc.terminate()
        for index in (0, 1):  # the signal reached every worker
            await served.wait_for(rf'"msg":"stopping: no new connections[^\n]*"worker":{index}')
        for resp, _, first in streams:
            rest = await resp.content.read()
            assert (first + rest).endswith(b"data: [DONE]\n\n")
        request_ids = [resp.headers["x-request-id"] for resp, _, _ in streams]
        assert await served.stop() == 0, served.log
    assert sorted(re.findall(r"worker (\d) \(pid \d+\) stopped \(exit code 0\)", served.log)) == ["0", "1"]
    counts, ledger_balance = await ledger(database_url, account)
    assert {rid: counts.get(rid) for rid in request_ids} == dict.fromkeys(request_ids, 1)
    assert await redis_state(redis_client, prefix, account) == (ledger_balance, 0)


def gated_upstream(gate: asyncio.Event) -> web.Application:
    """An OpenAI-style upstream whose streams send one chunk, then wait for `gate` before they finish."""
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}

    def chunk(delta: dict[str, Any], **extra: Any) -> bytes:
        body = {"id": "c1", "object": "chat.completion.chunk", "model": "gpt-4o-mini", **extra}
        body.setdefault("choices", [{"index": 0, "delta": delta}])
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            message = {"role": "assistant", "content": "hi"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response(
                {
                    "id": "c1",
                    "object": "chat.completion",
                    "model": "gpt-4o-mini",
                    "choices": [choice],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": "h"}))
        await gate.wait()
        await resp.write(chunk({"content": "i"}))
        await resp.write(chunk({}, choices=[], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_rows_of_a_worker_that_finishes_after_worker_0_reach_the_ledger(
    redis_url: str, database_url: str, prefix: str, tmp_path: Path, aiohttp_server: Any
) -> None:
    """Worker 0 (the flusher) has stopped while worker 1 still streams: the parent's last flush writes it."""
    gate = asyncio.Event()
    server = await aiohttp_server(gated_upstream(gate))
    env = workers_env(redis_url, database_url, prefix, str(server.make_url("/v1")))
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as admin:
        account, key = await funded_key(admin, url)
        for index in (0, 1):
            await served.wait_for(rf'"msg":"creditgate listening on[^\n]*"worker":{index}')
        pid_1 = worker_pids(served)[1][0]
        auth = {"Authorization": f"Bearer {key}"}
        chat = {"model": "gpt-4o-mini", "messages": HELLO}
        # A client whose one kept-alive connection is served by worker 1.
        async with asyncio.timeout(DEADLINE):
            while True:
                client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                async with client.post(f"{url}/v1/chat/completions", json=chat, headers=auth) as resp:
                    assert resp.status == 200, await resp.text()
                    if await served_by(served, resp.headers["x-request-id"]) == pid_1:
                        break
                await client.close()
        try:
            resp = await client.post(
                f"{url}/v1/chat/completions", json={**chat, "stream": True}, headers=auth
            )
            assert resp.status == 200
            assert (await resp.content.readany()).startswith(b"data: ")
            request_id = resp.headers["x-request-id"]
            served.proc.terminate()
            await served.wait_for(r"worker 0 \(pid \d+\) stopped \(exit code 0\)")
            assert not re.search(r"worker 1 \(pid \d+\) stopped", served.log)  # still streaming
            gate.set()
            assert (await resp.content.read()).endswith(b"data: [DONE]\n\n")
        finally:
            await client.close()
        assert await served.stop() == 0, served.log
    assert re.search(r'"msg":"final flush wrote 1 ledger rows"}', served.log), served.log
    counts, _ = await ledger(database_url, account)
    assert counts.get(request_id) == 1


async def test_a_killed_worker_is_restarted(
    redis_url: str, database_url: str, prefix: str, tmp_path: Path, upstream: Upstream
) -> None:
    env = {**workers_env(redis_url, database_url, prefix, upstream.url), "CREDITGATE_OPS_PORT": "0"}
    async with serve_process(env, tmp_path) as (served, url), aiohttp.ClientSession() as s:
        await served.wait_for(r"worker 1 started")
        victim = worker_pids(served)[1][0]
        await served.wait_for(rf'"msg":"creditgate listening on[^\n]*"pid":{victim}')
        os.kill(victim, signal.SIGKILL)
        await served.wait_for(rf"worker 1 \(pid {victim}\) exited with code -9")
        await served.wait_for(rf"worker 1 started \(pid (?!{victim}\))\d+")
        assert len(worker_pids(served)[1]) == 2
        successor = worker_pids(served)[1][1]
        assert successor != victim
        assert worker_pids(served)[0] == [worker_pids(served)[0][0]]  # worker 0 untouched
        await served.wait_for(rf'"msg":"creditgate listening on[^\n]*"pid":{successor}')
        # Ops port 0 became one port the parent chose, shared by every worker, the successor too.
        ops = re.findall(r'"msg":"creditgate ops listening on (http://[^ ]+) [^\n]*"pid":(\d+)', served.log)
        assert {int(pid) for _, pid in ops} == {worker_pids(served)[0][0], victim, successor}
        assert len({ops_url for ops_url, _ in ops}) == 1
        async with s.get(f"{ops[0][0]}/readyz") as resp:
            assert resp.status == 200
        async with s.get(f"{url}/v1/models") as resp:  # no key: the API port answers, in the OpenAI shape
            assert resp.status == 401
            assert (await resp.json())["error"]["code"]
        assert await served.stop() == 0, served.log


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_workers_out_of_range_is_refused_naming_the_setting(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(environ={"CREDITGATE_WORKERS": value})
    assert caught.value.param == "workers"


def test_workers_in_range_is_taken() -> None:
    assert load_settings(environ={"CREDITGATE_WORKERS": "64"}).workers == 64
    assert load_settings(environ={}).workers == 1
