"""What a client connection may hold: header and body deadlines, the idle limit, the connection cap.

The sidecar listens through the CLI's own listener (``serve._site``, the runner ``serve`` uses) on a real
port, in front of real Redis, Postgres and the demo upstream; the clients are raw sockets that behave as
slowloris, idle or over-the-cap clients do. One test runs a real ``creditgate serve`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import Settings

from .conftest import Upstream, make_settings, new_key_prefix, process_env, serve_process
from .support import admin_balance, funded_key, read_to_end, serving

BOUND = 30  # seconds any one step may take before the test fails (a guard, never a timing assertion)


@contextlib.asynccontextmanager
async def listening(settings: Settings) -> AsyncIterator[tuple[str, int]]:
    async with serving(settings) as (host, port, _):
        yield host, port


@pytest.fixture
def limited(redis_url: str, database_url: str, upstream: Upstream) -> Any:
    def settings(**overrides: Any) -> Settings:
        return make_settings(redis_url, database_url, upstream.url, **overrides)

    return settings


def error_of(answer: bytes) -> dict[str, Any]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert b"connection: close" in head.lower()
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


async def test_headers_that_do_not_arrive_in_time_get_a_408_and_the_connection_closes(limited: Any) -> None:
    settings = limited(header_read_timeout_seconds=0.3, keepalive_timeout_seconds=60)
    async with listening(settings) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: creditgate\r\nContent-Type: app")
        await writer.drain()
        error = error_of(await read_to_end(reader))
        assert error["code"] == "request_timeout"
        assert "header_read_timeout_seconds" in error["message"]
        writer.close()

        # A kept-alive connection: the deadline starts again with the next request's first byte.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\n\r\n")
        async with asyncio.timeout(BOUND):
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"}")  # the health body
        writer.write(b"GET /healthz HTTP/1.1\r\nHo")
        assert error_of(await read_to_end(reader))["code"] == "request_timeout"
        writer.close()


async def test_an_idle_connection_is_closed_after_keepalive_timeout(limited: Any) -> None:
    settings = limited(keepalive_timeout_seconds=0.3)
    async with listening(settings) as (host, port):
        reader, writer = await asyncio.open_connection(host, port)  # never sends anything
        assert await read_to_end(reader) == b""
        writer.close()
        reader, writer = await asyncio.open_connection(host, port)  # idle after one answer
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\n\r\n")
        answer = await read_to_end(reader)
        assert answer.startswith(b"HTTP/1.1 200")
        assert answer.count(b"HTTP/1.1") == 1  # one answer, then the close
        writer.close()


async def test_connections_over_the_cap_are_closed_at_once(limited: Any) -> None:
    settings = limited(max_connections=3, keepalive_timeout_seconds=60)
    async with listening(settings) as (host, port):
        kept = []
        for _ in range(3):  # three open, idle connections that each got an answer
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\n\r\n")
            async with asyncio.timeout(BOUND):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            kept.append((reader, writer))
        reader, writer = await asyncio.open_connection(host, port)
        with contextlib.suppress(ConnectionError):  # the server may already have closed it
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\n\r\n")
            await writer.drain()
        assert await read_to_end(reader) == b""  # closed unanswered: nothing read, nothing written
        writer.close()

        # One of the three leaves (the server closes it after this answer): a new connection is served.
        first_reader, first_writer = kept[0]
        first_writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\nConnection: close\r\n\r\n")
        assert (await read_to_end(first_reader)).count(b"HTTP/1.1 200") == 1
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: creditgate\r\nConnection: close\r\n\r\n")
        assert (await read_to_end(reader)).startswith(b"HTTP/1.1 200")
        for _, kept_writer in kept:
            kept_writer.close()


async def test_a_body_that_does_not_arrive_in_time_gets_a_408_and_holds_nothing(limited: Any) -> None:
    settings = limited(body_read_timeout_seconds=0.3, keepalive_timeout_seconds=60)
    async with listening(settings) as (host, port):
        account, key = await funded_key(host, port, 10_000_000)
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: creditgate\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\nContent-Length: 1000\r\n\r\n"
            b'{"model": "gpt-4o-mini", "messages": ['
        )
        await writer.drain()
        async with asyncio.timeout(BOUND):
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), head
            length = int(
                next(
                    line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                ).split(b":")[1]
            )
            error = json.loads(await reader.readexactly(length))["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "request_timeout"
        assert "body_read_timeout_seconds" in error["message"]
        assert (await admin_balance(host, port, account))["held"] == 0
        writer.close()


async def test_serve_applies_the_limits_to_both_listeners(
    redis_url: str, database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    env = process_env(
        redis_url,
        database_url,
        new_key_prefix(),
        upstream.url,
        CREDITGATE_OPS_HOST="127.0.0.1",
        CREDITGATE_OPS_PORT="0",
        CREDITGATE_RECONCILE_INTERVAL_SECONDS="0",
        CREDITGATE_HEADER_READ_TIMEOUT_SECONDS="0.3",
        CREDITGATE_KEEPALIVE_TIMEOUT_SECONDS="0.5",
        CREDITGATE_MAX_CONNECTIONS="2",
    )
    async with serve_process(env, tmp_path) as (served, url):
        ops = (await served.wait_for(r"creditgate ops listening on (http://[0-9.]+:[0-9]+)")).group(1)
        for base in (url, ops):  # each listener counts its own connections
            host, port = base.removeprefix("http://").rsplit(":", 1)
            slow_reader, slow_writer = await asyncio.open_connection(host, int(port))
            slow_writer.write(b"GET /healthz HTTP/1.1\r\nHo")
            idle_reader, idle_writer = await asyncio.open_connection(host, int(port))
            over_reader, over_writer = await asyncio.open_connection(host, int(port))
            assert await read_to_end(over_reader) == b""  # the third: over max_connections
            assert error_of(await read_to_end(slow_reader))["code"] == "request_timeout"
            assert await read_to_end(idle_reader) == b""  # closed by keepalive_timeout_seconds
            for writer in (slow_writer, idle_writer, over_writer):
                writer.close()
        assert await served.stop() == 0, served.log
    assert served.log.count("refused 1 connections over max_connections (2 open)") == 2
