"""Billing modes (migration 016): an account on `invoice` is admitted against a credit limit (NULL:
unlimited) instead of its balance; its usage accrues (the balance goes below zero, the ledger records the
full cost) and is invoiced at each period end, due `terms_days` after. A blocked account (an overdue
invoice past its grace, or the operator) gets no new positive hold: a 402 `invoice_overdue`.

Postgres is the truth (`account_billing`; no row: prepaid). Every change writes the row first, then the
account hash's `credit` and `blocked` fields (credit_lines.py) with one idempotent script, holding the
row's lock while it reads and writes, so Redis ends as the last committed row whichever write ran last;
`restore_billing` writes them again for a rebuilt Redis. A change Redis did not take (the account not in
Redis yet) is taken by the next rebuild or a retried call."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from .. import bodies
from ..config import ACCOUNT_ID
from ..credit_lines import CreditLines, available, credit_field, ledger_lines
from ..errors import BadRequest, UnknownAccount
from ..keys import KeySpace, as_text
from ..money import MAX_GRANT, MICRO, format_credits
from ..redis_client import RedisClient
from ..signals.events import Connection

log = logging.getLogger("creditgate.billing_modes")
MODES = ("prepaid", "invoice")
MAX_TERMS_DAYS = 365
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BillingBody(msgspec.Struct, forbid_unknown_fields=True):
    mode: str
    credit_limit: str | None = None  # decimal credits ("5000", "12.5"); null: unlimited (invoice mode)
    terms_days: int = 30


class BlockBody(msgspec.Struct, forbid_unknown_fields=True):
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class BillingMode:
    account: str
    mode: str
    credit_limit: int | None  # micro-credits; None: unlimited (invoice) or not applicable (prepaid)
    terms_days: int
    blocked: bool
    blocked_reason: str | None
    updated_at: str | None  # None: no row (prepaid by default)

    @classmethod
    def of(cls, account: str, row: Any) -> BillingMode:
        if row is None:
            return cls(account, "prepaid", None, 30, False, None, None)
        return cls(
            account,
            row["mode"],
            row["credit_limit"],
            row["terms_days"],
            row["blocked"],
            row["blocked_reason"],
            row["updated_at"].isoformat().replace("+00:00", "Z"),
        )

    @property
    def credit(self) -> str:
        """The account hash's `credit` field ("" none)."""
        return credit_field(self.mode, self.credit_limit)

    def view(self) -> dict[str, Any]:
        limit = self.credit_limit if self.mode == "invoice" else None
        return {
            "object": "billing_mode",
            "account": self.account,
            "mode": self.mode,
            "credit_limit": limit,
            "credit_limit_credits": None if limit is None else format_credits(limit),
            "unlimited": self.mode == "invoice" and limit is None,
            "terms_days": self.terms_days,
            "blocked": self.blocked,
            "blocked_reason": self.blocked_reason,
            "updated_at": self.updated_at,
        }


@dataclass(frozen=True, slots=True)
class InvoiceAccount:
    account: str
    terms_days: int
    credit_limit: int | None  # None: unlimited
    blocked: bool


def decode(raw: bytes, kind: type[Any]) -> Any:
    """The body, or a 400 naming the offending field (bodies.decode)."""
    return bodies.decode(raw, kind)


def credit_limit_of(text: str | None) -> int | None:
    """A credit limit in micro-credits from a decimal credits string (None: unlimited); a 400 naming
    credit_limit otherwise (parsed like the admin API's `credits`)."""
    if text is None:
        return None
    if not isinstance(text, str) or not text.strip() or len(text) > 40:
        raise BadRequest("credit_limit must be a decimal string of credits, or null.", param="credit_limit")
    try:
        exact = Decimal(text.strip()) * MICRO
    except ArithmeticError:
        raise BadRequest(
            f"credit_limit must be a decimal string, got {text!r}.", param="credit_limit"
        ) from None
    if not exact.is_finite() or exact != exact.to_integral_value():
        raise BadRequest(
            "credit_limit must be a whole number of micro-credits (6 decimals at most).", param="credit_limit"
        )
    limit = int(exact)
    if not 0 <= limit <= MAX_GRANT:
        raise BadRequest(
            f"credit_limit must be between 0 and {MAX_GRANT // MICRO} credits.", param="credit_limit"
        )
    return limit


def checked(body: BillingBody) -> tuple[str, int | None, int]:
    """(mode, credit limit, terms days), or a 400 naming the first bad field."""
    if body.mode not in MODES:
        raise BadRequest(f"mode must be one of {', '.join(MODES)}.", param="mode")
    if isinstance(body.terms_days, bool) or not 0 <= body.terms_days <= MAX_TERMS_DAYS:
        raise BadRequest(f"terms_days must be an integer from 0 to {MAX_TERMS_DAYS}.", param="terms_days")
    if body.mode == "prepaid" and body.credit_limit is not None:
        raise BadRequest("A prepaid account has no credit_limit: leave it out or null.", param="credit_limit")
    return body.mode, credit_limit_of(body.credit_limit), body.terms_days


def checked_reason(reason: str | None) -> str | None:
    if reason is None:
        return None
    trimmed = reason.strip()
    if len(trimmed) > 500 or _CONTROL.search(trimmed) or "\x00" in trimmed:
        raise BadRequest("reason must be at most 500 characters, no control characters.", param="reason")
    try:
        trimmed.encode()
    except UnicodeEncodeError:
        raise BadRequest("reason must be valid text.", param="reason") from None
    return trimmed or None


_COLUMNS = "mode, credit_limit, terms_days, blocked, blocked_reason, updated_at"


async def billing_row(conn: Connection, account: str, *, lock: bool = False) -> Any:
    suffix = " FOR UPDATE" if lock else ""
    sql = f"SELECT {_COLUMNS} FROM account_billing WHERE account_id = $1{suffix}"
    return await conn.fetchrow(sql, account)


async def invoice_accounts(conn: Connection) -> list[InvoiceAccount]:
    """Every account on invoice, by id: its terms, credit limit and whether it is blocked."""
    rows = await conn.fetch(
        "SELECT account_id, terms_days, credit_limit, blocked FROM account_billing WHERE mode = 'invoice'"
        " ORDER BY account_id"
    )
    return [InvoiceAccount(r["account_id"], r["terms_days"], r["credit_limit"], r["blocked"]) for r in rows]


async def restore_billing(redis: RedisClient, keys: KeySpace, conn: Connection) -> int:
    """Write every account_billing row's fields to Redis again (idempotent; the rebuild does the same in
    its partition transactions). Returns how many accounts Redis took."""
    lines = CreditLines(redis, keys)
    written = 0
    for account, (credit, blocked) in sorted((await ledger_lines(conn)).items()):
        written += await lines.write(account, credit, blocked)
    return written


class BillingModes:
    """What the routes and the lead's overdue worker call."""

    def __init__(self, pool: asyncpg.Pool, redis: RedisClient, keys: KeySpace) -> None:
        self.pool = pool
        self.lines = CreditLines(redis, keys)

    async def _known(self, conn: Connection, account: str) -> None:
        if not ACCOUNT_ID.match(account) or not await conn.fetchval(
            "SELECT 1 FROM accounts WHERE id = $1", account
        ):
            raise UnknownAccount(account)

    async def mode(self, account: str) -> BillingMode:
        if not ACCOUNT_ID.match(account):
            raise UnknownAccount(account)
        async with self.pool.acquire() as conn:
            row = await billing_row(conn, account)
            if row is None:
                await self._known(conn, account)
        return BillingMode.of(account, row)

    async def get(self, account: str) -> dict[str, Any]:
        return (await self.mode(account)).view()

    async def put(self, account: str, body: BillingBody) -> dict[str, Any]:
        mode, limit, terms = checked(body)
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._known(conn, account)
                await conn.execute(
                    "INSERT INTO account_billing (account_id, mode, credit_limit, terms_days)"
                    " VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO UPDATE SET"
                    " mode = EXCLUDED.mode, credit_limit = EXCLUDED.credit_limit,"
                    " terms_days = EXCLUDED.terms_days, updated_at = now()",
                    account,
                    mode,
                    limit,
                    terms,
                )
            return (await self._sync(conn, account)).view()

    async def set_blocked(self, account: str, blocked: bool, reason: str | None = None) -> BillingMode:
        """Block (no new positive hold) or unblock the account: Postgres, then Redis. The overdue worker's
        call; idempotent (the same call again leaves the same state)."""
        why = checked_reason(reason) if blocked else None
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                await self._known(conn, account)
                await conn.execute(
                    "INSERT INTO account_billing (account_id, blocked, blocked_reason) VALUES ($1, $2, $3)"
                    " ON CONFLICT (account_id) DO UPDATE SET blocked = EXCLUDED.blocked,"
                    " blocked_reason = EXCLUDED.blocked_reason, updated_at = now()"
                    " WHERE (account_billing.blocked, account_billing.blocked_reason)"
                    " IS DISTINCT FROM (EXCLUDED.blocked, EXCLUDED.blocked_reason)",
                    account,
                    blocked,
                    why,
                )
            return await self._sync(conn, account)

    async def _sync(self, conn: Connection, account: str) -> BillingMode:
        """Redis' fields from the committed row, written while holding its lock (see the module doc)."""
        async with conn.transaction():
            mode = BillingMode.of(account, await billing_row(conn, account, lock=True))
            if not await self.lines.write(account, mode.credit, mode.blocked):
                log.warning(
                    "billing mode of %s not in Redis yet (no account hash): the rebuild writes it", account
                )
        return mode

    async def own(self, account: str) -> dict[str, Any]:
        """The client's view (GET /v1/billing): its mode, limit, terms, whether blocked, and what it has
        available now (balance - held + the credit line; null when unlimited)."""
        mode = await self.mode(account)
        balance, held, credit, _ = await self.lines.read(account)
        view = mode.view()
        del view["blocked_reason"], view["updated_at"]
        now = available(account, (balance, held, credit))  # UnknownAccount when Redis has none
        free = None if view["unlimited"] else now
        bal = int(as_text(balance))
        view.update(
            balance=bal,
            balance_credits=format_credits(bal),
            available=free,
            available_credits=None if free is None else format_credits(free),
        )
        return view
