"""Three fake OpenAI upstreams on real ports whose answers each test scripts, the routed model's settings
over them, a controlled clock for the circuit breaker, and ledger reads. Used by the routing tests."""

from __future__ import annotations

import asyncio
import random
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.test_utils import TestServer

from sidecar.app import FLUSHER, PROXY

from .conftest import Sidecar, SidecarFactory
from .support import settled

USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
# The routed model at each upstream's price (credits per 1K tokens: ×1000 micro-credits per token), for
# USAGE: a 1/2 → 50,000; b 2/4 → 100,000; c 3/6 → 150,000 micro-credits, ×1.25 on the pooled key.
CHARGE = {"a": 62_500, "b": 125_000, "c": 187_500}
OWN_KEY_CHARGE = {"a": 50_000, "b": 100_000, "c": 150_000}  # ×1 (byok_multiplier)
# The providers' costs of USAGE: a's default 0.5/1 → 25,000; b's b-model 1/1 → 30,000; c: no profile.
COST = {"a": 25_000, "b": 30_000, "c": None}
MODEL_AT = {"a": "routed", "b": "b-model", "c": "c-model"}
CHAT = {"model": "routed", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}


@dataclass
class Fake:
    """One upstream. Each request takes the next answer of `script` (then `always`, else "ok"): "ok", a
    status ("400", "429", "500", "503"), "hang" (no answer until the test ends) or "cut" (a stream's
    first events, then the connection dropped)."""

    name: str
    url: str = ""
    script: list[str] = field(default_factory=list)
    always: str | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)  # each request's body, and its key
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def calls(self) -> int:
        return len(self.seen)

    def keys(self) -> list[str | None]:
        return [s["authorization"] for s in self.seen]

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = msgspec.json.decode(await request.read())
        self.seen.append({**body, "authorization": request.headers.get("Authorization")})
        self.arrived.set()
        kind = self.script.pop(0) if self.script else (self.always or "ok")
        if kind == "hang":
            await self.release.wait()
        if kind.isdigit():
            error = {"error": {"message": f"{self.name} says {kind}", "type": "server_error"}}
            return web.json_response(error, status=int(kind))
        head = {"id": f"chatcmpl-{self.name}", "object": "chat.completion.chunk", "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": f"from {self.name}"}
            answer = {**head, "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
            return web.json_response({**answer, "usage": USAGE})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("from ", self.name):
            chunk = {**head, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await response.write(b"data: " + msgspec.json.encode(chunk) + b"\n\n")
        if kind == "cut":  # before its usage and [DONE]: the stream breaks off
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(
            b"data: " + msgspec.json.encode({**head, "choices": [], "usage": USAGE}) + b"\n\n"
        )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class Fakes:
    by_name: dict[str, Fake]
    dead_url: str  # a port nothing listens on: connection refused

    def __getitem__(self, name: str) -> Fake:
        return self.by_name[name]


async def fake_upstreams() -> AsyncIterator[Fakes]:
    """Fakes a, b and c on real ports (the fixture's body)."""
    fakes: dict[str, Fake] = {}
    servers: list[TestServer] = []
    for name in "abc":
        fake = Fake(name)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", fake.chat)
        server = TestServer(app)
        await server.start_server()
        fake.url = str(server.make_url("/v1"))
        fakes[name] = fake
        servers.append(server)
    with socket.socket() as probe:  # bound then closed: nothing listens there
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    try:
        yield Fakes(fakes, dead)
    finally:
        for fake in fakes.values():
            fake.release.set()
        for server in servers:
            await server.close()


def routed_config(
    fakes: Fakes, *, routes: list[dict[str, Any]] | None = None, **model: Any
) -> dict[str, Any]:
    """The settings of the model `routed` over the fakes (a, then b, then c by default)."""
    upstreams = {
        "a": {"base_url": fakes["a"].url, "api_key": "sk-a", "provider": "pa",
              "costs": {"default": {"prompt": "0.5", "completion": "1"}}},
        "b": {"base_url": fakes["b"].url, "api_key": "sk-b", "provider": "pb",
              "costs": {"models": {"b-model": {"prompt": "1", "completion": "1"}}}},
        "c": {"base_url": fakes["c"].url, "api_key": "sk-c", "provider": "pc"},
        "dead": {"base_url": fakes.dead_url, "api_key": "sk-dead"},  # nothing listens there
    }  # fmt: skip
    default_routes = [
        {"upstream": "a"},
        {"upstream": "b", "model": "b-model", "prompt": "2", "completion": "4"},
        {"upstream": "c", "model": "c-model", "prompt": "3", "completion": "6"},
    ]
    priced = {"prompt": "1", "completion": "2", "max_output_tokens": 100, **model}
    return {"upstreams": upstreams, "models": {"routed": {**priced, "routes": routes or default_routes}}}


class Clock:
    """The router's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


async def routed_sidecar(
    make_sidecar: SidecarFactory,
    fakes: Fakes,
    *,
    routes: list[dict[str, Any]] | None = None,
    **overrides: Any,
) -> tuple[Sidecar, Clock]:
    """A sidecar whose model `routed` goes to the fakes, its router on a controlled clock and a seeded
    RNG; the response cache off unless asked for."""
    model = overrides.pop("model", {})
    config = routed_config(fakes, routes=routes, **model)
    sc = await make_sidecar(**{"cache_enabled": False, **config, **overrides})
    clock = Clock()
    router = sc.client.app[PROXY].router
    router.clock, router.rng = clock, random.Random(1234)
    return sc, clock


async def charged(sc: Sidecar, account: str, start: int) -> int:
    """What the account was charged since it held `start`, once every request settled."""
    await settled(sc)
    return start - int((await sc.balance(account))["balance"])


async def ledger_rows(sc: Sidecar, account: str, rows: int) -> list[Any]:
    """The account's usage rows, oldest first, once every request settled and `rows` rows were flushed."""
    await settled(sc)
    async with asyncio.timeout(30):
        await sc.client.app[FLUSHER].wait_for_rows(rows)
    sql = "SELECT * FROM ledger WHERE kind = 'usage' AND account_id = $1 ORDER BY created_at, idempotency_id"
    return list(await sc.services.store.pool.fetch(sql, account))
