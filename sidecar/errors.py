"""The error tree: every error the sidecar raises on purpose is a `CreditgateError`. Dependency-free.

A class carries the OpenAI error `type` and default `code`; its HTTP status is not here but in
`responses.py`, the one module that turns errors into responses (a class -> status table). Domain errors
of the money stores (an unknown account, an idempotency id reused, a partition not rebuilt yet) are in the
tree too, so that a caller catches one class whoever raised it.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .money import format_credits


class CreditgateError(Exception):
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class ConfigError(CreditgateError):
    """A bad setting; raised at startup, the message names the setting."""

    default_code = "invalid_config"


class BadRequest(CreditgateError):
    type = "invalid_request_error"


class RequestTimeout(CreditgateError):
    """The client took too long to send its request (headers or body); nothing was held."""

    type = "invalid_request_error"
    default_code = "request_timeout"


class Unauthorized(CreditgateError):
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class InsufficientCredits(CreditgateError):
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


class SpendCapExceeded(CreditgateError):
    """A spend cap the request's worst case would overshoot (what is settled in the cap's period plus what
    live holds hold in its scope)."""

    type = "insufficient_quota"
    default_code = "spend_cap_exceeded"

    def __init__(self, scope: str, period: str, limit: int, used: int, resets_at: str | None) -> None:
        what = {"total": "total", "day": "daily", "month": "monthly"}.get(period, period)
        when = f"; it resets at {resets_at}" if resets_at else "; it does not reset"
        super().__init__(
            f"Spend cap exceeded: the {what} cap of {format_credits(limit)} credits on {scope} has "
            f"{format_credits(max(limit - used, 0))} credits left, less than this request may cost{when}."
        )
        self.cap = {"scope": scope, "period": period, "limit": limit, "used": used, "resets_at": resets_at}

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["cap"] = self.cap
        return body


class InvoiceOverdue(CreditgateError):
    """The account is blocked (an invoice overdue past its grace, or the operator's block): no new work
    that costs credits until it is unblocked (free work still passes)."""

    type = "insufficient_quota"
    default_code = "invoice_overdue"

    def __init__(self, account: str) -> None:
        super().__init__(
            f"Account {account!r} is blocked: an invoice is overdue. New work is refused until the overdue "
            "invoice is paid and the account is unblocked."
        )
        self.account = account


class Forbidden(CreditgateError):
    type = "invalid_request_error"
    default_code = "forbidden"


class NotFound(CreditgateError):
    type = "invalid_request_error"
    default_code = "not_found"


class Conflict(CreditgateError):
    type = "invalid_request_error"
    default_code = "conflict"


class UpstreamUnavailable(CreditgateError):
    type = "upstream_error"
    default_code = "upstream_unavailable"


class ServiceUnavailable(CreditgateError):
    type = "server_error"
    default_code = "service_unavailable"


class UnknownAccount(NotFound):
    """No such account (in Redis or in the ledger)."""

    def __init__(self, account: str) -> None:
        super().__init__(f"No account {account!r}.", param="account")
        self.account = account


class IdempotencyConflict(Conflict):
    """An idempotency id was used before for another account, kind or amount."""

    def __init__(self, idempotency_id: str) -> None:
        super().__init__(
            "This Idempotency-Key was used for a different amount or kind.",
            param="Idempotency-Key",
        )
        self.idempotency_id = idempotency_id


class NotInitialized(ServiceUnavailable):
    """The account's partition was not rebuilt from the ledger yet (Redis was lost): nothing credited."""

    def __init__(self, account: str) -> None:
        super().__init__(
            "The credit store is being rebuilt from the ledger; retry shortly.", code="not_initialized"
        )
        self.account = account


class WindowClosed(ServiceUnavailable):
    """A reserve or settle that reached Redis after its request's window (``settled_marker_seconds``)
    ended: the script refused it and nothing moved. A request's settled marker lives only that long, so
    a later arrival could otherwise hold or charge twice."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "This request's window ended before Redis took it; retry the request.", code="window_closed"
        )
        self.request_id = request_id
