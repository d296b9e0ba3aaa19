"""Helpers the test modules share: the price table most tests use, request helpers, the /metrics
scraper, the OpenAI SDK client, a sidecar behind the listener `serve` uses with raw clients of it, an
upstream that answers when the test says, and a ledger read.
(Fixtures live in conftest.py.)"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import FLUSHER, PROXY, create_app
from sidecar.config import Settings
from sidecar.connections import ListenerLimits
from sidecar.serve import _site

from .conftest import ADMIN_TOKEN, Sidecar

# Round prices so every expected charge can be checked by hand (micro-credits per token):
# prompt 1000, completion 2000, cached prompt 500; embeddings 100 per token.
MODELS = {
    "test-model": {
        "prompt": "1",
        "completion": "2",
        "cached_prompt": "0.5",
        "max_output_tokens": 100,
        "aliases": ["tm"],
    },
    "test-embed": {"prompt": "0.1", "max_output_tokens": 1},
    "test-fee": {"prompt": "1", "completion": "2", "request_fee": "0.01", "max_output_tokens": 100},
}
HELLO = [{"role": "user", "content": "hello world"}]  # the demo counts 3 + 2 = 5 prompt tokens


def pooled(micro: int) -> int:
    """x 1.25, rounded up once."""
    return -(-micro * 5 // 4)


def hold_for(body: bytes, n: int = 1, limit: int = 100) -> int:
    """The worst case the sidecar holds: every body byte a prompt token, plus n x the output limit."""
    return pooled(len(body) * 1000 + n * limit * 2000)


async def post(
    sc: Sidecar, path: str, body: dict[str, Any], key: str, **headers: str
) -> aiohttp.ClientResponse:
    return await sc.client.post(
        path, data=msgspec.json.encode(body), headers={"Authorization": f"Bearer {key}", **headers}
    )


async def settled(sc: Sidecar) -> None:
    """Wait until every exchange the sidecar started has settled."""
    in_flight = set(sc.client.app[PROXY].in_flight)
    if in_flight:
        await asyncio.wait(in_flight)


async def stream(
    sc: Sidecar, path: str, body: dict[str, Any], key: str, **headers: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    resp = await post(sc, path, body, key, **headers)
    return resp, await resp.read()


def events(raw: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(sc: Sidecar) -> Samples:
    resp = await sc.client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(await resp.text()):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@asynccontextmanager
async def sdk(sc: Sidecar, api_key: str, **options: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=str(sc.client.make_url("/v1")), api_key=api_key, **options
    ) as client:
        yield client


def record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("creditgate.test", logging.WARNING, __file__, 1, msg, args, None)
    rec.__dict__.update(extra)
    return rec


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


async def start_stream(
    session: aiohttp.ClientSession, url: str, key: str, tokens: int, delay_ms: int
) -> tuple[aiohttp.ClientResponse, bytes, bytes]:
    body = msgspec.json.encode(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "go"}], "stream": True}
    )
    resp = await session.post(
        f"{url}/v1/chat/completions",
        data=body,
        headers={
            "Authorization": f"Bearer {key}",
            "x-demo-tokens": str(tokens),
            "x-demo-token-delay-ms": str(delay_ms),
        },
    )
    assert resp.status == 200
    first = await resp.content.readany()  # the stream is under way
    assert first.startswith(b"data: ")
    return resp, body, first


# ---- a sidecar behind the CLI's own listener, and raw clients of it ---------------------------------

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, int, web.Application]]:
    """The sidecar on a real port through the listener `serve` uses, with the settings' connection
    limits: (host, port, app)."""
    app = create_app(settings)
    async with _site(app, "127.0.0.1", 0, 5.0, limits=ListenerLimits.of(settings)) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield host, int(port), app


async def read_to_end(reader: asyncio.StreamReader, bound: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed); `bound`
    seconds at most, a guard that fails the test, never a timing assertion."""
    received = b""
    async with asyncio.timeout(bound):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


async def funded_key(host: str, port: int, micro: int) -> tuple[str, str]:
    """A new account holding `micro` micro-credits, and a key for it, made through the admin API."""
    base = f"http://{host}:{port}/admin"
    async with aiohttp.ClientSession(headers=ADMIN) as session:
        async with session.post(f"{base}/accounts", json={}) as resp:
            account = (await resp.json())["id"]
        grant = {"amount": micro}
        async with session.post(
            f"{base}/accounts/{account}/grants", json=grant, headers={"Idempotency-Key": uuid.uuid4().hex}
        ) as resp:
            assert resp.status < 300
        async with session.post(f"{base}/accounts/{account}/keys") as resp:
            key = (await resp.json())["key"]
        return account, key


async def admin_balance(host: str, port: int, account: str) -> Any:
    """The admin API's view of an account: its balance, what it holds."""
    url = f"http://{host}:{port}/admin/accounts/{account}"
    async with aiohttp.ClientSession(headers=ADMIN) as session, session.get(url) as resp:
        return await resp.json()


async def usage_rows(sc: Sidecar, account: str) -> list[Any]:
    """The account's usage rows in Postgres, once the flusher wrote at least one."""
    async with asyncio.timeout(30):
        await sc.client.app[FLUSHER].wait_for_rows(1)
    return list(
        await sc.services.store.pool.fetch(
            "SELECT * FROM ledger WHERE kind = 'usage' AND account_id = $1", account
        )
    )


def held_upstream() -> tuple[web.Application, asyncio.Event, asyncio.Event]:
    """An upstream that answers a chat request only once the test sets `release`."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def chat(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response(
            {
                "id": "c1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21},
            }
        )

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app, arrived, release
