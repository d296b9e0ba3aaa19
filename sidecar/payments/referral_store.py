"""Referral codes and referrals in Postgres (migration 007): each account's codes, made once (when the
account is created, else the first time they are asked for), and the link of an account created with a
code to the code's owner, made in the transaction that creates the account.

An account's codes are made under a lock of its row, so two first reads at once still make them once.
A code's use is counted by ``UPDATE … SET uses = uses + 1 WHERE uses < max_uses`` in the same transaction
as the new account and its link: when the code is used up, or anything fails, no account is created."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import asyncpg

from ..errors import BadRequest, Conflict, NotFound
from .referral_codes import MAX_CODE_LENGTH, ReferralPolicy


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    uses: int
    max_uses: int
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Referral:
    account: str  # the referred account
    referrer: str
    code: str
    created_at: dt.datetime
    rewarded_at: dt.datetime | None


def check_code(code: str) -> None:
    """A code as it may be looked up (anything else names no code, and Postgres is never asked)."""
    if not (0 < len(code) <= MAX_CODE_LENGTH and code.isascii() and code.isprintable()):
        raise BadRequest(f"No referral code {code[:MAX_CODE_LENGTH]!r}.", param="referral_code")


class ReferralStore:
    def __init__(self, pool: asyncpg.Pool, policy: ReferralPolicy) -> None:
        self.pool = pool
        self.policy = policy

    async def create_account(self, account: str, code: str | None = None) -> bool:
        """Create the account (False: it existed), with its codes, and with `code` linked to the code's
        owner — all in one transaction. The code is checked first: an unknown code, one of the account's
        own (a retried create of an existing account) or one used up is refused and nothing is created.
        An account that existed is never linked (a retried create counts no second use)."""
        if code is not None:
            check_code(code)
        async with self.pool.acquire() as conn, conn.transaction():
            if code is not None:
                owner = await conn.fetchval("SELECT account_id FROM referral_codes WHERE code = $1", code)
                if owner is None:
                    raise BadRequest(f"No referral code {code!r}.", param="referral_code")
                if owner == account:
                    raise BadRequest(
                        "An account cannot be referred by its own referral code.",
                        param="referral_code",
                        code="self_referral",
                    )
            created = await conn.fetchval(
                "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING true", account
            )
            if created and code is not None:
                used = await conn.fetchval(
                    "UPDATE referral_codes SET uses = uses + 1 WHERE code = $1 AND uses < max_uses"
                    " RETURNING uses",
                    code,
                )
                if used is None:  # raised inside the transaction: the account is not created
                    raise Conflict(
                        f"The referral code {code!r} has been used as often as it may be.",
                        param="referral_code",
                        code="referral_code_used_up",
                    )
                await conn.execute(
                    "INSERT INTO referrals (account_id, referrer_id, code) VALUES ($1, $2, $3)",
                    account,
                    owner,
                    code,
                )
            await self._make_codes(conn, account)
        return bool(created)

    async def ensure_codes(self, account: str) -> None:
        """Make the account's codes if it has none (raises NotFound for no such account)."""
        async with self.pool.acquire() as conn, conn.transaction():
            await self._make_codes(conn, account)

    async def _make_codes(self, conn: Any, account: str) -> None:
        # The account's row is locked until the transaction ends: a second maker waits, then finds them.
        # (FOR NO KEY UPDATE does not block the ledger's inserts, which take a key share of the row.)
        if not await conn.fetchval("SELECT true FROM accounts WHERE id = $1 FOR NO KEY UPDATE", account):
            raise NotFound(f"No account {account!r}.", param="account")
        if await conn.fetchval("SELECT true FROM referral_codes WHERE account_id = $1 LIMIT 1", account):
            return
        made = 0
        while made < self.policy.per_account:  # a collision (one in ~10^12) just draws again
            made += int(
                await conn.fetchval(
                    "INSERT INTO referral_codes (code, account_id, max_uses) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING RETURNING 1",
                    self.policy.new_code(),
                    account,
                    self.policy.max_uses,
                )
                or 0
            )

    async def codes_of(self, account: str) -> list[Code]:
        rows = await self.pool.fetch(
            "SELECT code, uses, max_uses, created_at FROM referral_codes WHERE account_id = $1"
            " ORDER BY created_at, code",
            account,
        )
        return [Code(*r.values()) for r in rows]

    async def referral_of(self, account: str) -> Referral | None:
        """Who referred `account` (None: nobody)."""
        row = await self.pool.fetchrow(
            "SELECT account_id, referrer_id, code, created_at, rewarded_at FROM referrals"
            " WHERE account_id = $1",
            account,
        )
        return None if row is None else Referral(*row.values())

    async def referred_by(self, referrer: str) -> tuple[int, int, int]:
        """(accounts referred, of them rewarded, bonus micro-credits earned from referrals)."""
        row = await self.pool.fetchrow(
            "SELECT (SELECT count(*) FROM referrals WHERE referrer_id = $1),"
            " (SELECT count(*) FROM referrals WHERE referrer_id = $1 AND rewarded_at IS NOT NULL),"
            " (SELECT coalesce(sum(amount), 0) FROM grants WHERE account_id = $1 AND kind = 'bonus'"
            " AND grant_id LIKE 'referral:%')",
            referrer,
        )
        assert row is not None
        return int(row[0]), int(row[1]), int(row[2])

    async def mark_rewarded(self, account: str) -> None:
        await self.pool.execute(
            "UPDATE referrals SET rewarded_at = now() WHERE account_id = $1 AND rewarded_at IS NULL", account
        )
