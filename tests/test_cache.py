"""The response cache end to end: real sidecar, Redis and Postgres; the demo upstream counts its calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from sidecar.app import FLUSHER, PROXY
from sidecar.cache import ResponseCache
from sidecar.demo import GATE, create_demo_upstream
from sidecar.errors import UnknownAccount

from .conftest import Sidecar, SidecarFactory, Upstream
from .support import HELLO, MODELS, pooled, post, sdk, settled
from .support import events as _events
from .support import stream as _stream

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster

CHAT = "/v1/chat/completions"
START = 10_000_000
BODY: dict[str, Any] = {"model": "test-model", "messages": HELLO, "temperature": 0, "max_tokens": 8}
CHARGE = pooled(5 * 1000 + 8 * 2000)  # 5 prompt tokens, 8 completion tokens


@pytest.fixture
async def priced(make_sidecar: SidecarFactory) -> Sidecar:
    return await make_sidecar(models=MODELS)


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until `predicate` holds (bounded, so a bug fails instead of hanging)."""
    # The states watched (the upstream's call counter, the cache's waiters) have no hook to notify on;
    # this polls them without ever sleeping for a guessed time.
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)


async def ledger_row(sc: Sidecar, request_id: str, rows: int) -> Any:
    """The ledger row of `request_id`, once the sidecar's flusher has written `rows` rows in all."""
    await sc.client.app[FLUSHER].wait_for_rows(rows)
    return await sc.services.store.pool.fetchrow(
        "SELECT amount, saved, outcome, prompt_tokens, completion_tokens FROM ledger"
        " WHERE idempotency_id = $1",
        request_id,
    )


async def test_second_identical_request_is_a_free_hit(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(START)
    first = await post(priced, CHAT, BODY, key)
    answer = await first.read()
    assert first.status == 200
    assert first.headers["X-Cache"] == "MISS"
    assert first.headers["Cache-Status"] == "creditgate; fwd=miss; stored"
    assert first.headers["x-creditgate-charged"] == str(CHARGE)
    before = await priced.balance(account)

    # Fields that cannot change the answer, and another spelling of temperature 0, share the entry.
    second = await post(priced, CHAT, {**BODY, "user": "u-1", "temperature": 0.0}, key)
    assert second.status == 200
    assert await second.read() == answer
    assert second.headers["X-Cache"] == "HIT"
    assert second.headers["Cache-Status"].startswith("creditgate; hit; ttl=")
    assert second.headers["Age"].isdigit()
    assert second.headers["Content-Type"].startswith("application/json")
    assert second.headers["x-creditgate-charged"] == "0"
    assert second.headers["x-creditgate-balance"] == str(before["balance"])
    assert upstream.calls("chat") == 1
    assert await priced.balance(account) == before

    # The hit is recorded: a zero-charge usage row with the credits it saved.
    hit = await ledger_row(priced, second.headers["x-request-id"], rows=2)
    assert dict(hit) == {
        "amount": 0,
        "saved": CHARGE,
        "outcome": "cache_hit",
        "prompt_tokens": 5,
        "completion_tokens": 8,
    }
    miss = await ledger_row(priced, first.headers["x-request-id"], rows=2)
    assert (miss["amount"], miss["saved"], miss["outcome"]) == (-CHARGE, None, "ok")


@pytest.mark.parametrize(
    "change",
    [{"temperature": 0.7}, {"temperature": None}, {"n": 2}],
    ids=["temperature-0.7", "default-temperature", "n-2"],
)
async def test_non_deterministic_requests_are_never_cached(
    priced: Sidecar, upstream: Upstream, change: dict[str, Any]
) -> None:
    account, key = await priced.account(START)
    body = {k: v for k, v in {**BODY, **change}.items() if v is not None}
    charges = []
    for _ in range(2):
        resp = await post(priced, CHAT, body, key)
        assert resp.status == 200
        assert resp.headers["X-Cache"] == "MISS"
        assert resp.headers["Cache-Status"] == "creditgate; fwd=bypass"
        charges.append(int(resp.headers["x-creditgate-charged"]))
    assert upstream.calls("chat") == 2
    assert all(charge > 0 for charge in charges)
    assert (await priced.balance(account))["balance"] == START - sum(charges)


async def test_embeddings_are_cached_whatever_the_temperature(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(START)
    body = {"model": "test-embed", "input": "one two three"}
    first = await post(priced, "/v1/embeddings", body, key)
    second = await post(priced, "/v1/embeddings", body, key)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert await first.read() == await second.read()
    assert upstream.calls("embeddings") == 1


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_hit_replays_byte_identical_events(
    priced: Sidecar, upstream: Upstream, include_usage: bool
) -> None:
    account, key = await priced.account(START)
    body = {**BODY, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    first, missed = await _stream(priced, CHAT, body, key)
    assert first.headers["X-Cache"] == "MISS"
    await settled(priced)  # a stream is stored when it has been settled
    before = await priced.balance(account)
    second, hit = await _stream(priced, CHAT, body, key)
    assert second.status == 200
    assert second.headers["Content-Type"].startswith("text/event-stream")
    assert second.headers["X-Cache"] == "HIT"
    assert hit == missed
    assert len(_events(hit)) == 8 + 1 + include_usage  # 8 tokens, [DONE], the usage chunk if asked for
    assert upstream.calls("chat") == 1
    assert (await priced.balance(account))["balance"] == before["balance"]

    # The non-streamed form of the same request is an entry of its own.
    plain = await post(priced, CHAT, BODY, key)
    assert plain.headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2


async def test_streamed_hit_keeps_the_usage_chunk_only_for_clients_that_ask(
    priced: Sidecar, upstream: Upstream
) -> None:
    _, key = await priced.account(START)
    streamed = {**BODY, "stream": True}
    _, with_usage = await _stream(priced, CHAT, {**streamed, "stream_options": {"include_usage": True}}, key)
    await settled(priced)
    resp, without = await _stream(priced, CHAT, streamed, key)
    assert resp.headers["X-Cache"] == "HIT"
    assert _events(without) == [e for e in _events(with_usage) if b'"choices":[]' not in e]
    assert upstream.calls("chat") == 1


async def test_another_account_misses_unless_the_scope_is_shared(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    private = await make_sidecar(models=MODELS)
    _, key_a = await private.account(START)
    _, key_b = await private.account(START)
    assert (await post(private, CHAT, BODY, key_a)).headers["X-Cache"] == "MISS"
    assert (await post(private, CHAT, BODY, key_b)).headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2

    shared = await make_sidecar(models=MODELS, cache_scope="shared")
    _, key_c = await shared.account(START)
    account_d, key_d = await shared.account(START)
    assert (await post(shared, CHAT, BODY, key_c)).headers["X-Cache"] == "MISS"
    hit = await post(shared, CHAT, BODY, key_d)
    assert (hit.headers["X-Cache"], hit.headers["x-creditgate-charged"]) == ("HIT", "0")
    assert (await shared.balance(account_d))["balance"] == START
    assert upstream.calls("chat") == 3


async def test_no_cache_skips_the_lookup_but_stores(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(START)
    first = await post(priced, CHAT, BODY, key, **{"Cache-Control": "no-cache"})
    assert first.headers["Cache-Status"] == "creditgate; fwd=request; stored"
    assert (await post(priced, CHAT, BODY, key)).headers["X-Cache"] == "HIT"
    assert upstream.calls("chat") == 1
    again = await post(priced, CHAT, BODY, key, **{"Cache-Control": "no-cache"})
    assert again.headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2


async def test_no_store_neither_looks_up_nor_stores(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(START)
    first = await post(priced, CHAT, BODY, key, **{"Cache-Control": "no-store"})
    assert first.headers["Cache-Status"] == "creditgate; fwd=bypass"
    stored = await post(priced, CHAT, BODY, key)
    assert stored.headers["Cache-Status"] == "creditgate; fwd=miss; stored"  # nothing was there
    assert upstream.calls("chat") == 2
    again = await post(priced, CHAT, BODY, key, **{"Cache-Control": "no-store"})
    assert again.headers["X-Cache"] == "MISS"  # an entry exists now, but no-store does not look
    assert upstream.calls("chat") == 3


@pytest.mark.parametrize(
    "failure",
    [{"x-demo-status": "500"}, {"x-demo-no-usage": "1"}],
    ids=["upstream-500", "no-usage"],
)
async def test_failed_answers_are_never_stored(
    priced: Sidecar, upstream: Upstream, failure: dict[str, str]
) -> None:
    account, key = await priced.account(START)
    failed = await post(priced, CHAT, BODY, key, **failure)
    # An error costs nothing; an answer without usage is charged the estimate (no_usage_charge).
    estimate = int(failed.headers["x-creditgate-charged"])
    assert (estimate > 0) == ("x-demo-no-usage" in failure)
    after = await post(priced, CHAT, BODY, key)
    assert after.headers["Cache-Status"] == "creditgate; fwd=miss; stored"
    assert upstream.calls("chat") == 2
    assert (await priced.balance(account))["balance"] == START - CHARGE - estimate


async def test_a_cut_stream_is_never_stored(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(START)
    body = {**BODY, "stream": True}
    with pytest.raises(aiohttp.ClientPayloadError):
        await _stream(priced, CHAT, body, key, **{"x-demo-cut-after": "3"})
    await settled(priced)
    resp, _ = await _stream(priced, CHAT, body, key)
    assert resp.headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2


async def test_an_answer_over_the_size_cap_is_not_stored(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS, cache_max_entry_bytes=200)  # the demo's answer is ~400 bytes
    _, key = await sc.account(START)
    first = await post(sc, CHAT, BODY, key)
    assert first.headers["Cache-Status"] == "creditgate; fwd=miss"
    assert (await post(sc, CHAT, BODY, key)).headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2
    cache = sc.client.app[PROXY].cache
    assert cache is not None
    assert cache.stats.too_large == 2


async def test_a_request_over_the_cacheable_size_is_never_keyed(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    """A big cacheable body is not decoded for a cache key before its balance is checked: on an empty
    account it is a 402 at once (a key over this body, whose text is not UTF-8, would have been a 400),
    and on a funded one it bypasses the cache."""
    sc = await make_sidecar(models=MODELS, cache_max_request_bytes=1000)
    _, empty = await sc.account(0)
    big = b'{"model":"test-model","temperature":0,"messages":[{"role":"user","content":"' + b"\xff" * 2000
    resp = await sc.client.post(
        CHAT,
        data=big + b'"}]}',
        headers={"Authorization": f"Bearer {empty}", "Content-Type": "application/json"},
    )
    assert resp.status == 402
    _, key = await sc.account(START)
    body = {**BODY, "messages": [{"role": "user", "content": "x " * 600}]}
    first = await post(sc, CHAT, body, key)
    assert first.headers["Cache-Status"] == "creditgate; fwd=bypass"
    assert (await post(sc, CHAT, body, key)).headers["X-Cache"] == "MISS"
    assert upstream.calls("chat") == 2


async def test_entries_expire_after_the_ttl(make_sidecar: SidecarFactory, redis_client: Any) -> None:
    sc = await make_sidecar(models=MODELS, cache_ttl_seconds=120)
    _, key = await sc.account(START)
    await post(sc, CHAT, BODY, key)
    entries = [k async for k in redis_client.scan_iter(match=f"{sc.settings.key_prefix}*:cache:*")]
    assert len(entries) == 1
    assert 0 < await redis_client.pttl(entries[0]) <= 120_000


async def test_a_hit_is_served_at_zero_balance(priced: Sidecar, upstream: Upstream) -> None:
    account, key = await priced.account(START)
    assert (await post(priced, CHAT, BODY, key)).status == 200
    remaining = (await priced.balance(account))["balance"]
    await priced.balances.settle(account, "req_spend_the_rest", remaining)
    assert (await priced.balance(account))["balance"] == 0
    assert (await post(priced, CHAT, {**BODY, "temperature": 0.5}, key)).status == 402
    hit = await post(priced, CHAT, BODY, key)
    assert (hit.status, hit.headers["X-Cache"], hit.headers["x-creditgate-balance"]) == (200, "HIT", "0")
    assert upstream.calls("chat") == 1


async def test_cache_disabled_sends_no_cache_headers(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS, cache_enabled=False)
    _, key = await sc.account(START)
    for _ in range(2):
        resp = await post(sc, CHAT, BODY, key)
        assert resp.status == 200
        assert "X-Cache" not in resp.headers
        assert "Cache-Status" not in resp.headers
    assert upstream.calls("chat") == 2


async def test_a_route_left_out_of_cache_routes_bypasses(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS, cache_routes=["embeddings"])
    _, key = await sc.account(START)
    for _ in range(2):
        assert (await post(sc, CHAT, BODY, key)).headers["Cache-Status"] == "creditgate; fwd=bypass"
    assert upstream.calls("chat") == 2


# ---- single flight ---------------------------------------------------------------------------------


@pytest.fixture
async def gated() -> AsyncIterator[tuple[Upstream, asyncio.Event]]:
    """The demo upstream, holding every request at a gate until the test opens it."""
    app = create_demo_upstream(["test-model"])
    gate = asyncio.Event()
    app[GATE] = gate
    server = TestServer(app)
    await server.start_server()
    yield Upstream(server, app, []), gate
    await server.close()


@dataclass
class Gated:
    """A sidecar in front of the gated upstream, with a funded account."""

    sc: Sidecar
    upstream: Upstream
    gate: asyncio.Event
    cache: ResponseCache
    account: str
    key: str


@pytest.fixture
async def gated_sidecar(make_sidecar: SidecarFactory, gated: tuple[Upstream, asyncio.Event]) -> Gated:
    upstream, gate = gated
    sc = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    cache = sc.client.app[PROXY].cache
    assert cache is not None
    account, key = await sc.account(START)
    return Gated(sc, upstream, gate, cache, account, key)


async def test_50_concurrent_identical_misses_make_one_upstream_call(gated_sidecar: Gated) -> None:
    g = gated_sidecar
    sc, upstream, gate, cache, account, key = g.sc, g.upstream, g.gate, g.cache, g.account, g.key

    async def one() -> tuple[int, bytes, dict[str, str]]:
        resp = await post(sc, CHAT, BODY, key)
        return resp.status, await resp.read(), dict(resp.headers)

    tasks = [asyncio.create_task(one()) for _ in range(50)]
    await until(lambda: upstream.calls("chat") == 1 and cache.stats.waiting == 49)
    gate.set()
    results = await asyncio.gather(*tasks)

    assert upstream.calls("chat") == 1
    assert {status for status, _, _ in results} == {200}
    assert len({body for _, body, _ in results}) == 1
    charged = sorted(int(headers["x-creditgate-charged"]) for _, _, headers in results)
    assert charged == [0] * 49 + [CHARGE]
    statuses = sorted(headers["Cache-Status"] for _, _, headers in results)
    assert statuses[0] == "creditgate; fwd=miss; stored"
    assert all(s.startswith("creditgate; hit;") and s.endswith("; collapsed") for s in statuses[1:])
    assert sum(headers["X-Cache"] == "HIT" for _, _, headers in results) == 49
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START - CHARGE, 0)
    assert (cache.stats.misses, cache.stats.collapsed, cache.stats.waiting) == (1, 49, 0)


async def test_waiters_go_upstream_themselves_when_the_first_call_fails(gated_sidecar: Gated) -> None:
    g = gated_sidecar
    sc, upstream, gate, cache, account, key = g.sc, g.upstream, g.gate, g.cache, g.account, g.key
    leader = asyncio.create_task(post(sc, CHAT, BODY, key, **{"x-demo-status": "500"}))
    await until(lambda: upstream.calls("chat") == 1)
    waiters = [asyncio.create_task(post(sc, CHAT, BODY, key)) for _ in range(4)]
    await until(lambda: cache.stats.waiting == 4)
    gate.set()
    failed = await leader
    assert (failed.status, failed.headers["x-creditgate-charged"]) == (500, "0")
    answers = await asyncio.gather(*waiters)
    assert [r.status for r in answers] == [200] * 4
    # None was served the failed answer; each went upstream on its own and paid for its own call (one
    # that found another's answer already stored was a plain hit, free).
    assert cache.stats.collapsed == 0
    assert 2 <= upstream.calls("chat") <= 5
    charged = sum(int(r.headers["x-creditgate-charged"]) for r in answers)
    assert charged == CHARGE * (upstream.calls("chat") - 1)
    assert (await sc.balance(account))["balance"] == START - charged


async def test_openai_sdk_sees_the_hit_in_raw_headers(priced: Sidecar, upstream: Upstream) -> None:
    _, key = await priced.account(START)
    async with sdk(priced, key) as client:
        kwargs: dict[str, Any] = {"model": "test-model", "messages": HELLO, "temperature": 0, "max_tokens": 8}
        first = await client.chat.completions.with_raw_response.create(**kwargs)
        second = await client.chat.completions.with_raw_response.create(**kwargs)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.headers["x-creditgate-charged"] == "0"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert upstream.calls("chat") == 1


async def test_a_leader_whose_settle_finds_no_account_still_lets_its_waiters_go(
    gated_sidecar: Gated, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = gated_sidecar
    leader = asyncio.create_task(post(g.sc, CHAT, BODY, g.key))
    await until(lambda: g.upstream.calls("chat") == 1)
    waiter = asyncio.create_task(post(g.sc, CHAT, BODY, g.key))
    await until(lambda: g.cache.stats.waiting == 1)

    async def account_gone(account: str, *args: Any, **kwargs: Any) -> Any:
        raise UnknownAccount(account)  # deleted while the leader's request ran

    monkeypatch.setattr(g.sc.balances, "settle", account_gone)
    g.gate.set()
    async with asyncio.timeout(g.sc.settings.cache_wait_seconds / 2):  # not left waiting on the flight
        await leader
        answer = await waiter
    assert answer.status == 200  # it went upstream on its own
    assert g.upstream.calls("chat") == 2
    assert g.cache.stats.collapsed == 0
    assert g.cache.stats.waiting == 0
