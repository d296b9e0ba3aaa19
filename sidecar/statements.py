"""The credit reads' queries: usage from the roll-ups (never a scan of the ledger), an account's history
page by page (the ledger's primary key, newest first), a statement streamed in time order, one request's
usage row, and the grants' remainders as the ledger knows them."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from .credit_params import Cursor, HistoryQuery, UsageQuery

# Sums of one (dim, value) over days, as integers.
_SUMS = (
    "sum(requests)::bigint AS requests, sum(charge)::bigint AS charge, sum(saved)::bigint AS saved,"
    " sum(prompt_tokens)::bigint AS prompt_tokens, sum(completion_tokens)::bigint AS completion_tokens"
)
USAGE_FIELDS = ("requests", "charge", "saved", "prompt_tokens", "completion_tokens")


def _period(condition: str, prefix: str) -> str:
    return ", ".join(
        f"coalesce(sum({f}) FILTER (WHERE {condition}), 0)::bigint AS {prefix}_{f}" for f in USAGE_FIELDS
    )


# The summary's usage in one pass over the account's roll-ups of this month (and the last 7 days): per
# dimension and value, today's and the month's sums, only the top $4 values of each dimension by today's or
# the month's charge (ranked in SQL: an account with thousands of end users sends back a few rows); the
# 7 days' charge comes with the 'total' row.
_SUMMARY = f"""
WITH sums AS (
    SELECT dim, value,
        {_period("day = $2", "today")},
        {_period("day >= $3", "month")},
        coalesce(sum(charge) FILTER (WHERE day > $2 - 7), 0)::bigint AS week_charge
    FROM usage_rollup WHERE account_id = $1 AND day >= least($3, $2 - 6) AND day <= $2
    GROUP BY dim, value
), ranked AS (
    SELECT *, row_number() OVER (PARTITION BY dim ORDER BY today_charge DESC, value) AS by_today,
        row_number() OVER (PARTITION BY dim ORDER BY month_charge DESC, value) AS by_month
    FROM sums
)
SELECT * FROM ranked WHERE dim = 'total' OR by_today <= $4 OR by_month <= $4
"""


# Rows written before migration 019 say 'pooled' / 'byok': shown as the key sources they were.
KEY_SOURCE = "CASE key_source WHEN 'pooled' THEN 'pool' WHEN 'byok' THEN 'inline' ELSE key_source END"

_HISTORY_COLUMNS = (
    "idempotency_id, kind, amount, created_at, route, model, key_id, end_user, tags, drawn, note,"
    f" prompt_tokens, cached_tokens, completion_tokens, saved, outcome, {KEY_SOURCE} AS key_source, attempts"
)

# Never the provider's cost (`cost`): that is the operator's (GET /admin/margins).
_REQUEST = f"""
SELECT idempotency_id, amount, model, route, provider, {KEY_SOURCE} AS key_source, multiplier, key_id,
    end_user, tags, drawn, hold, overdraft, saved, outcome, prompt_tokens, cached_tokens, completion_tokens,
    started_at, settled_at, created_at, attempts, upstream_model,
    coalesce(marked_up, key_source = 'pooled') AS marked_up
FROM ledger WHERE idempotency_id = $1 AND account_id = $2 AND kind = 'usage'
"""

_GRANTS = """
SELECT g.grant_id, g.kind, g.expires_at, g.idle_expiry,
    g.amount - g.drawn - coalesce((SELECT sum(d.amount) FROM grant_draws d
        WHERE d.account_id = g.account_id AND d.grant_id = g.grant_id), 0) AS remaining
FROM grants g WHERE g.account_id = $1
"""


async def summary_usage(pool: asyncpg.Pool, account: str, today: dt.date, top: int) -> list[asyncpg.Record]:
    month = today.replace(day=1)
    return list(await pool.fetch(_SUMMARY, account, today, month, top))


async def usage(pool: asyncpg.Pool, account: str, q: UsageQuery) -> list[asyncpg.Record]:
    """Day by day (ascending), or per value of a dimension by charge (descending, then by value)."""
    if q.group_by == "day":
        sql = (
            f"SELECT day, {_SUMS} FROM usage_rollup WHERE account_id = $1 AND day BETWEEN $2 AND $3"
            " AND dim = 'total' GROUP BY day ORDER BY day LIMIT $4"
        )
        return list(await pool.fetch(sql, account, q.first_day, q.last_day, q.limit))
    sql = (
        f"SELECT value, {_SUMS} FROM usage_rollup WHERE account_id = $1 AND day BETWEEN $2 AND $3"
        " AND dim = $4 GROUP BY value ORDER BY sum(charge) DESC, value LIMIT $5"
    )
    return list(await pool.fetch(sql, account, q.first_day, q.last_day, q.group_by, q.limit))


def _history_filter(q: HistoryQuery, first: int) -> tuple[str, list[Any]]:
    """The WHERE clauses past (account, from, to), with their arguments numbered from `first`."""
    clauses: list[str] = []
    args: list[Any] = []
    if q.kinds:
        args.append(list(q.kinds))
        clauses.append(f" AND kind = ANY(${first + len(args) - 1}::text[])")
    if q.key_id is not None:
        args.append(q.key_id)
        clauses.append(f" AND key_id = ${first + len(args) - 1}")
    return "".join(clauses), args


async def cursor_exists(pool: asyncpg.Pool, account: str, cursor: Cursor) -> bool:
    found = await pool.fetchval(
        "SELECT true FROM ledger WHERE account_id = $1 AND created_at = $2 AND idempotency_id = $3",
        account,
        cursor.created_at,
        cursor.idempotency_id,
    )
    return bool(found)


async def history(pool: asyncpg.Pool, account: str, q: HistoryQuery) -> list[asyncpg.Record]:
    """One page, newest first: up to limit + 1 rows (one more tells the caller there is a next page)."""
    where, args = _history_filter(q, 4)
    if q.cursor is not None:
        n = 4 + len(args)
        where += f" AND (created_at, idempotency_id) < (${n}, ${n + 1})"
        args += [q.cursor.created_at, q.cursor.idempotency_id]
    sql = (
        f"SELECT {_HISTORY_COLUMNS} FROM ledger WHERE account_id = $1 AND created_at >= $2"
        f" AND created_at < $3{where} ORDER BY created_at DESC, idempotency_id DESC LIMIT {q.limit + 1}"
    )
    return list(await pool.fetch(sql, account, q.start, q.to, *args))


async def statement(pool: asyncpg.Pool, account: str, q: HistoryQuery) -> AsyncIterator[asyncpg.Record]:
    """Every row of the range in time order, through a server-side cursor (one snapshot)."""
    where, args = _history_filter(q, 4)
    sql = (
        f"SELECT {_HISTORY_COLUMNS} FROM ledger WHERE account_id = $1 AND created_at >= $2"
        f" AND created_at < $3{where} ORDER BY created_at, idempotency_id"
    )
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        async for row in conn.cursor(sql, account, q.start, q.to, *args, prefetch=1_000):
            yield row


async def request_row(pool: asyncpg.Pool, account: str, request_id: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await pool.fetchrow(_REQUEST, request_id, account)
    return row


async def ledger_grants(pool: asyncpg.Pool, account: str) -> list[asyncpg.Record]:
    """The account's grants with something left, as the ledger knows them (flushed draws only)."""
    return [r for r in await pool.fetch(_GRANTS, account) if r["remaining"] > 0]
