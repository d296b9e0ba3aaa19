"""A TCP fault proxy for Postgres: an asyncio byte proxy on loopback between creditgate and Postgres that,
on the test's command, loses the reply to a statement after Postgres ran it, cuts the connection just
before a statement reaches Postgres, holds every reply back, cuts connections, or refuses connections
(stops listening) and accepts them again.

It understands just enough of the wire protocol (v3) to find statements and their replies. The client's
first message has no type byte (an int32 length, then a protocol code): an SSLRequest or GSSENCRequest is
answered ``N`` by the proxy itself (so the link stays plain and readable); the startup message is passed
on. Every later message either way is a type byte and an int32 length (counting itself). The client's
``P`` (Parse: statement name, SQL) is remembered per connection, so a ``B`` (Bind of a prepared
statement) or a ``Q`` (simple query) names the SQL that runs. Each client ``S`` (Sync) or ``Q`` ends a
round, and Postgres ends its answer to each round with one ``Z`` (ReadyForQuery), in order; the answer to
the startup ends with a ``Z`` too. A statement's "reply lost" drops everything of its round's answer up to
and including that ``Z`` (by then an implicit transaction has committed), and then cuts the connection,
as a link dying after the server answered: asyncpg has no timeout of its own here, it sees the
connection die. Faults are armed on predicates over the statement and its transaction (the statements on
the connection since its last ``BEGIN``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

SSL_REQUEST, GSSENC_REQUEST = 80877103, 80877104


@dataclass(frozen=True)
class Statement:
    sql: str
    transaction: tuple[str, ...]  # the statements of its connection since the last BEGIN (this one last)


Predicate = Callable[[Statement], bool]


def statement(fragment: str) -> Predicate:
    """A statement whose SQL contains `fragment`."""
    return lambda st: fragment in st.sql


def commit_of(fragment: str) -> Predicate:
    """The COMMIT of a transaction one of whose statements contains `fragment`."""
    return lambda st: (
        st.sql.strip().upper().startswith("COMMIT") and any(fragment in sql for sql in st.transaction)
    )


@dataclass
class _Fault:
    when: Predicate
    remaining: int


@dataclass(eq=False)
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    prepared: dict[bytes, str] = field(default_factory=dict)  # statement name -> SQL
    transaction: list[str] = field(default_factory=list)
    # One flag per round sent and not yet answered (the startup's first): whether its answer is lost.
    rounds: collections.deque[bool] = field(default_factory=lambda: collections.deque([False]))
    losing: bool = False  # the round being sent has a statement whose reply is to be lost
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.close()


class PgFaultProxy:
    def __init__(self, dsn: str) -> None:
        self.target = urlsplit(dsn)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[_Link] = set()
        self.lose: list[_Fault] = []
        self.cuts: list[_Fault] = []
        self.seen: list[Statement] = []  # every statement run through the proxy, in order
        self.sent: list[str] = []  # the SQL of every statement prepared (Parse) or run, in order
        self.lost: list[Statement] = []  # those whose reply was lost
        self.cut_before: list[Statement] = []  # those that never reached Postgres: the link was cut
        self._changed = asyncio.Condition()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def dsn(self) -> str:
        """The target's DSN (user, database, options) with the proxy's address."""
        assert self.port
        user = self.target.netloc.rpartition("@")[0]
        netloc = f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        return urlunsplit(self.target._replace(netloc=netloc))

    async def start(self) -> PgFaultProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        await self.refuse()
        self._flowing.set()  # a held answer's task ends on its closed link
        tasks = [task for link in self.links for task in link.tasks]
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- commands from the test ----------------------------------------------------------------

    def lose_replies(self, times: int, when: Predicate) -> None:
        """The next `times` statements matching `when` run in Postgres; their round's answer is lost and
        the connection cut once Postgres has sent it."""
        self.lose.append(_Fault(when, times))

    def cut_before_statement(self, times: int, when: Predicate) -> None:
        """The next `times` statements matching `when` never reach Postgres: the connection is cut just
        before (Postgres rolls back the transaction it was in)."""
        self.cuts.append(_Fault(when, times))

    def hold_replies(self) -> None:
        """Hold back every answer (a Postgres that takes for ever) until release_replies()."""
        self._flowing.clear()

    def release_replies(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        for link in list(self.links):
            link.close()

    async def refuse(self) -> None:
        """Stop listening (connects are refused: Postgres is down) and cut every open connection."""
        if self.server is not None:
            self.server.close()
            self.server = None
        self.cut()

    async def accept(self) -> None:
        """Listen again, on the same port."""
        if self.server is None:
            await self.start()

    def count(self, when: Predicate) -> int:
        return sum(1 for st in self.seen if when(st))

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Wait (up to 30 s) until `condition()` holds; checked whenever traffic passes."""
        async with asyncio.timeout(30), self._changed:
            await self._changed.wait_for(condition)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- the proxy -------------------------------------------------------------------------------

    async def _serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            server_reader, server = await asyncio.open_connection(
                self.target.hostname or "127.0.0.1", self.target.port or 5432
            )
        except OSError:
            client.close()
            return
        link = _Link(client, server)
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._from_client(link, client_reader)),
            asyncio.create_task(self._from_server(link, server_reader)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            link.close()
            self.links.discard(link)
            await self._notify()

    async def _from_client(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while True:  # the untyped first messages: SSL/GSS requests (refused here), then the startup
                (length,) = struct.unpack("!i", await reader.readexactly(4))
                body = await reader.readexactly(length - 4)
                if struct.unpack("!i", body[:4])[0] in (SSL_REQUEST, GSSENC_REQUEST):
                    link.client.write(b"N")
                    continue
                link.server.write(struct.pack("!i", length) + body)
                break
            while True:
                head = await reader.readexactly(5)
                kind, length = head[:1], struct.unpack("!i", head[1:])[0]
                body = await reader.readexactly(length - 4)
                if not self._pass(link, kind, body):
                    link.close()
                    return
                link.server.write(head + body)
                await link.server.drain()
                await self._notify()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            link.close()

    def _pass(self, link: _Link, kind: bytes, body: bytes) -> bool:
        """Track one client message; False: cut the link instead of sending it."""
        sql = None
        if kind == b"P":
            name, query = body.split(b"\0")[:2]
            link.prepared[name] = query.decode()
            self.sent.append(link.prepared[name])
        elif kind == b"B":
            sql = link.prepared.get(body.split(b"\0")[1], "")
        elif kind == b"Q":
            sql = body.rstrip(b"\0").decode()
        if sql is not None:
            if sql.strip().upper().startswith("BEGIN"):
                link.transaction = []
            link.transaction.append(sql)
            st = Statement(sql, tuple(link.transaction))
            if _take(self.cuts, st):
                self.cut_before.append(st)
                return False
            self.seen.append(st)
            self.sent.append(sql)
            if _take(self.lose, st):
                link.losing = True
                self.lost.append(st)
            if sql.strip().upper().startswith(("COMMIT", "ROLLBACK", "END")):
                link.transaction = []
        if kind in (b"S", b"Q"):
            link.rounds.append(link.losing)
            link.losing = False
        return True

    async def _from_server(self, link: _Link, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(struct.unpack("!i", head[1:])[0] - 4)
                lost = bool(link.rounds) and link.rounds[0]
                if head[:1] == b"Z" and link.rounds:
                    link.rounds.popleft()
                    if lost:  # the round ran (and committed); its answer never arrives
                        link.close()
                        return
                if not lost:
                    await self._flowing.wait()
                    link.client.write(head + body)
                    await link.client.drain()
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        finally:
            link.close()
            await self._notify()


def _take(faults: list[_Fault], st: Statement) -> bool:
    for fault in faults:
        if fault.remaining > 0 and fault.when(st):
            fault.remaining -= 1
            return True
    return False


@contextlib.asynccontextmanager
async def pg_fault_proxy(dsn: str) -> AsyncIterator[PgFaultProxy]:
    proxy = await PgFaultProxy(dsn).start()
    try:
        yield proxy
    finally:
        await proxy.close()
