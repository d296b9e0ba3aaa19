"""One shared, auto-pipelined Redis connection for the money scripts on the request path.

redis-py's asyncio client spends far more CPU per command than Redis does: a pool checkout under a lock
and a condition, and on Python 3.11 a Task per command for its socket timeout (the overhead benchmark
measured about a third of the sidecar's CPU there). Here every request's commands share one connection.
A command sent while no reply is outstanding is written at once (one round trip, as before); commands
sent while replies are outstanding are collected and written together at the end of the event-loop turn.
Redis answers a connection's commands in order, so each reply resolves the oldest waiting future. Under
load that batches dozens of scripts per write and read.

Only what the hot path needs: EVALSHA (falling back to EVAL when the server lost its script cache), and
single commands. Errors are redis-py's exception types, so callers handle them as before: a reply error
is a ``ResponseError`` (``NoScriptError`` for NOSCRIPT), a dead or unreachable server a
``ConnectionError``. One watchdog per connection (not a timer per command) enforces ``timeout``: a
server that leaves the oldest command unanswered that long is taken for gone, every waiting command fails
with ``TimeoutError`` and the connection is closed. A lost connection is reopened by the next call. Like
redis-py's own retries, a caller retrying a failed script may run it twice: every money script is
idempotent by an id.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from collections.abc import Mapping, Sequence
from typing import Any, cast

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import SSLConnection, parse_url

Arg = str | bytes | int
_INCOMPLETE = object()


def pack(args: Sequence[Arg]) -> bytes:
    """One command in RESP: an array of bulk strings (hiredis' C encoder: 1.8 µs for a settle, where
    the same loop in Python took 5.5)."""
    packed: bytes = hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # the stub types a 1-tuple
    return packed


def tls_context(params: Mapping[str, Any]) -> ssl.SSLContext | None:
    """The TLS context a ``rediss://`` URL asks for (redis-py's query parameters: ``ssl_ca_certs``,
    ``ssl_cert_reqs`` none/optional/required, ``ssl_check_hostname``, ``ssl_certfile``/``ssl_keyfile``)."""
    if params.get("connection_class") is not SSLConnection:
        return None
    context = ssl.create_default_context(cafile=params.get("ssl_ca_certs"))
    required = str(params.get("ssl_cert_reqs", "required")).lower()
    if params.get("ssl_check_hostname") is False or required in ("none", "optional"):
        context.check_hostname = False
    if required == "none":
        context.verify_mode = ssl.CERT_NONE
    elif required == "optional":
        context.verify_mode = ssl.CERT_OPTIONAL
    if params.get("ssl_certfile"):
        context.load_cert_chain(params["ssl_certfile"], params.get("ssl_keyfile"))
    return context


def _keep_alive(sock: socket.socket) -> None:
    """Find a silently dropped link (a NAT or firewall forgetting an idle connection) within a minute."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def reply_error(error: hiredis.ReplyError) -> rx.ResponseError:
    message = str(error)
    return rx.NoScriptError(message) if message.startswith("NOSCRIPT") else rx.ResponseError(message)


class _Connection(asyncio.Protocol):
    """The wire: commands written at once or once per loop turn, replies matched to futures in order."""

    def __init__(self, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()  # one per waiting future
        self.outgoing: list[bytes] = []
        self.sent = 0  # commands sent so far: a command's place in this connection's order
        self.watchdog: asyncio.TimerHandle | None = None
        self.closed: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport instances
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            _keep_alive(sock)

    def send(self, command: bytes) -> asyncio.Future[Any]:
        if self.closed is not None or self.transport is None:
            raise rx.ConnectionError(f"Redis connection lost: {self.closed!r}")
        future: asyncio.Future[Any] = self.loop.create_future()
        deadline = self.loop.time() + self.timeout
        if self.outgoing:
            self.outgoing.append(command)
        elif self.waiting:  # replies outstanding: this turn's commands go out together
            self.outgoing.append(command)
            self.loop.call_soon(self._flush)
        else:
            self.transport.write(command)
        self.waiting.append(future)
        self.deadlines.append(deadline)
        self.sent += 1
        if self.watchdog is None:
            self.watchdog = self.loop.call_at(deadline, self._watch)
        return future

    def _flush(self) -> None:
        if self.transport is not None and self.outgoing and self.closed is None:
            self.transport.write(b"".join(self.outgoing))
        self.outgoing.clear()

    def _watch(self) -> None:
        self.watchdog = None
        if not self.deadlines:
            return
        if self.loop.time() < self.deadlines[0]:
            self.watchdog = self.loop.call_at(self.deadlines[0], self._watch)
            return
        self._fail(rx.TimeoutError(f"Redis left a command unanswered for {self.timeout}s"))
        self.close()

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not _INCOMPLETE:
            future = self.waiting.popleft()
            self.deadlines.popleft()
            if not future.done():  # a caller that was cancelled: its reply is dropped
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rx.ConnectionError(f"Redis connection lost: {exc or 'closed by the server'!r}"))

    def _fail(self, error: rx.RedisError) -> None:
        if self.closed is None:
            self.closed = error
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.deadlines.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


Mark = tuple[_Connection, int]  # where a command went: its connection, its place in that one's order


class AutoPipeline:
    def __init__(self, url: str, *, timeout: float = 5.0, connect_timeout: float = 5.0) -> None:
        self.url = url
        self.params = parse_url(url)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._connection: _Connection | None = None
        self._opening: asyncio.Lock | None = None
        self._lane: AutoPipeline | None = None
        self._waiting: asyncio.Lock | None = None
        self._last_wait: tuple[_Connection, int, int] | None = None  # connection, place, replicas acked
        self.waits = 0  # WAITs sent

    @property
    def lane(self) -> AutoPipeline:
        """A second pipelined connection to the same server, for writes followed by ``WAIT``: a WAIT
        blocks its connection until the replicas answer (or its timeout), and must not hold up the
        reserves on this one."""
        if self._lane is None:
            self._lane = AutoPipeline(self.url, timeout=self.timeout, connect_timeout=self.connect_timeout)
        return self._lane

    async def acknowledged(self, mark: Mark | None, replicas: int, timeout_ms: int) -> int | None:
        """How many replicas acknowledged the write at `mark` (a connection and a place in its order,
        from `execute_marked`; None: everything sent so far): a ``WAIT`` sent after it on its connection
        says. None when that cannot be known (the WAIT failed, the connection is gone). Coalesced: one
        WAIT in flight, and a write sent before the last WAIT shares its answer (a WAIT covers every
        write before it on its connection): a slow replica costs a batch one timeout, not one each."""
        if self._waiting is None:
            self._waiting = asyncio.Lock()
        async with self._waiting:
            last = self._last_wait
            if mark is not None and last is not None and last[0] is mark[0] and last[1] > mark[1]:
                return last[2]
            if mark is not None and mark[0].closed is not None:
                return None  # a WAIT on another connection would not cover it
            self.waits += 1
            try:
                (connection, place), acked = await self.execute_marked("WAIT", replicas, timeout_ms)
            except rx.RedisError:
                return None
            self._last_wait = (connection, place, int(acked))
            return int(acked)

    async def execute(self, *args: Arg) -> Any:
        """Send one command; its reply (a reply error raises)."""
        connection = self._connection
        if connection is None or connection.closed is not None:
            connection = await self._open()
        reply = await connection.send(pack(args))
        if type(reply) is hiredis.ReplyError:
            raise reply_error(reply)
        return reply

    async def execute_marked(self, *args: Arg) -> tuple[Mark, Any]:
        """`execute`, and where the command went: its connection and its place in that one's order."""
        connection = self._connection
        if connection is None or connection.closed is not None:
            connection = await self._open()
        future = connection.send(pack(args))
        mark = (connection, connection.sent)
        reply = await future
        if type(reply) is hiredis.ReplyError:
            raise reply_error(reply)
        return mark, reply

    async def execute_asking(self, *args: Arg) -> Any:
        """Send ASKING and then the command, back to back on the connection (a cluster's ASK redirect:
        the target serves a slot being imported only to a command that follows ASKING)."""
        connection = self._connection
        if connection is None or connection.closed is not None:
            connection = await self._open()
        asking = connection.send(pack(("ASKING",)))
        answer = connection.send(pack(args))
        _, reply = await asyncio.gather(asking, answer)
        if type(reply) is hiredis.ReplyError:
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
            _, connection = await loop.create_unix_connection(lambda: _Connection(self.timeout), p["path"])
        else:
            _, connection = await loop.create_connection(
                lambda: _Connection(self.timeout),
                p.get("host", "localhost"),
                p.get("port", 6379),
                ssl=tls_context(p),
            )
        setup: list[list[Arg]] = []
        if p.get("password"):
            setup.append(["AUTH", *([p["username"]] if p.get("username") else []), p["password"]])
        if p.get("db"):
            setup.append(["SELECT", p["db"]])
        try:
            for command in setup:
                reply = await connection.send(pack(command))
                if isinstance(reply, hiredis.ReplyError):
                    raise rx.ConnectionError(f"Redis refused {command[0]!r}: {reply}")
        except BaseException:  # refused, timed out or cancelled: the socket is not left open
            connection.close()
            raise
        return connection

    async def evalsha_replicated(
        self, sha: str, script: Arg, keys: Sequence[Arg], args: Sequence[Arg], replicas: int, timeout_ms: int
    ) -> tuple[Any, int | None]:
        """Run a script on the write lane, then WAIT there: (its reply, how many replicas acknowledged
        it, or None when that cannot be known)."""
        lane = self.lane
        try:
            mark, reply = await lane.execute_marked("EVALSHA", sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            mark, reply = await lane.execute_marked("EVAL", script, len(keys), *keys, *args)
        return reply, await lane.acknowledged(mark, replicas, timeout_ms)

    async def aclose(self) -> None:
        if self._lane is not None:
            await self._lane.aclose()
        if self._connection is not None:
            self._connection.close()
            self._connection = None
