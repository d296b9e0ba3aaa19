"""Operator actions — accounts, keys, grants, balances — for both the ``/admin`` API and the CLI.

The API is behind ``Authorization: Bearer <admin_token>``; with no admin token configured it is off.
Amounts are integer micro-credits (``amount``) or an exact decimal string of credits (``credits``).
"""

from __future__ import annotations

import hmac
from decimal import Decimal, InvalidOperation
from typing import Any

import msgspec
from aiohttp import web

from .accounts import AccountStore
from .errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized, format_credits
from .ledger import IdempotencyConflict, RedisLedger, UnknownAccount
from .pricing import MICRO

MAX_GRANT = 10**15  # one billion credits: keeps every balance far below 2**53


class GrantBody(msgspec.Struct, forbid_unknown_fields=True):
    amount: int | None = None
    credits: str | None = None


class AccountBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None = None


def grant_amount(amount: int | None, credits: str | None) -> int:
    """The grant in micro-credits from exactly one of `amount` (micro-credits) or `credits` (decimal)."""
    if (amount is None) == (credits is None):
        raise BadRequest(
            "Give exactly one of `amount` (micro-credits) or `credits` (decimal).", param="amount"
        )
    if credits is not None:
        try:
            exact = Decimal(credits) * MICRO
        except InvalidOperation:
            raise BadRequest(f"credits must be a decimal string, got {credits!r}.", param="credits") from None
        if not exact.is_finite() or exact != exact.to_integral_value():
            raise BadRequest(
                "credits must be a whole number of micro-credits (6 decimals at most).", param="credits"
            )
        amount = int(exact)
    assert amount is not None
    if not 0 < amount <= MAX_GRANT:
        raise BadRequest(f"The grant must be between 1 and {MAX_GRANT} micro-credits.", param="amount")
    return amount


class AdminOps:
    def __init__(self, accounts: AccountStore, ledger: RedisLedger) -> None:
        self.accounts = accounts
        self.ledger = ledger

    async def create_account(self, account: str | None = None) -> dict[str, Any]:
        return {"id": await self.accounts.create_account(account)}

    async def create_key(self, account: str) -> dict[str, Any]:
        key = await self.accounts.create_key(account)
        return {"id": key.key_id, "account": key.account, "key": key.api_key}

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        account = await self.accounts.revoke_key(key_id)
        return {"id": key_id, "account": account, "revoked": True}

    async def grant(self, account: str, amount: int, idempotency_key: str) -> dict[str, Any]:
        if not idempotency_key or len(idempotency_key) > 200:
            raise BadRequest("A grant needs an Idempotency-Key of 1-200 characters.", param="Idempotency-Key")
        try:
            credited, balance = await self.ledger.credit(account, idempotency_key, amount)
        except UnknownAccount:
            raise NotFound(f"No account {account!r}.", param="account") from None
        except IdempotencyConflict:
            raise Conflict(
                "This Idempotency-Key was used for a different account or amount.", param="Idempotency-Key"
            ) from None
        return {
            "account": account,
            "amount": amount,
            "credited": credited,
            "balance": balance,
            "balance_credits": format_credits(balance),
        }

    async def balance(self, account: str) -> dict[str, Any]:
        try:
            view = await self.ledger.balance(account)
        except UnknownAccount:
            raise NotFound(f"No account {account!r}.", param="account") from None
        return {
            "account": account,
            "balance": view.balance,
            "held": view.held,
            "available": view.available,
            "balance_credits": format_credits(view.balance),
            "holds": [
                {"request_id": h.request_id, "amount": h.amount, "lease_end_ms": h.lease_end_ms}
                for h in view.holds
            ],
        }


def _decode(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.json.decode(body or b"{}", type=kind)
    except msgspec.MsgspecError as exc:
        raise BadRequest(f"Invalid request body: {exc}") from None


def _json(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(data), status=status, content_type="application/json")


ADMIN_OPS = web.AppKey("admin_ops", AdminOps)


def admin_app(token: str | None) -> web.Application:
    """The /admin sub-application; its handlers use the AdminOps the parent app keeps at ADMIN_OPS."""

    @web.middleware
    async def require_token(request: web.Request, handler: Any) -> web.StreamResponse:
        if token is None:
            raise Forbidden("The admin API is off: set admin_token to turn it on.")
        presented = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise Unauthorized("Missing or wrong admin token.", code="invalid_admin_token")
        response: web.StreamResponse = await handler(request)
        return response

    async def create_account(request: web.Request) -> web.Response:
        body = _decode(await request.read(), AccountBody)
        return _json(await request.config_dict[ADMIN_OPS].create_account(body.id), status=201)

    async def get_account(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ADMIN_OPS].balance(request.match_info["account"]))

    async def create_key(request: web.Request) -> web.Response:
        return _json(
            await request.config_dict[ADMIN_OPS].create_key(request.match_info["account"]), status=201
        )

    async def revoke_key(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ADMIN_OPS].revoke_key(request.match_info["key_id"]))

    async def grant(request: web.Request) -> web.Response:
        body = _decode(await request.read(), GrantBody)
        amount = grant_amount(body.amount, body.credits)
        key = request.headers.get("Idempotency-Key", "")
        return _json(await request.config_dict[ADMIN_OPS].grant(request.match_info["account"], amount, key))

    app = web.Application(middlewares=[require_token])
    app.router.add_post("/accounts", create_account)
    app.router.add_get("/accounts/{account}", get_account)
    app.router.add_post("/accounts/{account}/keys", create_key)
    app.router.add_delete("/keys/{key_id}", revoke_key)
    app.router.add_post("/accounts/{account}/grants", grant)
    return app
