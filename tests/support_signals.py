"""Signal delivery tests' helpers: a controlled clock, a real webhook receiver (an aiohttp server that
verifies each POST's signature with the payments verifier), a real SMTP server (aiosmtpd), and the
store on the test's Postgres schema."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from sidecar.config import Settings
from sidecar.ledger_store import LedgerStore
from sidecar.payments.signatures import SignatureRejected, verify
from sidecar.signals.courier import Courier
from sidecar.signals.deliveries import Deliveries
from sidecar.signals.events import Event, EventLog

WEBHOOK_SECRET = "whsec-signals-test-0123456789abcdef"
SMTP_USER, SMTP_PASSWORD = "mailer", "smtp-password-for-tests-42"
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)


class Clock:
    """The delivery's clock: time moves only when a test moves it."""

    def __init__(self, start: dt.datetime = T0) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)

    def to(self, at: dt.datetime) -> None:
        assert at >= self.now
        self.now = at


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    signed_at: int


@dataclass
class Receiver:
    """A webhook endpoint: answers each POST with the next of `statuses` (then 200), after verifying its
    signature at the clock's time (a bad one is answered 400 and counted)."""

    clock: Clock
    server: TestServer | None = None
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by each verified POST
    stall: asyncio.Event | None = None  # when given, each answer waits for it

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hooks/creditgate"))

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if self.stall is not None:
            await self.stall.wait()
        try:
            signed_at = verify(
                request.headers.get("creditgate-signature"),
                body,
                [WEBHOOK_SECRET],
                now=int(self.clock().timestamp()),
                tolerance=300,
                header="creditgate-signature",
            )
        except SignatureRejected as exc:
            self.rejected.append(exc.reason)
            return web.Response(status=400)
        self.received.append(Received(dict(request.headers), body, signed_at))
        self.arrived.set()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200, text="ok")

    def event_ids(self) -> list[str]:
        return [r.headers["creditgate-event-id"] for r in self.received]

    def bodies(self) -> list[dict[str, Any]]:
        return [msgspec.json.decode(r.body) for r in self.received]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def receiver(clock: Clock) -> AsyncIterator[Receiver]:
    found = Receiver(clock)
    app = web.Application()
    app.router.add_post("/hooks/creditgate", found.handle)
    found.server = TestServer(app)
    await found.server.start_server()
    yield found
    await found.server.close()


class Sink:
    """aiosmtpd's handler: keeps each message; refuses the recipients in `refuse` (550)."""

    def __init__(self) -> None:
        self.messages: list[Envelope] = []
        self.refuse: set[str] = set()
        self.logins: list[str] = []

    async def handle_RCPT(
        self, server: Any, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.messages.append(envelope)
        return "250 2.0.0 queued"

    def authenticate(
        self, server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> Any:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        )
        if ok:
            self.logins.append(SMTP_USER)
        return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd answers the 535


@dataclass
class Smtp:
    sink: Sink
    port: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def smtp() -> Iterator[Smtp]:
    """A real SMTP server on loopback (plain, with AUTH LOGIN/PLAIN allowed without TLS for the test)."""
    sink = Sink()
    port = free_port()
    controller = Controller(
        sink, hostname="127.0.0.1", port=port, authenticator=sink.authenticate, auth_require_tls=False
    )
    controller.start()  # type: ignore[no-untyped-call,unused-ignore]
    yield Smtp(sink, port)
    controller.stop()  # type: ignore[no-untyped-call,unused-ignore]


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    store = await LedgerStore.connect(database_url, max_size=8)
    await store.migrate()
    yield store.pool
    await store.pool.close()


def signal_settings(**overrides: Any) -> Settings:
    raw: dict[str, Any] = {"signal_backoff_base_seconds": 30, "signal_backoff_cap_seconds": 3600}
    raw.update(overrides)
    return msgspec.convert(raw, Settings)


@dataclass
class Worker:
    """One sidecar's delivery side: its event log (fan-out hooked), its store and its worker."""

    log: EventLog
    deliveries: Deliveries
    courier: Courier


def worker(pool: asyncpg.Pool, settings: Settings, clock: Clock) -> Worker:
    deliveries = Deliveries(pool, settings, clock)
    log = EventLog()
    log.on_emit.append(deliveries.fan_out)
    return Worker(log, deliveries, Courier(deliveries, settings))


async def emit(pool: asyncpg.Pool, log: EventLog, event: Event) -> bool:
    """Write `event` (its account created first) in one transaction, as an emitter would."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING", event.account)
        return await log.emit(conn, event)


def low(account: str = "acct-1", n: int = 1) -> Event:
    return Event(
        id=f"balance.low:{account}:r1:{n}",
        type="balance.low",
        account=account,
        data={"available": 4_000_000, "threshold": 5_000_000, "rule": "r1"},
    )


async def deliveries_of(pool: asyncpg.Pool, event_id: str) -> list[asyncpg.Record]:
    return list(
        await pool.fetch("SELECT * FROM signal_deliveries WHERE event_id = $1 ORDER BY delivery_id", event_id)
    )


async def attempts_of(pool: asyncpg.Pool, delivery_id: int) -> list[asyncpg.Record]:
    return list(
        await pool.fetch(
            "SELECT * FROM signal_delivery_attempts WHERE delivery_id = $1 ORDER BY attempt_id", delivery_id
        )
    )
