"""A TCP fault proxy for Redis: an asyncio proxy on loopback between creditgate and Redis that, on the
test's command, loses replies, delivers them late, cuts them in half, holds them back, cuts connections,
or refuses connections (stops listening) and accepts them again.

It speaks to one Redis server (host and port, or a unix socket): on a Redis Cluster the client follows
the slot map to the nodes' own addresses, around any proxy, so faults through it are one-node only.

Deterministic, driven by the test: a fault is armed for the next N commands that match a predicate; each
such command still reaches Redis and runs there, but its reply never comes back (as when a link dies
after the server answered). Like a real dead link, that connection then delivers nothing more: the
client's timeout declares the reply lost, the client drops the connection and opens a new one. Every
command seen is recorded, so a test can assert how often one was sent and wait for a fault to fire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import hiredis
from redis.asyncio.connection import parse_url

Command = list[bytes]
Predicate = Callable[[Command], bool]


def reply_end(buf: bytes | bytearray, pos: int = 0) -> int | None:
    """Where the RESP reply starting at `pos` ends, or None while it is incomplete."""
    if pos >= len(buf):
        return None
    kind = buf[pos : pos + 1]
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return None
    if kind in (b"+", b"-", b":", b"_", b"#", b",", b"("):
        return eol + 2
    size = int(buf[pos + 1 : eol])
    if kind in (b"$", b"!", b"="):  # bulk strings: a length, then the bytes
        if size < 0:
            return eol + 2
        stop = eol + 2 + size + 2
        return stop if stop <= len(buf) else None
    if kind in (b"*", b"~", b">", b"%", b"|"):  # aggregates: that many replies (maps: pairs)
        if size < 0:
            return eol + 2
        end: int | None = eol + 2
        for _ in range(size * 2 if kind in (b"%", b"|") else size):
            assert end is not None
            end = reply_end(buf, end)
            if end is None:
                return None
        return end
    raise ValueError(f"not a RESP reply: {bytes(buf[pos : pos + 20])!r}")


def command(name: str, *prefix: str) -> Predicate:
    """Matches a command by name (any case) and, optionally, its first arguments."""
    wanted = [name.upper().encode(), *(p.encode() for p in prefix)]

    def match(cmd: Command) -> bool:
        head = [cmd[0].upper(), *cmd[1 : len(wanted)]]
        return head == wanted

    return match


def script(sha: str | None) -> Predicate:
    """Matches one Lua script, called by SHA-1 (EVALSHA)."""
    assert sha
    return command("EVALSHA", sha)


@dataclass
class _Fault:
    when: Predicate
    remaining: int


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    commands: collections.deque[Command] = field(default_factory=collections.deque)
    dead: bool = False  # a reply was lost here: nothing more is delivered
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    gone: asyncio.Event = field(default_factory=asyncio.Event)  # the link was closed (by either side)

    def close(self) -> None:
        self.gone.set()
        for writer in (self.client, self.server):
            writer.close()


class RedisFaultProxy:
    def __init__(self, redis_url: str) -> None:
        self.target = parse_url(redis_url)
        self.db = int(self.target.get("db", 0) or 0)
        self.server: asyncio.Server | None = None
        self.links: set[_Link] = set()
        self.faults: list[_Fault] = []
        self.delays: list[_Fault] = []
        self.halves: list[_Fault] = []
        self.seen: list[Command] = []  # every command sent through, in order
        self.lost: list[Command] = []  # the commands whose reply a fault swallowed
        self.late: list[Command] = []  # the commands whose reply was held until the client gave up
        self.halved: list[Command] = []  # the commands whose reply was cut in the middle
        self.port = 0
        self._changed = asyncio.Condition()
        self._flowing = asyncio.Event()  # cleared by hold_replies()
        self._flowing.set()

    @property
    def url(self) -> str:
        assert self.port
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    async def start(self) -> RedisFaultProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        self._flowing.set()
        if self.server is not None:
            self.server.close()
        for link in list(self.links):
            link.close()
        tasks = [task for link in self.links for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    # ---- commands from the test ----------------------------------------------------------------

    def lose_replies(self, times: int, when: Predicate) -> None:
        """The next `times` commands matching `when` run in Redis, but their replies are lost."""
        self.faults.append(_Fault(when, times))

    def delay_replies(self, times: int, when: Predicate) -> None:
        """The next `times` commands matching `when` run in Redis, but their reply (and every later one on
        that connection) is held back until the client gives up on the connection (its timeout), and
        only then written: a reply arriving after the client's timeout, on a connection it has closed."""
        self.delays.append(_Fault(when, times))

    def cut_mid_reply(self, times: int, when: Predicate) -> None:
        """The next `times` commands matching `when` run in Redis; the first half of the reply's bytes is
        delivered, then the connection is cut."""
        self.halves.append(_Fault(when, times))

    async def refuse(self) -> None:
        """Stop listening (new connections are refused, as by a Redis that is down) and cut every open
        connection."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.cut()

    async def accept(self) -> None:
        """Listen again, on the same port."""
        if self.server is None:
            await self.start()

    def hold_replies(self) -> None:
        """Hold back every reply (a slow Redis) until release_replies()."""
        self._flowing.clear()

    def release_replies(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Drop every open connection at once (Redis restarted, or the network failed)."""
        for link in list(self.links):
            link.close()

    def count(self, when: Predicate) -> int:
        """How many commands matching `when` were sent through so far."""
        return sum(1 for cmd in self.seen if when(cmd))

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait (up to 30 s) until `condition()` holds; it is checked whenever traffic passes."""
        async with asyncio.timeout(30), self._changed:
            await self._changed.wait_for(condition)

    # ---- the proxy -------------------------------------------------------------------------------

    async def _serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        t = self.target
        try:
            if "path" in t:
                server_reader, server = await asyncio.open_unix_connection(t["path"])
            else:
                server_reader, server = await asyncio.open_connection(
                    t.get("host", "localhost"), t.get("port", 6379)
                )
        except OSError:
            client.close()
            return
        link = _Link(client, server)
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._commands(link, client_reader)),
            asyncio.create_task(self._replies(link, server_reader)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.close()
            self.links.discard(link)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _commands(self, link: _Link, reader: asyncio.StreamReader) -> None:
        parser = hiredis.Reader()
        try:
            while data := await reader.read(65536):
                parser.feed(data)
                while (cmd := parser.gets()) is not False:
                    assert isinstance(cmd, list)
                    link.commands.append(cmd)  # recorded before Redis can answer it
                    self.seen.append(cmd)
                link.server.write(data)
                await link.server.drain()
                await self._notify()
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()
            await self._notify()

    async def _replies(self, link: _Link, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        try:
            while data := await reader.read(65536):
                buf += data
                out = bytearray()
                while (end := reply_end(buf)) is not None:
                    reply = bytes(buf[:end])
                    del buf[:end]
                    cmd = link.commands.popleft()
                    if link.dead:
                        continue
                    if _take(self.faults, cmd):
                        link.dead = True
                        self.lost.append(cmd)
                        continue
                    if _take(self.halves, cmd):
                        link.client.write(bytes(out) + reply[: len(reply) // 2])
                        self.halved.append(cmd)
                        link.close()
                        return
                    if _take(self.delays, cmd):  # sent late, once the client has left
                        link.client.write(bytes(out))
                        async with asyncio.timeout(30):
                            await link.gone.wait()
                        self.late.append(cmd)
                        await self._notify()
                        link.dead = True
                        link.client.write(reply)  # onto a closed connection: nobody reads it
                        continue
                    out += reply
                if out:  # the replies before a lost one still arrive
                    await self._flowing.wait()
                    link.client.write(bytes(out))
                    await link.client.drain()
                await self._notify()
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()


def _take(faults: list[_Fault], cmd: Command) -> bool:
    """Whether an armed fault matches `cmd` (and, if so, one fewer is left of it)."""
    for fault in faults:
        if fault.remaining > 0 and fault.when(cmd):
            fault.remaining -= 1
            return True
    return False


@contextlib.asynccontextmanager
async def fault_proxy(redis_url: str) -> collections.abc.AsyncIterator[RedisFaultProxy]:
    proxy = await RedisFaultProxy(redis_url).start()
    try:
        yield proxy
    finally:
        await proxy.close()
