"""Operator actions — accounts, keys, grants, balances — for both the ``/admin`` API and the CLI.

The API is behind ``Authorization: Bearer <admin_token>``; with no admin token configured it is off.
Amounts are integer micro-credits (``amount``) or an exact decimal string of credits (``credits``).
"""

from __future__ import annotations

import hmac
import secrets
import time
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web

from .accounts import AccountDirectory, check_account_id, hash_key, new_key
from .balances import Balances
from .config import ACCOUNT_ID
from .errors import BadRequest, Conflict, Forbidden, NotFound, NotInitialized, Unauthorized
from .grant_terms import GrantBody as GrantBody
from .grant_terms import Starter, grant_terms
from .keys_api import KeyBody, new_key_terms
from .ledger_store import LedgerStore
from .money import MAX_GRANT, MICRO, format_credits
from .payments.referral_codes import ReferralPolicy
from .payments.referral_store import ReferralStore
from .rebuild import rebuild_if_empty
from .wallet import GRANT_KINDS, GrantTerms
from .wallet_store import WalletStore, at_ms


class AccountBody(msgspec.Struct, forbid_unknown_fields=True):
    id: str | None = None
    referral_code: str | None = None  # links it to the code's owner


def grant_amount(amount: int | None, credits: str | None) -> int:
    """The grant in micro-credits from exactly one of `amount` (micro-credits) or `credits` (decimal)."""
    if (amount is None) == (credits is None):
        raise BadRequest(
            "Give exactly one of `amount` (micro-credits) or `credits` (decimal).", param="amount"
        )
    if credits is not None:
        try:
            exact = Decimal(credits) * MICRO
        except ArithmeticError:  # InvalidOperation, or Overflow past the decimal context ("1e999999")
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


MONEY_IN_KINDS = GRANT_KINDS


def storable(text: str) -> bool:
    """Whether Postgres can store `text`: no NUL and valid UTF-8 (a header's undecodable bytes and a JSON
    lone surrogate escape arrive as surrogates). Anything else would be refused by Postgres (a 503)."""
    if "\x00" in text:
        return False
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _known_account(account: str) -> None:
    """An id no account can have (see check_account_id) names no account: a 404 before any query."""
    if not ACCOUNT_ID.match(account):
        raise NotFound(f"No account {account!r}.", param="account")


class AdminOps:
    """Operator actions. Postgres is written first (the truth), then Redis (the hot copy)."""

    def __init__(
        self,
        accounts: AccountDirectory,
        balances: Balances,
        store: LedgerStore,
        starter: Starter | None = None,
        referral: ReferralPolicy | None = None,
    ) -> None:
        self.accounts = accounts
        self.balances = balances
        self.store = store
        self.starter = starter
        self.referrals = ReferralStore(store.pool, referral or ReferralPolicy())

    async def create_account(
        self, account: str | None = None, referral_code: str | None = None
    ) -> dict[str, Any]:
        account = f"acct_{secrets.token_hex(8)}" if account is None else account
        check_account_id(account)
        created = await self.referrals.create_account(account, referral_code)  # with its codes and link
        # Also on a conflict: a create that died between Postgres and Redis is finished by its retry.
        await self.accounts.add_account(account)
        if self.starter is not None:  # once per account (its idempotency key), also when retried
            s = self.starter
            terms = s.terms(self.balances.wallet.clock())
            await self.grant(account, s.amount, s.IDEMPOTENCY_KEY, "starter", terms=terms)
        if not created:
            raise Conflict(f"Account {account!r} already exists.", param="id")
        return {"id": account}

    async def create_key(self, account: str, name: str | None = None, expires_ms: int = 0) -> dict[str, Any]:
        """A new key (its terms checked by keys_api.new_key_terms), shown once."""
        _known_account(account)
        if not await self.store.account_exists(account):
            raise NotFound(f"No account {account!r}.", param="account")
        key = new_key(account, expires_ms)
        expires_at = at_ms(expires_ms)
        prefix = key.display_prefix
        await self.store.add_key(
            key.key_id, account, hash_key(key.api_key), name=name, expires_at=expires_at, prefix=prefix
        )
        await self.accounts.add_key(key)
        return {
            "id": key.key_id,
            "account": key.account,
            "key": key.api_key,
            "name": name,
            "prefix": prefix,
            "expires_at": expires_at.isoformat().replace("+00:00", "Z") if expires_at else None,
        }

    async def revoke_key(self, key_id: str) -> dict[str, Any]:
        revoked = await self.store.revoke_key(key_id) if storable(key_id) else None
        if revoked is None:
            raise NotFound(f"No API key {key_id!r}.", param="key_id")
        account, key_hash = revoked
        (used_ms,) = await self.accounts.last_used_ms([key_hash])  # kept in Postgres as the record goes
        await WalletStore(self.store.pool).note_last_used(key_id, used_ms)
        await self.accounts.remove_key(key_id, account, key_hash)
        return {"id": key_id, "account": account, "revoked": True}

    async def grant(
        self,
        account: str,
        amount: int,
        idempotency_key: str,
        kind: str = "grant",
        note: str | None = None,
        *,
        terms: GrantTerms | None = None,
        payment_ref: str | None = None,
    ) -> dict[str, Any]:
        """Money in, exactly once: the ledger row first (unique by idempotency key), then the Redis credit
        keyed by the same id, then the row is marked applied. A retry, or the reconciler, finishes a grant
        that stopped half-way; neither can credit twice."""
        _known_account(account)
        if not idempotency_key or len(idempotency_key) > 200 or not storable(idempotency_key):
            raise BadRequest(
                "A grant needs an Idempotency-Key of 1-200 characters (UTF-8, no NUL).",
                param="Idempotency-Key",
            )
        if kind not in MONEY_IN_KINDS:
            raise BadRequest(f"kind must be one of {', '.join(MONEY_IN_KINDS)}.", param="kind")
        if note is not None and not storable(note):
            raise BadRequest("note must be UTF-8 text without NUL characters.", param="note")
        if payment_ref is not None and (len(payment_ref) > 200 or not storable(payment_ref)):
            raise BadRequest("payment_ref must be 1-200 characters of UTF-8 text.", param="payment_ref")
        terms = terms or GrantTerms(kind=kind)
        ledger_id = f"in:{account}:{idempotency_key}"  # keys are scoped to their account
        row = await self.store.record_money_in(
            ledger_id,
            account,
            kind,
            amount,
            note,
            grant_id=idempotency_key,
            terms=terms,
            payment_ref=payment_ref,
        )
        if not row.applied:
            await self.accounts.add_account(account)  # no-op unless a create stopped half-way
            for attempt in range(2):
                try:  # (an IdempotencyConflict here is ruled out by the ledger row)
                    await self.balances.credit(account, ledger_id, amount, terms, grant_id=idempotency_key)
                except NotInitialized:
                    # Redis was lost and not rebuilt yet: rebuild it now (the rebuild sets balances to
                    # the ledger's, this row included), then credit; if another process is rebuilding,
                    # the row stays "not applied" and the reconciler completes it.
                    if attempt == 0:
                        b = self.balances
                        await rebuild_if_empty(
                            b.redis, b.keys, self.store, settled_marker_ms=b.settled_marker_ms
                        )
                        continue
                    break
                await self.store.mark_applied([ledger_id])
                break
        view = await self.balances.balance(account)
        return {
            "account": account,
            "amount": amount,
            "kind": kind,
            "credited": row.created,
            "balance": view.balance,
            "balance_credits": format_credits(view.balance),
        }

    async def balance(self, account: str) -> dict[str, Any]:
        view = await self.balances.balance(account)
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
        if not token:
            raise Forbidden("The admin API is off: set admin_token to turn it on.")
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
            raise Unauthorized("Missing or wrong admin token.", code="invalid_admin_token")
        response: web.StreamResponse = await handler(request)
        return response

    async def create_account(request: web.Request) -> web.Response:
        body = _decode(await request.read(), AccountBody)
        ops = request.config_dict[ADMIN_OPS]
        return _json(await ops.create_account(body.id, body.referral_code), status=201)

    async def get_account(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ADMIN_OPS].balance(request.match_info["account"]))

    async def create_key(request: web.Request) -> web.Response:
        name, expires_ms = new_key_terms(_decode(await request.read(), KeyBody), time.time_ns() // 1_000_000)
        ops = request.config_dict[ADMIN_OPS]
        return _json(await ops.create_key(request.match_info["account"], name, expires_ms), status=201)

    async def revoke_key(request: web.Request) -> web.Response:
        return _json(await request.config_dict[ADMIN_OPS].revoke_key(request.match_info["key_id"]))

    async def grant(request: web.Request) -> web.Response:
        body = _decode(await request.read(), GrantBody)
        amount = grant_amount(body.amount, body.credits)
        terms = grant_terms(body, time.time_ns() // 1_000_000)
        key = request.headers.get("Idempotency-Key", "")
        ops = request.config_dict[ADMIN_OPS]
        account = request.match_info["account"]
        granted = await ops.grant(
            account, amount, key, body.kind, body.note, terms=terms, payment_ref=body.payment_ref
        )
        return _json(granted)

    app = web.Application(middlewares=[require_token])
    app.router.add_post("/accounts", create_account)
    app.router.add_get("/accounts/{account}", get_account)
    app.router.add_post("/accounts/{account}/keys", create_key)
    app.router.add_delete("/keys/{key_id}", revoke_key)
    app.router.add_post("/accounts/{account}/grants", grant)
    return app
