"""An account's credit line in Redis: the account hash's `credit` and `blocked` fields that reserve.lua
reads with the balance (documents/billing_modes.py keeps them true to Postgres' account_billing).

`credit` absent: prepaid, admitted within the balance. An integer string: the credit limit (micro-credits)
of an account on invoice, admitted while balance - held + limit covers the hold. "unlimited": always
covered (spend caps still apply). `blocked` "1": no positive hold (an overdue invoice)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import UnknownAccount
from .keys import KeySpace, as_text
from .redis_client import RedisClient
from .scripts import load_lua

CREDIT, BLOCKED, UNLIMITED = "credit", "blocked", "unlimited"
AVAILABLE = ["balance", "held", CREDIT]  # the fields `available` reads
# What `available` says for an account with an unlimited credit line (2^53 - 1: exact everywhere).
UNLIMITED_AVAILABLE = 9_007_199_254_740_991


def credit_field(mode: str, credit_limit: int | None) -> str:
    """The `credit` field's value for a mode and limit ("" removes it: prepaid)."""
    if mode != "invoice":
        return ""
    return UNLIMITED if credit_limit is None else str(credit_limit)


def headroom(raw: Any) -> int | None:
    """What the stored `credit` field adds to the balance: 0 when absent, None when unlimited."""
    if raw is None:
        return 0
    text = as_text(raw)
    return None if text == UNLIMITED else int(text)


def available(account: str, fields: Sequence[Any]) -> int:
    """balance - held + the credit line (UNLIMITED_AVAILABLE when unlimited), from the account hash's
    AVAILABLE fields as read; UnknownAccount when it has no balance."""
    balance, held, credit = fields
    if balance is None:
        raise UnknownAccount(account)
    extra = headroom(credit)
    if extra is None:
        return UNLIMITED_AVAILABLE
    return int(as_text(balance)) - int(as_text(held or b"0")) + extra


async def ledger_lines(conn: Any) -> dict[str, tuple[str, bool]]:
    """Postgres' credit lines (migration 016's account_billing): account -> (credit field, blocked), for
    the accounts with a row (the others are prepaid and not blocked)."""
    rows = await conn.fetch("SELECT account_id, mode, credit_limit, blocked FROM account_billing")
    return {r["account_id"]: (credit_field(r["mode"], r["credit_limit"]), r["blocked"]) for r in rows}


def queue_line(pipe: Any, balance_key: str, credit: str, blocked: bool) -> None:
    """Queue the writes that give an account hash these fields ("" / False remove them): the rebuild's,
    in its partition transaction."""
    if credit:
        pipe.hset(balance_key, CREDIT, credit)
    else:
        pipe.hdel(balance_key, CREDIT)
    if blocked:
        pipe.hset(balance_key, BLOCKED, "1")
    else:
        pipe.hdel(balance_key, BLOCKED)


class CreditLines:
    """Writes the two fields with one idempotent script (lua/billing_mode.lua), never creating a hash."""

    def __init__(self, redis: RedisClient, keys: KeySpace) -> None:
        self.redis, self.keys = redis, keys
        self._script = redis.register_script(load_lua("billing_mode"))

    async def write(self, account: str, credit: str, blocked: bool) -> bool:
        """Set the fields; False when Redis has no such account (the rebuild will write them)."""
        k = self.keys.account(account)
        status = await self._script(keys=[k.balance], args=[credit, "1" if blocked else "0"])
        return int(status) == 1

    async def read(self, account: str) -> tuple[Any, Any, Any, Any]:
        """The raw balance, held, credit and blocked fields (None when absent)."""
        k = self.keys.account(account)
        fields = await self.redis.hmget(k.balance, ["balance", "held", CREDIT, BLOCKED])
        return fields[0], fields[1], fields[2], fields[3]
