"""Many sidecars, one account: four real ``creditgate serve`` processes share one account, 400 requests
arrive at once (100 at each), and the holds admit exactly as many as the balance covers, never more.

The upstream answers nothing until every one of the 400 has its verdict (admitted: parked at the
upstream; refused: a 402 at the client), so all the holds overlap: no settlement frees credits for a
later reserve. Each admitted request is charged exactly its hold (the upstream reports the worst case the
hold assumed), so a single admission too many would also drive the balance below zero. After the
answers, money is conserved in Redis, and once the outbox is drained the Postgres ledger holds exactly
the debits Redis made, one row per request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from redis.asyncio import Redis

from sidecar.flusher import GROUP
from sidecar.keys import AccountKeys, KeySpace

from .conftest import ADMIN_TOKEN, Served, new_key_prefix, process_env, serve_process
from .support import HELLO, MODELS, pooled

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster (the required one)

SIDECARS = 4
PER_SIDECAR = 100
REQUESTS = SIDECARS * PER_SIDECAR
FIT = 137  # holds the balance covers: well below the 400 asking, and above the 100 one sidecar gets,
# so that at least two processes hold at once and at least three refuse
MAX_TOKENS = 10
DEADLINE = 60  # seconds: a guard that fails the test, never a timing assertion
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

STREAMED = msgspec.json.encode(
    {
        "model": "test-model",
        "messages": HELLO,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)
# The same length (JSON whitespace pads it), so that every request's hold is the same.
WHOLE = msgspec.json.encode({"model": "test-model", "messages": HELLO, "max_tokens": MAX_TOKENS})
WHOLE = WHOLE + b" " * (len(STREAMED) - len(WHOLE))
# The hold: every body byte a prompt token (prompt_bytes_per_token 1) at 1000 micro-credits, plus the
# output limit at 2000, x 1.25 (the pooled multiplier).
HOLD = pooled(len(STREAMED) * 1000 + MAX_TOKENS * 2000)
GRANTED = FIT * HOLD + HOLD - 1  # floor(GRANTED / HOLD) == FIT, with a remainder just short of one more
# What the upstream reports for every request: the worst case the hold assumed, so each charge is HOLD.
USAGE = {
    "prompt_tokens": len(STREAMED),
    "completion_tokens": MAX_TOKENS,
    "total_tokens": len(STREAMED) + MAX_TOKENS,
}


def priced(usage: dict[str, int]) -> int:
    """What the sidecar charges for `usage` of test-model (1 credit a prompt token, 2 a completion one)."""
    return pooled(usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000)


@dataclass
class GatedUpstream:
    """An OpenAI-style chat upstream that answers nobody until `gate` is set, counting who is waiting."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: int = 0
    on_arrival: Callable[[], None] = lambda: None
    url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived += 1
        self.on_arrival()
        await self.gate.wait()
        head = {"id": f"chatcmpl-{self.arrived}", "created": 1_700_000_000, "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": "hi"}
            return web.json_response(
                {
                    **head,
                    "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                    "usage": USAGE,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {**head, "object": "chat.completion.chunk"}
        for delta in ({"role": "assistant", "content": "h"}, {"content": "i"}):
            choice = {"index": 0, "delta": delta, "finish_reason": None}
            await resp.write(b"data: " + json.dumps({**chunk, "choices": [choice], "usage": None}).encode())
            await resp.write(b"\n\n")
        await resp.write(b"data: " + json.dumps({**chunk, "choices": [], "usage": USAGE}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


@pytest.fixture
async def gated() -> AsyncIterator[GatedUpstream]:
    upstream = GatedUpstream()
    server = TestServer(upstream.app())
    await server.start_server()
    upstream.url = str(server.make_url("/v1"))
    yield upstream
    upstream.gate.set()
    await server.close()


@dataclass
class Outcome:
    sidecar: int
    streamed: bool
    status: int
    request_id: str
    charged: int | None  # the x-creditgate-charged header (non-streamed answers)
    usage: dict[str, int] | None  # the usage the answer reported (200s)
    error: dict[str, Any] | None  # the OpenAI-shaped error (refusals)


def stream_usage(raw: bytes) -> dict[str, int] | None:
    """The usage of the stream's last usage chunk, once it ended with [DONE]."""
    events = [e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e.strip()]
    assert events, raw
    assert events[-1] == b"[DONE]", raw[-200:]
    usages = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
    return usages[-1] if usages else None


async def call(session: aiohttp.ClientSession, url: str, key: str, sidecar: int, streamed: bool) -> Outcome:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = STREAMED if streamed else WHOLE
    async with session.post(f"{url}/v1/chat/completions", data=body, headers=headers) as resp:
        raw = await resp.read()
        charged = resp.headers.get("x-creditgate-charged")
        outcome = Outcome(
            sidecar,
            streamed,
            resp.status,
            resp.headers.get("x-request-id", ""),
            int(charged) if charged is not None else None,
            None,
            None,
        )
        if resp.status != 200:
            outcome.error = json.loads(raw)["error"]
        elif streamed:
            outcome.usage = stream_usage(raw)
        else:
            outcome.usage = json.loads(raw)["usage"]
        return outcome


async def funded_key(session: aiohttp.ClientSession, url: str, micro: int) -> tuple[str, str]:
    account = f"many-{uuid.uuid4().hex[:8]}"
    async with session.post(f"{url}/admin/accounts", json={"id": account}, headers=ADMIN) as resp:
        assert resp.status == 201, await resp.text()
    grant = {"Idempotency-Key": "g1", **ADMIN}
    async with session.post(
        f"{url}/admin/accounts/{account}/grants", json={"amount": micro}, headers=grant
    ) as resp:
        assert resp.status < 300, await resp.text()
    async with session.post(f"{url}/admin/accounts/{account}/keys", headers=ADMIN) as resp:
        assert resp.status < 300, await resp.text()
        return account, (await resp.json())["key"]


async def until(what: str, condition: Callable[[], Awaitable[bool]]) -> None:
    """Poll `condition` until it holds; fail naming `what` after DEADLINE seconds."""
    try:
        async with asyncio.timeout(DEADLINE):
            while not await condition():  # noqa: ASYNC110 (other processes change it)
                await asyncio.sleep(0.02)  # a poll interval, not a stand-in for synchronisation
    except TimeoutError:
        pytest.fail(f"{what}: not within {DEADLINE}s")


@contextlib.asynccontextmanager
async def sidecars(env: dict[str, str], cwd: Path) -> AsyncIterator[list[tuple[Served, str]]]:
    """SIDECARS `creditgate serve` processes on the same Redis, key prefix and Postgres schema, started
    at once (as a Deployment's pods are); yields them once all listen, killed on the way out."""
    async with contextlib.AsyncExitStack() as stack:
        started: list[tuple[Served, str]] = []

        async def start(index: int) -> None:
            directory = cwd / f"sidecar-{index}"
            directory.mkdir()
            started.append(await stack.enter_async_context(serve_process(env, directory)))

        async with asyncio.TaskGroup() as group:
            for index in range(SIDECARS):
                group.create_task(start(index))
        yield started


def whole(value: bytes | str | None) -> int:
    """A Redis reply that must be an integer."""
    assert value is not None
    return int(value)


async def money(redis: Redis, balance_key: str) -> tuple[int, int]:
    """The account's (balance, held), in one HMGET: one consistent view."""
    balance, held = await redis.hmget(balance_key, ["balance", "held"])
    return whole(balance), whole(held or b"0")


class Sampler:
    """Reads the account's balance and held (one HMGET: one consistent view) until stopped."""

    def __init__(self, redis: Redis, balance_key: str) -> None:
        self.redis = redis
        self.key = balance_key
        self.samples: list[tuple[int, int]] = []
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        while not self.stopping.is_set():
            self.samples.append(await money(self.redis, self.key))
            await asyncio.sleep(0.005)  # the sampling rate, not a synchronisation

    async def sampled(self) -> bool:
        return bool(self.samples)

    @property
    def lowest_available(self) -> int:
        return min(balance - held for balance, held in self.samples)


@contextlib.asynccontextmanager
async def sampling(redis: Redis, balance_key: str) -> AsyncIterator[Sampler]:
    """A Sampler running until the block ends (its failure, if any, raised there)."""
    sampler = Sampler(redis, balance_key)
    task = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        sampler.stopping.set()
        await task


async def all_at_once(
    gated: GatedUpstream,
    session: aiohttp.ClientSession,
    urls: list[str],
    key: str,
    redis: Redis,
    keys: AccountKeys,
) -> list[Outcome]:
    """Send the 400 requests at once, 100 to each sidecar; check the verdicts while the upstream is shut,
    then let it answer. Returns every outcome."""
    # Every request is either parked at the shut upstream (admitted) or back at the client (refused);
    # once all 400 are one or the other, nothing can change until the upstream answers.
    tasks: list[asyncio.Task[Outcome]] = []
    accounted = asyncio.Event()

    def check() -> None:
        if gated.arrived + sum(t.done() for t in tasks) >= REQUESTS:
            accounted.set()

    gated.on_arrival = check
    for i in range(REQUESTS):
        # Request i goes to sidecar i % 4; each sidecar gets 50 streamed and 50 whole answers.
        task = asyncio.create_task(call(session, urls[i % SIDECARS], key, i % SIDECARS, i // 4 % 2 == 1))
        task.add_done_callback(lambda _: check())
        tasks.append(task)
    try:
        try:
            async with asyncio.timeout(DEADLINE):  # a bound: a bug fails, never hangs
                await accounted.wait()
        except TimeoutError:
            done = sum(t.done() for t in tasks)
            pytest.fail(f"{gated.arrived} requests reached the upstream, {done} came back")
        refused = [t.result() for t in tasks if t.done()]
        # Exactly floor(GRANTED / HOLD) got through, across the four processes; the rest were refused.
        assert (gated.arrived, len(refused)) == (FIT, REQUESTS - FIT), [o.status for o in refused]
        assert {o.status for o in refused} == {402}
        for outcome in refused:
            assert outcome.error is not None
            assert set(outcome.error) >= {"message", "type", "param", "code"}  # the OpenAI shape
            assert (outcome.error["type"], outcome.error["code"]) == (
                "insufficient_quota",
                "insufficient_credits",
            )
            # Nothing settles while the upstream is shut: each refusal saw all 137 holds taken.
            assert (outcome.error["balance"], outcome.error["required"]) == (HOLD - 1, HOLD)
        assert await money(redis, keys.balance) == (GRANTED, FIT * HOLD)
        assert await redis.hlen(keys.holds) == FIT
    finally:
        gated.gate.set()
        async with asyncio.timeout(DEADLINE):
            gathered = await asyncio.gather(*tasks, return_exceptions=True)
    outcomes = [o for o in gathered if isinstance(o, Outcome)]
    assert len(outcomes) == REQUESTS, [o for o in gathered if not isinstance(o, Outcome)]
    return outcomes


async def test_four_sidecars_share_one_account_and_400_requests_admit_exactly_what_it_covers(
    redis_url: str, database_url: str, redis_client: Redis, tmp_path: Path, gated: GatedUpstream
) -> None:
    prefix = new_key_prefix()
    env = process_env(
        redis_url,
        database_url,
        prefix,
        gated.url,
        CREDITGATE_ADMIN_TOKEN=ADMIN_TOKEN,
        CREDITGATE_MODELS=json.dumps(MODELS),
        CREDITGATE_SHUTDOWN_GRACE_SECONDS="30",
    )
    connector = aiohttp.TCPConnector(limit=0)  # all 400 on the wire at once
    async with sidecars(env, tmp_path) as started, aiohttp.ClientSession(connector=connector) as session:
        urls = [url for _, url in started]
        account, key = await funded_key(session, urls[0], GRANTED)
        keys = KeySpace(prefix, 16).account(account)

        async def settled() -> bool:
            return (await money(redis_client, keys.balance))[1] == 0

        async with sampling(redis_client, keys.balance) as sampler:
            await until("the first balance sample", sampler.sampled)
            assert sampler.samples[-1] == (GRANTED, 0)
            outcomes = await all_at_once(gated, session, urls, key, redis_client, keys)
            # A stream settles once its last event is relayed: wait for the last hold to go.
            await until("every hold settled", settled)

        ok = [o for o in outcomes if o.status == 200]
        assert len(ok) == FIT
        assert sum(o.status == 402 for o in outcomes) == REQUESTS - FIT
        assert {o.streamed for o in ok} == {True, False}, "both kinds of answer were admitted"
        charges = {o.request_id: priced(o.usage) for o in ok if o.usage is not None}
        assert len(charges) == FIT  # every answer reported its usage, each under a request id of its own
        assert set(charges.values()) == {HOLD}
        assert all(o.charged == HOLD for o in ok if not o.streamed)  # the header agrees with the usage

        balance, held = await money(redis_client, keys.balance)
        assert await redis_client.hlen(keys.holds) == 0
        # Money is conserved, and the one admission too many (charged HOLD too) would have left it below 0.
        assert balance + held + sum(charges.values()) == GRANTED
        assert balance == HOLD - 1 >= 0
        assert len(sampler.samples) > 1
        assert sampler.lowest_available >= 0, "the account's holds exceeded its balance"
        assert min(b for b, _ in sampler.samples) >= 0
        # Redis' own record of each debit: the request's settled marker holds its charge.
        redis_debits = {rid: whole(await redis_client.get(keys.settled(rid))) for rid in charges}
        assert redis_debits == charges

        # The flush: every process runs a flusher of the one consumer group; wait for the outbox to empty
        # (entries are deleted only after their batch committed) with nothing pending.
        async def drained() -> bool:
            pending = await redis_client.xpending(keys.outbox, GROUP)
            return await redis_client.xlen(keys.outbox) == 0 and pending["pending"] == 0

        await until("the outbox drained", drained)
        for served, _ in started:
            assert await served.stop() == 0, served.log

    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT idempotency_id, amount FROM ledger WHERE account_id = $1 AND kind = 'usage'", account
        )
        ledger_sum = await conn.fetchval(
            "SELECT sum(amount) FROM ledger WHERE account_id = $1 AND applied", account
        )
        folded = await conn.fetchval(
            "SELECT a.balance + coalesce((SELECT sum(delta) FROM ledger_balance_deltas d"
            " WHERE d.account_id = a.id), 0) FROM accounts a WHERE a.id = $1",
            account,
        )
    finally:
        await conn.close()
    ids = [r["idempotency_id"] for r in rows]
    assert len(ids) == len(set(ids)) == FIT  # each request id once, none of the refused ones
    assert {r["idempotency_id"]: -r["amount"] for r in rows} == redis_debits
    assert sum(-r["amount"] for r in rows) == sum(redis_debits.values())
    assert int(ledger_sum) == int(folded) == balance
