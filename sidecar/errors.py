"""The error tree, and the one middleware that turns errors into OpenAI-shaped responses.

Every error the sidecar raises on purpose is a `CreditgateError`; its class carries the HTTP status
and the OpenAI `type`. Nothing else in the package builds an error response.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import asyncpg
import msgspec
from aiohttp import web
from redis.exceptions import RedisError

log = logging.getLogger("creditgate.errors")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID = web.RequestKey("request_id", str)
ERROR_CODE = web.RequestKey("error_code", str)  # the `code` of the error answered, for metrics and logs


class CreditgateError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(CreditgateError):
    """A bad setting; raised at startup, the message names the setting."""

    default_code = "invalid_config"


class BadRequest(CreditgateError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(CreditgateError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class InsufficientCredits(CreditgateError):
    status = 402
    type = "insufficient_quota"
    default_code = "insufficient_credits"

    def __init__(
        self,
        balance: int,
        required: int,
        top_up_url: str | None,
        *,
        output_limit: int | None = None,
        affordable_output_tokens: int | None = None,
    ) -> None:
        message = (
            f"Insufficient credits. Current balance: {format_credits(balance)} credits; this request "
            f"requires {format_credits(required)} credits"
        )
        if output_limit is not None:
            message += (
                f", held for its output limit of {output_limit} tokens (max_tokens, else the model's maximum)"
            )
            if affordable_output_tokens is not None:
                message += (
                    f"; the available credits afford {affordable_output_tokens} output tokens: "
                    "lower max_tokens to fit"
                )
        super().__init__(message + ".")
        self.balance = balance
        self.required = required
        self.top_up_url = top_up_url
        self.output_limit = output_limit
        self.affordable_output_tokens = affordable_output_tokens

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"].update(
            balance=self.balance,
            balance_credits=format_credits(self.balance),
            required=self.required,
            available=self.balance,
            output_limit=self.output_limit,
            affordable_output_tokens=self.affordable_output_tokens,
            top_up_url=self.top_up_url,
        )
        return body

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "false"}


class Forbidden(CreditgateError):
    status = 403
    type = "invalid_request_error"
    default_code = "forbidden"


class NotFound(CreditgateError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(CreditgateError):
    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class UpstreamUnavailable(CreditgateError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_unavailable"


class ServiceUnavailable(CreditgateError):
    status = 503
    type = "server_error"
    default_code = "service_unavailable"


def format_credits(micro: int) -> str:
    """Micro-credits as an exact decimal string of credits: 12_500_000 -> '12.5'."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:06d}".rstrip("0")


_encoder = msgspec.json.Encoder()


def error_response(err: CreditgateError, request_id: str | None = None) -> web.Response:
    headers = err.headers()
    if request_id:
        headers["x-request-id"] = request_id
    return web.Response(
        status=err.status, body=_encoder.encode(err.body()), content_type="application/json", headers=headers
    )


_HTTP_TYPES = {401: Unauthorized, 403: Forbidden, 404: NotFound}


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
