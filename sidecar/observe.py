"""One record per request on the API routes and the billing portal, reported once when the request is over.

The proxy fills the record as the request goes (account, model, hold, charge, usage, upstream timings);
an outer middleware (around the error middleware, so it sees error answers too) sets the final status and
reports the record to its consumers: the metrics and the one JSON ``request`` log line. A request whose
client went away while its exchange still runs is reported when the exchange has settled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from .pricing import Usage
from .responses import ERROR_CODE, Handler
from .wire import ROUTES

log = logging.getLogger("creditgate.observe")
request_log = logging.getLogger("creditgate.request")

CLIENT_CLOSED = 499  # the client went away before its answer


@dataclass(slots=True)
class RequestRecord:
    route: str  # chat, completions, embeddings, responses, models, portal
    started: float  # perf_counter
    request_id: str | None = None
    account: str | None = None
    model: str = "other"  # a configured model (aliases resolved), else "other"
    status: int = 0
    error_code: str | None = None
    cache: str = "off"  # hit, collapsed, miss, bypass, off
    stream: bool = False
    key_source: str | None = None  # pool / vault / inline (of the upstream that served)
    upstream: str | None = None  # the upstream that served (the last one tried)
    attempts: int = 0  # upstream calls made
    hold: int = 0
    charge: int = 0
    saved: int = 0  # what a cache hit saved the caller
    settled: bool = False
    usage: Usage | None = None
    outcome: str | None = None
    ended: float = 0.0
    upstream_started: float | None = None
    upstream_first_byte: float | None = None
    upstream_ended: float | None = None
    waited: float = 0.0  # time spent waiting on the upstream (and, while streaming, on the client)
    exchange: asyncio.Task[None] | None = None

    @property
    def status_class(self) -> str:
        if self.status >= 500:
            return "5xx"
        return "4xx" if self.status >= 400 else "3xx" if self.status >= 300 else "2xx"

    @property
    def duration(self) -> float:
        return max(0.0, self.ended - self.started)

    @property
    def overhead(self) -> float:
        return max(0.0, self.duration - self.waited)

    @property
    def upstream_seconds(self) -> float | None:
        if self.upstream_started is None or self.upstream_ended is None:
            return None
        return self.upstream_ended - self.upstream_started

    @property
    def first_byte_seconds(self) -> float | None:
        if self.upstream_started is None or self.upstream_first_byte is None:
            return None
        return self.upstream_first_byte - self.upstream_started


RECORD = web.RequestKey("record", RequestRecord)
Report = Callable[[RequestRecord], None]
_ROUTE_LABELS = {path: route.kind for path, route in ROUTES.items()}


def route_label(path: str) -> str | None:
    """The route label of an API path, or None for paths that are not requests to report."""
    if path in _ROUTE_LABELS:
        return _ROUTE_LABELS[path]
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return "models"
    if path == "/portal" or path.startswith("/portal/"):
        return "portal"  # the billing portal's pages, forms and assets (when it is routed)
    return None


def request_observer(report: Report) -> Middleware:
    """The middleware that records and reports every API request; put it before error_middleware."""

    def emit(rec: RequestRecord) -> None:
        try:
            report(rec)
        except Exception:  # reporting must never break a request
            log.exception("reporting request %s failed", rec.request_id)

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_label(request.path)
        if route is None:
            return await handler(request)
        rec = RequestRecord(route=route, started=time.perf_counter())
        request[RECORD] = rec
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            rec.ended = time.perf_counter()
            rec.status = CLIENT_CLOSED
            if rec.exchange is not None and not rec.exchange.done():
                rec.exchange.add_done_callback(lambda _: emit(rec))  # reported once it has settled
            else:
                emit(rec)
            raise
        except web.HTTPException as exc:  # a redirect (the portal's), raised through the error middleware
            rec.ended = time.perf_counter()
            rec.status = exc.status
            emit(rec)
            raise
        rec.ended = time.perf_counter()
        rec.status = response.status
        rec.error_code = request.get(ERROR_CODE)
        if rec.exchange is not None and not rec.exchange.done():
            rec.exchange.add_done_callback(lambda _: emit(rec))  # a stream still settling: reported after
        else:
            emit(rec)
        return response

    return observe


def log_request(rec: RequestRecord) -> None:
    """The one structured line per request (nothing is built when INFO is off for its logger)."""
    if not request_log.isEnabledFor(logging.INFO):
        return
    usage = rec.usage

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else round(seconds * 1000, 3)

    request_log.info(
        "request",
        extra={
            "request_id": rec.request_id,
            "account": rec.account,
            "route": rec.route,
            "model": rec.model,
            "status": rec.status,
            "error_code": rec.error_code,
            "cache": rec.cache,
            "stream": rec.stream,
            "key_source": rec.key_source,
            "upstream": rec.upstream,
            "attempts": rec.attempts,
            "outcome": rec.outcome,
            "prompt_tokens": usage.prompt_tokens if usage else 0,
            "cached_tokens": usage.cached_tokens if usage else 0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "hold": rec.hold,
            "charge": rec.charge,
            "saved": rec.saved,
            "duration_ms": ms(rec.duration),
            "upstream_ms": ms(rec.upstream_seconds),
            "first_byte_ms": ms(rec.first_byte_seconds),
            "overhead_ms": ms(rec.overhead),
        },
    )
