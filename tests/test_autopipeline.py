"""The request path's auto-pipelined Redis connection, against real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import uuid
from collections.abc import AsyncIterator

import pytest
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url

from sidecar.autopipeline import AutoPipeline, pack, tls_context
from sidecar.health import READINESS

from .conftest import SidecarFactory
from .support import HELLO, MODELS, post


@pytest.mark.parametrize(
    ("args", "wire"),
    [
        (("PING",), b"*1\r\n$4\r\nPING\r\n"),
        (("SET", "k", 42), b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n42\r\n"),
        (("ECHO", b"a\r\nb"), b"*2\r\n$4\r\nECHO\r\n$4\r\na\r\nb\r\n"),  # binary-safe
        (("ECHO", "é"), b"*2\r\n$4\r\nECHO\r\n$2\r\n\xc3\xa9\r\n"),  # lengths in bytes
        (("INCRBY", "k", -7), b"*3\r\n$6\r\nINCRBY\r\n$1\r\nk\r\n$2\r\n-7\r\n"),
    ],
)
def test_commands_are_packed_as_resp_arrays(args: tuple[str | bytes | int, ...], wire: bytes) -> None:
    assert pack(args) == wire


@pytest.fixture
async def pipe(redis_url: str) -> AsyncIterator[AutoPipeline]:
    pipeline = AutoPipeline(redis_url)
    yield pipeline
    await pipeline.aclose()


async def test_concurrent_commands_get_their_own_replies(pipe: AutoPipeline) -> None:
    values = [f"v{i}-{uuid.uuid4().hex}".encode() for i in range(2000)]
    replies = await asyncio.gather(*(pipe.execute("ECHO", v) for v in values))
    assert replies == values


async def test_a_reply_error_raises_and_the_connection_goes_on(
    pipe: AutoPipeline, redis_client: Redis
) -> None:
    key = f"t{uuid.uuid4().hex}"
    await redis_client.hset(key, "f", "1")
    try:
        results = await asyncio.gather(
            pipe.execute("ECHO", "before"),
            pipe.execute("INCR", key),
            pipe.execute("ECHO", "after"),
            return_exceptions=True,
        )
    finally:
        await redis_client.delete(key)
    assert results[0] == b"before"
    assert isinstance(results[1], rx.ResponseError)
    assert "WRONGTYPE" in str(results[1])
    assert results[2] == b"after"


async def test_a_script_the_server_forgot_is_sent_whole(pipe: AutoPipeline, redis_client: Redis) -> None:
    script = f"return {{KEYS[1], ARGV[1], '{uuid.uuid4().hex}'}}"  # text no one ever loaded
    sha = hashlib.sha1(script.encode()).hexdigest()
    assert await redis_client.script_exists(sha) == [False]  # so EVALSHA alone answers NOSCRIPT
    tag = script.split("'")[1].encode()
    assert await pipe.evalsha(sha, script, ["k"], [7]) == [b"k", b"7", tag]
    assert await pipe.evalsha(sha, script, ["k2"], ["x"]) == [b"k2", b"x", tag]


async def test_a_server_that_stops_answering_fails_the_waiting_commands(redis_url: str) -> None:
    pipe = AutoPipeline(redis_url, timeout=0.2)
    try:
        # BLPOP keeps the connection busy for 1 s: to the watchdog, a server that stopped answering.
        blocked = [
            asyncio.create_task(pipe.execute("BLPOP", f"t{uuid.uuid4().hex}", "1")),
            asyncio.create_task(pipe.execute("ECHO", "queued behind it")),
        ]
        for task in blocked:
            with pytest.raises(rx.TimeoutError):
                await task
        # That connection is closed (so no late reply can be handed to a later command); the next call
        # opens another.
        assert await pipe.execute("ECHO", "mine") == b"mine"
    finally:
        await pipe.aclose()


async def test_a_cancelled_caller_does_not_shift_the_replies(pipe: AutoPipeline) -> None:
    assert await pipe.execute("PING") == b"PONG"  # connected: the next command is written when sent
    slow = asyncio.create_task(pipe.execute("BLPOP", f"t{uuid.uuid4().hex}", "0.3"))
    await asyncio.sleep(0)  # one loop turn: the task has written BLPOP and waits for its reply
    slow.cancel()
    # Redis still answers BLPOP (nil, after 0.3 s) before this ECHO: that reply is dropped, not handed on.
    assert await pipe.execute("ECHO", "mine") == b"mine"
    assert slow.cancelled()


async def test_a_killed_connection_fails_its_commands_and_the_next_call_reconnects(
    pipe: AutoPipeline, redis_client: Redis
) -> None:
    first_id = await pipe.execute("CLIENT", "ID")
    blocked = asyncio.create_task(pipe.execute("BLPOP", f"t{uuid.uuid4().hex}", "5"))
    await redis_client.client_kill_filter(_id=first_id)
    with pytest.raises(rx.ConnectionError):
        await blocked
    second_id = await pipe.execute("CLIENT", "ID")
    assert second_id != first_id
    assert await pipe.execute("ECHO", "again") == b"again"


async def test_the_database_in_the_url_is_selected(redis_url: str, redis_client: Redis) -> None:
    url = f"{redis_url}{'&' if '?' in redis_url else '?'}db=3"
    pipe = AutoPipeline(url)
    key = f"t{uuid.uuid4().hex}"
    try:
        await pipe.execute("SET", key, "in-db-3")
        db3 = Redis.from_url(url)
        assert await db3.get(key) == b"in-db-3"
        assert await redis_client.get(key) is None  # not in the test's own database
        await db3.delete(key)
        await db3.aclose()
    finally:
        await pipe.aclose()


async def test_an_unreachable_server_is_a_connection_error() -> None:
    pipe = AutoPipeline("redis://127.0.0.1:9/0", connect_timeout=2)
    with pytest.raises(rx.ConnectionError):
        await pipe.execute("PING")


async def test_a_request_whose_redis_is_unreachable_gets_503_and_moves_no_money(
    make_sidecar: SidecarFactory,
) -> None:
    sc = await make_sidecar(models=MODELS)
    account, key = await sc.account(1_000_000)
    live = sc.balances.pipeline
    sc.balances.pipeline = AutoPipeline("redis://127.0.0.1:9/0", connect_timeout=1)  # nothing listens
    try:
        resp = await post(sc, "/v1/chat/completions", {"model": "tm", "messages": HELLO}, key)
        body = await resp.json()
    finally:
        sc.balances.pipeline = live
    assert resp.status == 503
    assert body["error"]["code"] == "service_unavailable"
    state = await sc.balance(account)
    assert (state["balance"], state["held"], state["holds"]) == (1_000_000, 0, [])
    assert (await post(sc, "/v1/chat/completions", {"model": "tm", "messages": HELLO}, key)).status == 200


@pytest.mark.parametrize(
    ("url", "verify", "check_hostname"),
    [
        ("rediss://redis.example:6380/0", ssl.CERT_REQUIRED, True),
        ("rediss://redis.example:6380/0?ssl_cert_reqs=required", ssl.CERT_REQUIRED, True),
        ("rediss://redis.example:6380/0?ssl_check_hostname=false", ssl.CERT_REQUIRED, False),
        ("rediss://redis.example:6380/0?ssl_cert_reqs=optional", ssl.CERT_OPTIONAL, False),
        ("rediss://redis.example:6380/0?ssl_cert_reqs=none", ssl.CERT_NONE, False),
    ],
)
def test_tls_follows_the_url(url: str, verify: ssl.VerifyMode, check_hostname: bool) -> None:
    context = tls_context(parse_url(url))
    assert context is not None
    assert (context.verify_mode, context.check_hostname) == (verify, check_hostname)


def test_plain_urls_use_no_tls() -> None:
    assert tls_context(parse_url("redis://127.0.0.1:6379/0")) is None
    assert tls_context(parse_url("unix:///tmp/redis.sock")) is None


def test_a_missing_ca_file_is_an_error_not_a_silent_default() -> None:
    with pytest.raises(FileNotFoundError):
        tls_context(parse_url("rediss://h:6380/0?ssl_ca_certs=/nonexistent/ca.pem"))


async def test_readiness_checks_the_request_paths_own_connection(make_sidecar: SidecarFactory) -> None:
    sc = await make_sidecar(models=MODELS, readiness_grace_seconds=0)
    assert (await sc.client.get("/readyz")).status == 200
    live = sc.balances.pipeline
    sc.balances.pipeline = AutoPipeline("redis://127.0.0.1:9/0", connect_timeout=1)
    try:
        readiness = sc.client.app[READINESS]
        await readiness.check()  # the first failure starts the (zero-length) grace window
        ready, reason = await readiness.check()
    finally:
        sc.balances.pipeline = live
    assert not ready  # redis-py's connections still answer; the request path's does not
    assert "ConnectionError" in reason
