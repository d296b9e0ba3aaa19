"""Idempotency-Key on the metered routes, end to end: a real sidecar, Redis (one node and the cluster),
Postgres and the demo upstream over real HTTP, which counts its calls."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from sidecar.app import FLUSHER, PROXY, create_app
from sidecar.config import load_settings
from sidecar.errors import ConfigError
from sidecar.idempotency import Replays

from .conftest import Sidecar, SidecarFactory, Upstream, make_settings
from .support import HELLO, MODELS, pooled, post, settled, stream
from .support_gate import ArrivalGate, gated

pytestmark = pytest.mark.topologies  # money: on one Redis and on the cluster
__all__ = ["gated"]  # the fixture

CHAT = "/v1/chat/completions"
START = 10_000_000
# Not cacheable (temperature 0.7): only the Idempotency-Key can answer a retry of it.
BODY: dict[str, Any] = {"model": "test-model", "messages": HELLO, "temperature": 0.7, "max_tokens": 8}
CACHEABLE = {**BODY, "temperature": 0}
CHARGE = pooled(5 * 1000 + 8 * 2000)  # 5 prompt tokens, 8 completion tokens
KEY = {"Idempotency-Key": "order-42/attempt"}
REPLAY = "creditgate-idempotent-replay"


def replays(sc: Sidecar) -> Replays:
    return sc.client.app[PROXY].replays


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the event loop until `predicate` holds (bounded: a bug fails instead of hanging). The
    states watched (a flight's waiters) have no hook to notify on; this never sleeps for a guessed time."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0)


async def usage_ids(sc: Sidecar, account: str, rows: int) -> list[str]:
    """The request ids of the account's usage rows, once the flusher has written `rows` rows in all."""
    async with asyncio.timeout(30):
        await sc.client.app[FLUSHER].wait_for_rows(rows)
    found = await sc.services.store.pool.fetch(
        "SELECT idempotency_id FROM ledger WHERE kind = 'usage' AND account_id = $1", account
    )
    return sorted(r["idempotency_id"] for r in found)


async def idem_keys(sc: Sidecar, redis_client: Any) -> list[Any]:
    return [k async for k in redis_client.scan_iter(match=f"{sc.settings.key_prefix}*:idem:*")]


@pytest.mark.parametrize(
    ("settings", "body"),
    [({"cache_enabled": False}, BODY), ({}, BODY), ({}, CACHEABLE)],
    ids=["cache-off", "cache-bypassed", "cacheable"],
)
async def test_a_retry_gets_the_stored_answer_and_is_not_charged(
    make_sidecar: SidecarFactory, upstream: Upstream, settings: dict[str, Any], body: dict[str, Any]
) -> None:
    sc = await make_sidecar(models=MODELS, **settings)
    account, key = await sc.account(START)
    first = await post(sc, CHAT, body, key, **KEY)
    answer = await first.read()
    assert first.status == 200
    assert first.headers["x-creditgate-charged"] == str(CHARGE)
    assert REPLAY not in first.headers

    again = await post(sc, CHAT, body, key, **KEY)
    assert again.status == 200
    assert await again.read() == answer
    assert again.headers[REPLAY] == "true"
    assert again.headers["creditgate-original-request-id"] == first.headers["x-request-id"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["x-creditgate-charged"] == "0"
    assert again.headers["x-creditgate-balance"] == str(START - CHARGE)
    assert "X-Cache" not in again.headers  # a replay, not a cache hit
    assert upstream.calls("chat") == 1
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START - CHARGE, 0)

    # The replay wrote no usage row: behind the first request's row comes the next request's, not one of
    # the replay's (the account's entries reach the ledger in order).
    later = await post(sc, CHAT, body, key, **{"Idempotency-Key": "another"})
    assert later.headers["x-creditgate-charged"] == str(CHARGE if body is BODY else 0)
    expected = sorted([first.headers["x-request-id"], later.headers["x-request-id"]])
    assert await usage_ids(sc, account, rows=2) == expected


@pytest.mark.parametrize("include_usage", [False, True])
async def test_a_streamed_retry_is_replayed_byte_for_byte(
    make_sidecar: SidecarFactory, upstream: Upstream, include_usage: bool
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(START)
    body = {**BODY, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
    first, relayed = await stream(sc, CHAT, body, key, **KEY)
    assert first.status == 200
    await settled(sc)  # a stream's answer is stored when it is settled
    after_first = (await sc.balance(account))["balance"]
    assert after_first < START

    again, replayed = await stream(sc, CHAT, body, key, **KEY)
    assert again.status == 200
    assert again.headers["Content-Type"].startswith("text/event-stream")
    assert again.headers[REPLAY] == "true"
    assert replayed == relayed
    assert relayed.rstrip().endswith(b"data: [DONE]")
    assert (b'"choices":[]' in replayed) == include_usage  # the usage chunk only for who asked for it
    assert upstream.calls("chat") == 1
    assert (await sc.balance(account))["balance"] == after_first


async def test_a_stream_the_client_left_is_replayed_whole_to_its_retry(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    """The client goes away mid-stream; the sidecar reads the stream on to its end (and charges its
    usage): the retry gets the whole stream, free."""
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(START)
    body = {**BODY, "stream": True}
    left = await post(sc, CHAT, body, key, **KEY, **{"x-demo-token-delay-ms": "20"})
    assert (await left.content.readany()).startswith(b"data: ")
    left.close()  # gone before the end
    await settled(sc)
    charged = START - (await sc.balance(account))["balance"]
    assert charged == CHARGE  # the usage the drained stream reported
    again, replayed = await stream(sc, CHAT, body, key, **KEY)
    assert again.headers[REPLAY] == "true"
    assert replayed.rstrip().endswith(b"data: [DONE]")
    plain, whole = await stream(sc, CHAT, body, key)  # the same request without the key, for comparison
    assert REPLAY not in plain.headers
    assert replayed == whole
    assert upstream.calls("chat") == 2
    assert (await sc.balance(account))["balance"] == START - 2 * CHARGE


async def test_the_same_key_with_another_body_is_a_409_that_changes_nothing(
    make_sidecar: SidecarFactory, upstream: Upstream
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(START)
    assert (await post(sc, CHAT, BODY, key, **KEY)).status == 200
    for other in ({**BODY, "max_tokens": 9}, {**BODY, "stream": True}):
        resp = await post(sc, CHAT, other, key, **KEY)
        assert resp.status == 409
        error = (await resp.json())["error"]
        assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_reused")
        assert error["type"] == "invalid_request_error"
        assert "Idempotency-Key" in error["message"]
    # Another route with the same body is another request too.
    assert (await post(sc, "/v1/completions", BODY, key, **KEY)).status == 409
    assert upstream.calls() == 1
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START - CHARGE, 0)


@pytest.mark.parametrize(
    "value", ["", "x" * 256, "schlüssel", "tab\there"], ids=["empty", "256", "utf8", "tab"]
)
async def test_a_malformed_key_is_a_400_naming_the_header(
    make_sidecar: SidecarFactory, upstream: Upstream, value: str
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(START)
    resp = await sc.client.post(
        CHAT,
        data=aiohttp.JsonPayload(BODY),
        headers=[("Authorization", f"Bearer {key}"), ("Idempotency-Key", value)],
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["type"]) == ("Idempotency-Key", "invalid_request_error")
    assert upstream.calls() == 0
    assert (await sc.balance(account))["balance"] == START
    # The longest key that is allowed, and every printable character, are fine.
    for fine in ("k" * 255, "".join(chr(c) for c in range(0x21, 0x7F))):
        assert (await post(sc, CHAT, BODY, key, **{"Idempotency-Key": fine})).status == 200


async def test_two_values_of_the_header_are_a_400(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(START)
    resp = await sc.client.post(
        CHAT,
        data=aiohttp.JsonPayload(BODY),
        headers=[("Authorization", f"Bearer {key}"), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "Idempotency-Key"
    assert upstream.calls() == 0


# ---- concurrency -------------------------------------------------------------------------------------


async def test_two_concurrent_requests_with_one_key_make_one_upstream_call(
    make_sidecar: SidecarFactory, gated: tuple[Upstream, ArrivalGate]
) -> None:
    upstream, gate = gated
    sc = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    account, key = await sc.account(START)
    first = asyncio.create_task(post(sc, CHAT, BODY, key, **KEY))
    await until(lambda: gate.arrived == 1)
    second = asyncio.create_task(post(sc, CHAT, BODY, key, **KEY))
    await until(lambda: replays(sc).flights.waiting == 1)
    gate.set()
    a, b = await first, await second
    assert (a.status, b.status) == (200, 200)
    assert await a.read() == await b.read()
    assert (a.headers["x-creditgate-charged"], b.headers["x-creditgate-charged"]) == (str(CHARGE), "0")
    assert b.headers[REPLAY] == "true"
    assert b.headers["creditgate-original-request-id"] == a.headers["x-request-id"]
    assert gate.arrived == 1
    assert upstream.calls("chat") == 1
    state = await sc.balance(account)
    assert (state["balance"], state["held"]) == (START - CHARGE, 0)


async def test_a_concurrent_request_with_the_key_and_another_body_waits_then_gets_a_409(
    make_sidecar: SidecarFactory, gated: tuple[Upstream, ArrivalGate]
) -> None:
    upstream, gate = gated
    sc = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    account, key = await sc.account(START)
    first = asyncio.create_task(post(sc, CHAT, BODY, key, **KEY))
    await until(lambda: gate.arrived == 1)
    other = asyncio.create_task(post(sc, CHAT, {**BODY, "max_tokens": 3}, key, **KEY))
    await until(lambda: replays(sc).flights.waiting == 1)
    gate.set()
    assert (await first).status == 200
    conflict = await other
    assert conflict.status == 409
    assert (await conflict.json())["error"]["code"] == "idempotency_key_reused"
    assert gate.arrived == 1
    assert (await sc.balance(account))["balance"] == START - CHARGE


async def test_a_request_in_flight_on_another_sidecar_is_a_409_in_progress(
    make_sidecar: SidecarFactory,
    gated: tuple[Upstream, ArrivalGate],
    redis_url: str,
    database_url: str,
    aiohttp_client: Any,
) -> None:
    """Two sidecars on one Redis: the first's hold claims the key, so the second does not go upstream
    too; once the first is answered, the second replays its answer."""
    upstream, gate = gated
    one = await make_sidecar(models=MODELS, upstream_url=upstream.url)
    two_settings = make_settings(
        redis_url, database_url, upstream_url=upstream.url, models=MODELS, key_prefix=one.settings.key_prefix
    )
    two = Sidecar(await aiohttp_client(create_app(two_settings)), two_settings)
    account, key = await one.account(START)
    first = asyncio.create_task(post(one, CHAT, BODY, key, **KEY))
    await until(lambda: gate.arrived == 1)
    async with asyncio.timeout(30):  # a bound: without the claim it would wait at the gate
        busy = await post(two, CHAT, BODY, key, **KEY)
    assert busy.status == 409
    error = (await busy.json())["error"]
    assert (error["param"], error["code"]) == ("Idempotency-Key", "idempotency_key_in_progress")
    gate.set()
    assert (await first).status == 200
    await settled(one)
    again = await post(two, CHAT, BODY, key, **KEY)
    assert (again.status, again.headers[REPLAY]) == (200, "true")
    assert gate.arrived == 1
    assert (await one.balance(account))["balance"] == START - CHARGE


# ---- what is not stored --------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", [{"x-demo-status": "500"}, {"x-demo-status": "429"}], ids=["500", "429"])
async def test_a_failed_answer_is_not_stored_so_the_retry_goes_upstream(
    make_sidecar: SidecarFactory, upstream: Upstream, redis_client: Any, failure: dict[str, str]
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(START)
    failed = await post(sc, CHAT, BODY, key, **KEY, **failure)
    assert (failed.status, failed.headers["x-creditgate-charged"]) == (int(failure["x-demo-status"]), "0")
    assert await idem_keys(sc, redis_client) == []  # nothing stored, the claim released
    retried = await post(sc, CHAT, BODY, key, **KEY)
    assert (retried.status, retried.headers["x-creditgate-charged"]) == (200, str(CHARGE))
    assert REPLAY not in retried.headers
    assert upstream.calls("chat") == 2
    assert (await post(sc, CHAT, BODY, key, **KEY)).headers[REPLAY] == "true"  # now it is stored
    assert upstream.calls("chat") == 2
    assert (await sc.balance(account))["balance"] == START - CHARGE


async def test_a_cut_stream_is_not_stored(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS)
    _, key = await sc.account(START)
    body = {**BODY, "stream": True}
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream(sc, CHAT, body, key, **KEY, **{"x-demo-cut-after": "3"})
    await settled(sc)
    retried, events = await stream(sc, CHAT, body, key, **KEY)
    assert REPLAY not in retried.headers
    assert events.rstrip().endswith(b"data: [DONE]")
    assert upstream.calls("chat") == 2


async def test_a_402_is_not_stored(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(0)
    assert (await post(sc, CHAT, BODY, key, **KEY)).status == 402
    await sc.admin("POST", f"/accounts/{account}/grants", {"amount": START}, **{"Idempotency-Key": "g1"})
    paid = await post(sc, CHAT, BODY, key, **KEY)
    assert (paid.status, paid.headers["x-creditgate-charged"]) == (200, str(CHARGE))
    assert upstream.calls("chat") == 1


async def test_an_unreachable_upstream_is_not_stored(make_sidecar: SidecarFactory, redis_client: Any) -> None:
    sc = await make_sidecar(models=MODELS, upstream_url="http://127.0.0.1:9/v1")
    account, key = await sc.account(START)
    for _ in range(2):  # the retry is tried again (no 409: nothing stored, the claim released)
        resp = await post(sc, CHAT, BODY, key, **KEY)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert await idem_keys(sc, redis_client) == []
    assert (await sc.balance(account))["balance"] == START


# ---- scope and lifetime ------------------------------------------------------------------------------


async def test_keys_are_the_accounts_own(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS)
    account_a, key_a = await sc.account(START)
    account_b, key_b = await sc.account(START)
    a = await post(sc, CHAT, BODY, key_a, **KEY)
    b = await post(sc, CHAT, {**BODY, "max_tokens": 4}, key_b, **KEY)  # another body: not a conflict
    assert (a.status, b.status) == (200, 200)
    assert REPLAY not in b.headers
    assert upstream.calls("chat") == 2
    again_a = await post(sc, CHAT, BODY, key_a, **KEY)
    again_b = await post(sc, CHAT, {**BODY, "max_tokens": 4}, key_b, **KEY)
    assert again_a.headers["creditgate-original-request-id"] == a.headers["x-request-id"]
    assert again_b.headers["creditgate-original-request-id"] == b.headers["x-request-id"]
    assert upstream.calls("chat") == 2
    assert (await sc.balance(account_a))["balance"] == START - CHARGE
    assert (await sc.balance(account_b))["balance"] == START - pooled(5 * 1000 + 4 * 2000)


@pytest.mark.parametrize("ttl", [None, 120])
async def test_an_answer_is_kept_for_the_ttl_then_the_key_is_new(
    make_sidecar: SidecarFactory, upstream: Upstream, redis_client: Any, ttl: int | None
) -> None:
    sc = await make_sidecar(models=MODELS, **({"idempotency_ttl_seconds": ttl} if ttl else {}))
    account, key = await sc.account(START)
    await post(sc, CHAT, BODY, key, **KEY)
    (entry,) = await idem_keys(sc, redis_client)
    ttl_ms = (ttl or 86_400) * 1000
    assert ttl_ms - 60_000 < await redis_client.pttl(entry) <= ttl_ms
    await redis_client.delete(entry)  # what Redis does once the TTL ran out
    after = await post(sc, CHAT, BODY, key, **KEY)
    assert (after.status, after.headers["x-creditgate-charged"]) == (200, str(CHARGE))
    assert REPLAY not in after.headers
    assert upstream.calls("chat") == 2
    assert (await sc.balance(account))["balance"] == START - 2 * CHARGE


async def test_turned_off_the_header_is_ignored(make_sidecar: SidecarFactory, upstream: Upstream) -> None:
    sc = await make_sidecar(models=MODELS, idempotency_enabled=False)
    account, key = await sc.account(START)
    for value in ("k", ""):  # not even validated
        resp = await post(sc, CHAT, BODY, key, **{"Idempotency-Key": value})
        assert (resp.status, resp.headers["x-creditgate-charged"]) == (200, str(CHARGE))
    assert upstream.calls("chat") == 2
    assert (await sc.balance(account))["balance"] == START - 2 * CHARGE


async def test_the_first_answer_stays(make_sidecar: SidecarFactory, redis_client: Any) -> None:
    """The settle script stores an answer over nothing or its own request's claim only: never over
    another request's answer (a later one that did not look the key up, such as a collapsed cache hit)
    or its claim."""
    sc = await make_sidecar(models=MODELS)
    account, _ = await sc.account(START)
    b = sc.balances
    key = sc.services.keys.account(account).idempotent("k" * 64)
    lease = 2**42
    assert (await b.reserve(account, "req_1", 100, lease, idempotency_key=key)).status.name == "HELD"
    assert (await b.reserve(account, "req_2", 100, lease, idempotency_key=key)).status.name == "IN_PROGRESS"
    await b.settle(account, "req_3", 0, record=True, idempotency=(key, b"another", 60_000))
    assert await redis_client.get(key) == b"pending:req_1"  # the claim stays
    await b.settle(account, "req_1", 50, idempotency=(key, b"first", 60_000))
    await b.settle(account, "req_4", 0, record=True, idempotency=(key, b"later", 60_000))
    found = await b.reserve(account, "req_5", 100, lease, idempotency_key=key)
    assert (found.status.name, found.replay, found.cached, found.balance) == (
        "CACHED",
        True,
        b"first",
        START - 50,
    )
    assert (await sc.balance(account))["held"] == 0


def test_the_replay_headers_are_never_relayed_from_an_upstream() -> None:
    """An upstream cannot pass an answer off as a replay: the operator cannot relay those headers."""
    for name in ("creditgate-idempotent-replay", "creditgate-original-request-id", "creditgate-*"):
        with pytest.raises(ConfigError, match="relay_response_headers"):
            load_settings(environ={"CREDITGATE_RELAY_RESPONSE_HEADERS": name})
