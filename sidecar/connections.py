"""What one client connection may hold: a deadline for its request headers, an idle limit, a cap on how
many connections a listener keeps open, and a limit on how long a write to it may make no progress.

aiohttp has the idle limit (``keepalive_timeout``, which also closes a connection that has not sent a
whole request within that time of opening or of its previous answer) but no header deadline, no
connection cap and no write deadline. They are added by a subclass of its ``RequestHandler`` (the
protocol of one connection), made by the listener's runner, ``listener_runner``:

- **header deadline**: from the first byte of a request's headers (on a new connection, or after the
  previous answer on a kept-alive one) to their end, at most ``header_read_timeout_seconds``; past it
  the client gets a 408 in the OpenAI error shape and the connection is closed. Nothing was held: no
  handler ran.
- **connection cap**: a connection accepted while ``max_connections`` are open is closed at once, never
  read from or written to (see README, *Limits on clients*, for why not a 503).
- **write deadline**: while the connection's send buffer is full (the client stopped reading), if it
  drains not one byte for ``client_write_timeout_seconds`` the connection is aborted. A handler writing
  to it gets a ConnectionError at once, so a stream is settled as a client that went away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from .config import Settings
from .errors import RequestTimeout
from .responses import raw_error_response

log = logging.getLogger("creditgate.connections")
REFUSED_WARNING_SECONDS = 60.0  # a cap being hit is logged at most this often


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    header_read_timeout: float
    keepalive_timeout: float
    max_connections: int
    client_write_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> ListenerLimits:
        return cls(
            header_read_timeout=settings.header_read_timeout_seconds,
            keepalive_timeout=settings.keepalive_timeout_seconds,
            max_connections=settings.max_connections,
            client_write_timeout=settings.client_write_timeout_seconds,
        )


@dataclass
class ConnectionStats:
    """One listener's connections (each listener has its own, so one cannot starve another)."""

    open: int = 0
    refused: int = 0  # closed at once for the cap
    header_timeouts: int = 0
    write_stalls: int = 0
    _refused_logged: int = 0
    _warned: float = field(default=-REFUSED_WARNING_SECONDS)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with the header deadline, the cap and the write deadline."""

    __slots__ = (
        "_header_count",
        "_header_timer",
        "_limits",
        "_refused",
        "_stall_timer",
        "_stalled",
        "_stats",
    )

    def __init__(
        self, manager: Any, *, limits: ListenerLimits, stats: ConnectionStats, **kwargs: Any
    ) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._stats = stats
        self._refused = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_count = 0
        self._stall_timer: asyncio.TimerHandle | None = None
        self._stalled = 0  # the send buffer's size when the last progress was seen

    # ---- the cap ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stats = self._stats
        if stats.open >= self._limits.max_connections:
            self._refused = True
            stats.refused += 1
            transport.close()
            now = time.monotonic()
            if now - stats._warned >= REFUSED_WARNING_SECONDS:
                log.warning(
                    "refused %d connections over max_connections (%d open)",
                    stats.refused - stats._refused_logged,
                    stats.open,
                )
                stats._warned, stats._refused_logged = now, stats.refused
            return
        stats.open += 1
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:
            return
        self._stats.open -= 1
        for timer in (self._header_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._stall_timer = None
        super().connection_lost(exc)

    # ---- the header deadline -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        before = self._request_count  # aiohttp counts the requests whose headers it has parsed
        waiting = before == 0 or (self._waiter is not None and not self._waiter.done())
        super().data_received(data)
        if self._request_count != before:  # a request's headers are complete
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif waiting and data and self._header_timer is None:  # the first bytes of a request's headers
            self._header_count = before
            self._header_timer = self._loop.call_later(self._limits.header_read_timeout, self._headers_late)

    def _headers_late(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or self._request_count != self._header_count:
            return
        self._stats.header_timeouts += 1
        seconds = self._limits.header_read_timeout
        transport.write(
            raw_error_response(
                RequestTimeout(
                    f"The request headers did not arrive within {seconds:g} seconds "
                    "(header_read_timeout_seconds)."
                )
            )
        )
        self.force_close()

    # ---- the write deadline ------------------------------------------------------------------

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.transport is not None:
            self._stalled = self.transport.get_write_buffer_size()
            self._stall_timer = self._loop.call_later(self._limits.client_write_timeout, self._write_stalled)

    def resume_writing(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        super().resume_writing()

    def _write_stalled(self) -> None:
        self._stall_timer = None
        transport = self.transport
        if transport is None:
            return
        size = transport.get_write_buffer_size()
        if size < self._stalled:  # slow, but it reads: measure again
            self._stalled = size
            self._stall_timer = self._loop.call_later(self._limits.client_write_timeout, self._write_stalled)
            return
        self._stats.write_stalls += 1
        log.info(
            "a client read nothing for %g s (client_write_timeout_seconds); its connection is closed",
            self._limits.client_write_timeout,
        )
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():  # the writer learns at once that the client is gone
            waiter.set_exception(ConnectionResetError("The client stopped reading."))
        transport.abort()


class _GuardedServer(web.Server):
    def __init__(self, *args: Any, limits: ListenerLimits, stats: ConnectionStats, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.stats = stats

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(
            self, loop=self._loop, limits=self.limits, stats=self.stats, **self._kwargs
        )


class _GuardedRunner(web.AppRunner):
    def __init__(self, app: web.Application, limits: ListenerLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits
        self.stats = ConnectionStats()

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app started, as AppRunner does it
        return _GuardedServer(
            plain.request_handler,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=asyncio.get_running_loop(),
            limits=self.limits,
            stats=self.stats,
            **plain._kwargs,
        )


def listener_runner(app: web.Application, limits: ListenerLimits | None, **kwargs: Any) -> web.AppRunner:
    """The runner of one listener: with `limits`, its connections are guarded as this module says."""
    if limits is None:
        return web.AppRunner(app, **kwargs)
    return _GuardedRunner(app, limits, **kwargs)
