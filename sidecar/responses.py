"""Errors -> HTTP responses, in one place: the class -> status table and the middleware that applies it.

Every error answered to a client passes `error_response`: a `CreditgateError` by its class (the nearest
class in the table along its MRO), the library errors the request path can meet by theirs (Redis and
Postgres unavailable: 503), anything else as a logged 500. Bodies are in OpenAI's error shape.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import asyncpg
import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from .errors import (
    BadRequest,
    Conflict,
    CreditgateError,
    Forbidden,
    InsufficientCredits,
    InvoiceOverdue,
    NotFound,
    RequestTimeout,
    ServiceUnavailable,
    SpendCapExceeded,
    Unauthorized,
    UpstreamUnavailable,
)

log = logging.getLogger("creditgate.responses")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
ERROR_CODE = web.RequestKey("error_code", str)  # the `code` of the error answered, for metrics and logs

STATUS: dict[type[CreditgateError], int] = {
    CreditgateError: 500,
    BadRequest: 400,
    Unauthorized: 401,
    InsufficientCredits: 402,
    SpendCapExceeded: 402,
    InvoiceOverdue: 402,
    Forbidden: 403,
    NotFound: 404,
    RequestTimeout: 408,
    Conflict: 409,
    UpstreamUnavailable: 502,
    ServiceUnavailable: 503,
}
# Headers an error class adds: a 402 tells the OpenAI SDKs not to retry it.
HEADERS: dict[type[CreditgateError], dict[str, str]] = {
    InsufficientCredits: {"x-should-retry": "false"},
    SpendCapExceeded: {"x-should-retry": "false"},
    InvoiceOverdue: {"x-should-retry": "false"},
}


def status_of(err: CreditgateError) -> int:
    """The HTTP status of an error: that of the nearest class in STATUS along its MRO."""
    for cls in type(err).__mro__:
        status = STATUS.get(cls)
        if status is not None:
            return status
    raise AssertionError("CreditgateError is in STATUS")  # pragma: no cover


_encoder = msgspec.json.Encoder()


def raw_error_response(err: CreditgateError) -> bytes:
    """The whole HTTP/1.1 answer for `err`, as bytes, closing the connection: for a connection that has no
    request to answer through aiohttp (its headers never arrived)."""
    body = _encoder.encode(err.body())
    status = status_of(err)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def error_response(err: CreditgateError, request_id: str | None = None) -> web.Response:
    headers = dict(HEADERS.get(type(err), {}))
    if request_id:
        headers["x-request-id"] = request_id
    return web.Response(
        status=status_of(err),
        body=_encoder.encode(err.body()),
        content_type="application/json",
        headers=headers,
    )


_HTTP_TYPES: dict[int, type[CreditgateError]] = {401: Unauthorized, 403: Forbidden, 404: NotFound}


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except CreditgateError as err:
        if err.code:
            request[ERROR_CODE] = err.code
        return error_response(err, request.get(REQUEST_ID))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        cls = _HTTP_TYPES.get(exc.status, BadRequest if exc.status < 500 else CreditgateError)
        message = exc.reason if exc.text is None else exc.text.removeprefix(f"{exc.status}: ")
        resp = error_response(cls(message), request.get(REQUEST_ID))
        resp.set_status(exc.status)
        return resp
    except RedisError as exc:
        log.error("Redis failed on %s %s: %r", request.method, request.path, exc)
        unavailable = ServiceUnavailable("The credit store is unavailable; retry shortly.")
        return error_response(unavailable, request.get(REQUEST_ID))
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        # Only operator routes touch Postgres; the metered path never waits for it.
        log.error("Postgres failed on %s %s: %r", request.method, request.path, exc)
        unavailable = ServiceUnavailable("The ledger database is unavailable; retry shortly.")
        return error_response(unavailable, request.get(REQUEST_ID))
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(CreditgateError("Internal error in creditgate."), request.get(REQUEST_ID))
