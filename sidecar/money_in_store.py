"""Money in, in Postgres: the ledger row and its grant, written once per idempotency id before Redis is
credited, marked applied after; and the grants' remainders the rebuild of a lost Redis starts from.
A mixin of `LedgerStore` (its pool)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .errors import IdempotencyConflict, UnknownAccount
from .ledger_schema import LedgerConnection
from .ledger_sql import LEDGER_BARRIER, scoped
from .wallet import Grant, GrantTerms


@dataclass(frozen=True, slots=True)
class MoneyIn:
    idempotency_id: str
    account: str
    amount: int
    applied: bool
    created: bool  # False: the row existed (a retry)


@dataclass(frozen=True, slots=True)
class PendingGrant:
    """A money-in row whose Redis credit may not have happened, with its grant's terms."""

    idempotency_id: str
    account: str
    amount: int
    grant_id: str
    terms: GrantTerms


def _ms(at: dt.datetime | None) -> int:
    return 0 if at is None else int(at.timestamp() * 1000)


def _at(ms: int) -> dt.datetime | None:
    return None if ms == 0 else dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


_PENDING = (
    "SELECT l.idempotency_id, l.account_id, l.amount, g.grant_id, g.kind, g.priority, g.effective_at,"
    " g.expires_at, g.idle_expiry FROM ledger l LEFT JOIN grants g ON g.account_id = l.account_id"
    " AND 'in:' || g.account_id || ':' || g.grant_id = l.idempotency_id"
    " WHERE NOT l.applied AND l.created_at <= now() - make_interval(secs => $1)"
    " ORDER BY l.created_at, l.idempotency_id"
)


class MoneyInStore:
    pool: asyncpg.Pool

    async def record_money_in(
        self,
        idempotency_id: str,
        account: str,
        kind: str,
        amount: int,
        note: str | None,
        *,
        grant_id: str | None = None,
        terms: GrantTerms | None = None,
        payment_ref: str | None = None,
    ) -> MoneyIn:
        """Write a credit row once per idempotency id (not yet applied to Redis), with its grant (when
        `grant_id` is given: kind, amount, priority, dates); a retry returns the row. A retry with another
        kind or amount is an IdempotencyConflict."""
        async with self.pool.acquire() as conn, conn.transaction():
            # Shared barrier: a reconcile reads the rows not yet applied and then Redis; no new one may
            # appear between the two reads.
            await conn.execute(f"SELECT pg_advisory_xact_lock_shared({scoped('$1')})", LEDGER_BARRIER)
            if not await conn.fetchval("SELECT true FROM accounts WHERE id = $1", account):
                raise UnknownAccount(account)
            # The key is unique by (account, id) alone; the ledger row it names is partitioned by the
            # time of the first attempt, which a retry reads back from here.
            created_at = await conn.fetchval(
                "INSERT INTO money_in_keys (account_id, idempotency_id, created_at) VALUES ($1, $2, now())"
                " ON CONFLICT DO NOTHING RETURNING created_at",
                account,
                idempotency_id,
            )
            if created_at is not None:
                await conn.execute(
                    "INSERT INTO ledger (idempotency_id, account_id, kind, amount, applied, note, created_at)"
                    " VALUES ($1, $2, $3, $4, false, $5, $6)",
                    idempotency_id,
                    account,
                    kind,
                    amount,
                    note,
                    created_at,
                )
                await conn.execute(
                    "UPDATE accounts SET balance = balance + $2 WHERE id = $1", account, amount
                )
                if grant_id is not None:
                    t = terms or GrantTerms(kind=kind)
                    effective = _at(t.effective_ms) if t.effective_ms else created_at
                    await conn.execute(
                        "INSERT INTO grants (account_id, grant_id, kind, amount, priority, effective_at,"
                        " expires_at, idle_expiry, payment_ref, created_at)"
                        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                        account,
                        grant_id,
                        kind,
                        amount,
                        t.drawn_priority,
                        effective,
                        _at(t.expires_ms),
                        t.idle_expiry,
                        payment_ref,
                        created_at,
                    )
                return MoneyIn(idempotency_id, account, amount, applied=False, created=True)
            existing = await conn.fetchrow(
                "SELECT l.account_id, l.kind, l.amount, l.applied FROM money_in_keys k JOIN ledger l"
                " ON (l.account_id, l.created_at, l.idempotency_id) = (k.account_id, k.created_at,"
                " k.idempotency_id) WHERE k.account_id = $1 AND k.idempotency_id = $2",
                account,
                idempotency_id,
            )
        assert existing is not None
        if (existing["account_id"], existing["kind"], existing["amount"]) != (account, kind, amount):
            raise IdempotencyConflict(idempotency_id)
        return MoneyIn(idempotency_id, account, amount, applied=existing["applied"], created=False)

    async def mark_applied(self, idempotency_ids: Sequence[str]) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock_shared({scoped('$1')})", LEDGER_BARRIER)
            await conn.execute(
                "UPDATE ledger SET applied = true WHERE idempotency_id = ANY($1::text[]) AND NOT applied",
                list(idempotency_ids),
            )

    async def unapplied(self, older_than_seconds: float = 0) -> list[tuple[str, str, int]]:
        """Money-in rows whose Redis credit may not have happened: (idempotency id, account, amount)."""
        return [
            (p.idempotency_id, p.account, p.amount) for p in await self.unapplied_grants(older_than_seconds)
        ]

    async def unapplied_grants(self, older_than_seconds: float = 0) -> list[PendingGrant]:
        """Money-in rows whose Redis credit may not have happened, with their grants' terms (a row from
        before grants is credited as a grant of its own kind, its id the ledger id)."""
        rows = await self.pool.fetch(_PENDING, older_than_seconds)
        found = []
        for r in rows:
            if r["grant_id"] is None:
                found.append(PendingGrant(r[0], r[1], r[2], r[0], GrantTerms(kind="grant", idle=False)))
                continue
            terms = GrantTerms(
                kind=r["kind"],
                priority=r["priority"],
                expires_ms=_ms(r["expires_at"]),
                idle=r["idle_expiry"],
                effective_ms=_ms(r["effective_at"]),
            )
            found.append(PendingGrant(r[0], r[1], r[2], r["grant_id"], terms))
        return found

    @staticmethod
    async def grant_remainders(conn: LedgerConnection) -> dict[str, list[Grant]]:
        """Every grant with something left, by account, as the ledger knows it: its amount less what
        flushed usage, expiries and payoffs drew from it."""
        rows = await conn.fetch(
            "SELECT g.account_id, g.grant_id, g.amount - g.drawn - COALESCE(d.drawn, 0) AS remaining,"
            " g.kind, g.priority, g.effective_at, g.expires_at, g.idle_expiry FROM grants g"
            " LEFT JOIN (SELECT account_id, grant_id, sum(amount) AS drawn FROM grant_draws"
            " GROUP BY account_id, grant_id) d USING (account_id, grant_id)"
            " WHERE g.amount - g.drawn - COALESCE(d.drawn, 0) > 0"
        )
        found: dict[str, list[Grant]] = {}
        for r in rows:
            grant = Grant(
                r["grant_id"],
                int(r["remaining"]),
                _ms(r["expires_at"]),
                r["priority"],
                _ms(r["effective_at"]),
                r["idle_expiry"],
                r["kind"],
            )
            found.setdefault(r["account_id"], []).append(grant)
        return found
