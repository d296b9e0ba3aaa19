"""One shared, auto-pipelined Redis connection for the money scripts on the request path.

redis-py's asyncio client spends far more CPU per command than Redis does: a pool checkout under a lock
and a condition, and on Python 3.11 a Task per command for its socket timeout (the overhead benchmark
measured about a third of the sidecar's CPU there). Here every request's commands share one connection:
the commands issued in one event-loop turn go out in one write, and since Redis answers a connection's
commands in order, each reply resolves the oldest waiting future. Under load that batches dozens of
scripts per write and read; at low load it is one round trip, as before.

Only what the hot path needs: EVALSHA (falling back to EVAL when the server lost its script cache), and
single commands. Errors are redis-py's exception types, so callers handle them as before: a reply error
is a ``ResponseError`` (``NoScriptError`` for NOSCRIPT), a dead or unreachable server a
``ConnectionError``, a call slower than ``timeout`` a ``TimeoutError``. A lost connection fails the
commands waiting on it and is reopened by the next call. Like redis-py's own retries, a caller retrying a
failed script may run it twice: every money script is idempotent by an id.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import SSLConnection, parse_url

Arg = str | bytes | int
_INCOMPLETE = object()


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


def reply_error(error: hiredis.ReplyError) -> rx.ResponseError:
    message = str(error)
    return rx.NoScriptError(message) if message.startswith("NOSCRIPT") else rx.ResponseError(message)


class _Connection(asyncio.Protocol):
    """The wire: queued commands written once per loop turn, replies matched to futures in order."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.outgoing: list[bytes] = []
        self.closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed is not None:
            raise rx.ConnectionError(f"Redis connection lost: {self.closed!r}")
        future: asyncio.Future[Any] = self.loop.create_future()
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing.append(command)
        self.waiting.append(future)
        return future

    def _flush(self) -> None:
        if self.transport is not None and self.outgoing and self.closed is None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not _INCOMPLETE:
            future = self.waiting.popleft()
            if not future.done():  # a caller that timed out or was cancelled: its reply is dropped
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = exc or rx.ConnectionError("closed by the server")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(rx.ConnectionError(f"Redis connection lost: {self.closed!r}"))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AutoPipeline:
    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        self.params = parse_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._opening: asyncio.Lock | None = None

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (a reply error raises)."""
        connection = self._connection
        if connection is None or connection.closed is not None:
            connection = await self._open()
        try:
            async with asyncio.timeout(self.timeout):
                reply = await connection.send(pack(args))
        except TimeoutError:
            raise rx.TimeoutError(f"Redis did not answer within {self.timeout}s") from None
        if isinstance(reply, hiredis.ReplyError):
            raise reply_error(reply)
        return reply

    async def evalsha(self, sha: str, script: Arg, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """Run a Lua script by its SHA-1, loading it with EVAL when the server does not have it."""
        try:
            return await self.execute("EVALSHA", sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            return await self.execute("EVAL", script, len(keys), *keys, *args)

    async def _open(self) -> _Connection:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._connection is not None and self._connection.closed is None:
                return self._connection  # another caller opened it meanwhile
            try:
                async with asyncio.timeout(self.connect_timeout):
                    connection = await self._connect()
            except (OSError, TimeoutError) as exc:
                raise rx.ConnectionError(f"cannot connect to Redis: {exc!r}") from exc
            self._connection = connection
            return connection

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        p = self.params
        if "path" in p:
            _, connection = await loop.create_unix_connection(_Connection, p["path"])
        else:
            tls = ssl.create_default_context() if p.get("connection_class") is SSLConnection else None
            _, connection = await loop.create_connection(
                _Connection, p.get("host", "localhost"), p.get("port", 6379), ssl=tls
            )
        setup: list[list[Arg]] = []
        if p.get("password"):
            setup.append(["AUTH", *([p["username"]] if p.get("username") else []), p["password"]])
        if p.get("db"):
            setup.append(["SELECT", p["db"]])
        for command in setup:
            reply = await connection.send(pack(command))
            if isinstance(reply, hiredis.ReplyError):
                connection.close()
                raise rx.ConnectionError(f"Redis refused {command[0]!r}: {reply}")
        return connection

    async def aclose(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None
