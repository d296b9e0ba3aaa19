"""The meters and their period charges in Postgres (migration 011). Every function runs on the caller's
connection, so the charge worker keeps a meter's row lock across its steps."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import msgspec

from ..signals.events import Connection
from . import meters_periods as periods


class Meter(msgspec.Struct, kw_only=True, frozen=True):
    meter_id: str
    account: str
    resource_id: str
    kind: str  # 'period' or 'one_time'
    price: int  # micro-credits per unit per period
    price_name: str | None
    quantity: int
    period: str  # 'hour', 'day', 'month', '<seconds>s'
    status: str  # 'running', 'unpaid', 'stopped'
    started_ms: int
    stopped_ms: int | None = None
    next_period: int = 0
    next_due_ms: int | None = None
    body: dict[str, Any] = {}
    charged_periods: int = 0
    charged_total: int = 0

    @property
    def amount(self) -> int:
        """What one period costs (micro-credits)."""
        return self.price * self.quantity

    def due_after(self, next_period: int, stopped_ms: int | None = None) -> int | None:
        """When the period after the charged ones starts, or None when none is left to charge."""
        stop = self.stopped_ms if stopped_ms is None else stopped_ms
        return periods.next_due(self.kind, self.started_ms, self.period, next_period, stop)

    def view(self) -> dict[str, Any]:
        """The meter as the API returns it (amounts in integer micro-credits, times in epoch ms)."""
        return {
            "object": "meter",
            "id": self.meter_id,
            "account": self.account,
            "resource_id": self.resource_id,
            "kind": self.kind,
            "price": self.price,
            "price_name": self.price_name,
            "quantity": self.quantity,
            "period": self.period,
            "amount_per_period": self.amount,
            "status": self.status,
            "started_ms": self.started_ms,
            "stopped_ms": self.stopped_ms,
            "next_period": self.next_period,
            "next_charge_ms": self.next_due_ms,
            "charged_periods": self.charged_periods,
            "charged_total": self.charged_total,
        }


_COLUMNS = (
    "m.meter_id, m.account_id, m.resource_id, m.kind, m.price, m.price_name, m.quantity, m.period,"
    " m.status, m.started_ms, m.stopped_ms, m.next_period, m.next_due_ms, m.body"
)
_TOTALS = (
    ", (SELECT count(*) FROM meter_charges c WHERE c.meter_id = m.meter_id AND c.state = 'charged') AS n,"
    " (SELECT coalesce(sum(amount), 0) FROM meter_charges c"
    " WHERE c.meter_id = m.meter_id AND c.state = 'charged') AS total"
)


def _meter(row: asyncpg.Record) -> Meter:
    return Meter(
        meter_id=row["meter_id"],
        account=row["account_id"],
        resource_id=row["resource_id"],
        kind=row["kind"],
        price=row["price"],
        price_name=row["price_name"],
        quantity=row["quantity"],
        period=row["period"],
        status=row["status"],
        started_ms=row["started_ms"],
        stopped_ms=row["stopped_ms"],
        next_period=row["next_period"],
        next_due_ms=row["next_due_ms"],
        body=json.loads(row["body"]),
        charged_periods=row.get("n") or 0,
        charged_total=int(row.get("total") or 0),
    )


async def insert(conn: Connection, m: Meter) -> Meter | None:
    """The new meter, or None when the account has one for this resource id already."""
    row = await conn.fetchrow(
        "INSERT INTO meters AS m (meter_id, account_id, resource_id, kind, price, price_name, quantity,"
        " period, status, started_ms, next_period, next_due_ms, body)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', $9, 0, $9, $10::jsonb)"
        f" ON CONFLICT (account_id, resource_id) DO NOTHING RETURNING {_COLUMNS}",
        m.meter_id,
        m.account,
        m.resource_id,
        m.kind,
        m.price,
        m.price_name,
        m.quantity,
        m.period,
        m.started_ms,
        json.dumps(m.body, separators=(",", ":"), sort_keys=True),
    )
    return _meter(row) if row else None


async def by_resource(conn: Connection, account: str, resource_id: str) -> Meter | None:
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS}{_TOTALS} FROM meters m WHERE account_id = $1 AND resource_id = $2",
        account,
        resource_id,
    )
    return _meter(row) if row else None


async def get(conn: Connection, meter_id: str, account: str | None = None) -> Meter | None:
    """The meter (of `account`, when given), with its charged totals."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS}{_TOTALS} FROM meters m WHERE meter_id = $1"
        " AND ($2::text IS NULL OR account_id = $2)",
        meter_id,
        account,
    )
    return _meter(row) if row else None


async def of_account(conn: Connection, account: str, limit: int = 100) -> list[Meter]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS}{_TOTALS} FROM meters m WHERE account_id = $1 ORDER BY created_at, meter_id"
        " LIMIT $2",
        account,
        limit,
    )
    return [_meter(r) for r in rows]


async def lock(conn: Connection, meter_id: str) -> Meter | None:
    """The meter's row, locked for this transaction; None when another transaction holds it."""
    row = await conn.fetchrow(
        f"SELECT {_COLUMNS} FROM meters m WHERE meter_id = $1 FOR UPDATE SKIP LOCKED", meter_id
    )
    return _meter(row) if row else None


async def lock_due(conn: Connection, now_ms: int, limit: int, skip: list[str]) -> list[Meter]:
    """Meters with a period due by `now_ms` that no other transaction holds, locked (oldest due first),
    but those in `skip` (not even locked: another worker may be charging them)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM meters m WHERE next_due_ms IS NOT NULL AND next_due_ms <= $1"
        " AND NOT (meter_id = ANY($3::text[])) ORDER BY next_due_ms LIMIT $2 FOR UPDATE SKIP LOCKED",
        now_ms,
        limit,
        skip,
    )
    return [_meter(r) for r in rows]


async def add_pending(conn: Connection, m: Meter, window_end_ms: int) -> None:
    """The record of the meter's next period about to be charged (nothing when it exists)."""
    await conn.execute(
        "INSERT INTO meter_charges (meter_id, period, amount, state, window_end_ms, starts_ms)"
        " VALUES ($1, $2, $3, 'pending', $4, $5) ON CONFLICT DO NOTHING",
        m.meter_id,
        m.next_period,
        m.amount,
        window_end_ms,
        periods.start_of(m.started_ms, m.period, m.next_period),
    )


async def charge_of(conn: Connection, meter_id: str, period: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT amount, state, window_end_ms, starts_ms FROM meter_charges"
        " WHERE meter_id = $1 AND period = $2",
        meter_id,
        period,
    )


async def renew_window(conn: Connection, meter_id: str, period: int, window_end_ms: int) -> None:
    await conn.execute(
        "UPDATE meter_charges SET window_end_ms = $3"
        " WHERE meter_id = $1 AND period = $2 AND state = 'pending'",
        meter_id,
        period,
        window_end_ms,
    )


async def in_ledger(conn: Connection, account: str, request_id: str) -> bool:
    """Whether the flusher wrote the charge's ledger row (its outbox entry reached Postgres)."""
    found = await conn.fetchval(
        "SELECT true FROM ledger WHERE idempotency_id = $1 AND account_id = $2 LIMIT 1", request_id, account
    )
    return bool(found)


async def mark_charged(conn: Connection, m: Meter, period: int) -> None:
    """Period `period` is paid: the meter moves on to the next (and is running again if it was unpaid)."""
    await conn.execute(
        "UPDATE meter_charges SET state = 'charged', charged_at = now() WHERE meter_id = $1 AND period = $2",
        m.meter_id,
        period,
    )
    await conn.execute(
        "UPDATE meters SET next_period = $2, next_due_ms = $3,"
        " status = CASE WHEN status = 'unpaid' THEN 'running' ELSE status END WHERE meter_id = $1",
        m.meter_id,
        period + 1,
        m.due_after(period + 1),
    )


async def mark_unpaid(conn: Connection, meter_id: str) -> None:
    await conn.execute(
        "UPDATE meters SET status = 'unpaid' WHERE meter_id = $1 AND status = 'running'", meter_id
    )


async def stop(conn: Connection, m: Meter, stopped_ms: int) -> None:
    """No period starting at or after `stopped_ms` is charged (a stopped meter stays stopped)."""
    await conn.execute(
        "UPDATE meters SET status = 'stopped', stopped_ms = $2, next_due_ms = NULL"
        " WHERE meter_id = $1 AND status <> 'stopped'",
        m.meter_id,
        stopped_ms,
    )


async def live_of(conn: Connection, accounts: list[str]) -> list[Meter]:
    """The meters of these accounts that still charge (running or unpaid)."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM meters m WHERE account_id = ANY($1::text[]) AND status <> 'stopped'",
        accounts,
    )
    return [_meter(r) for r in rows]


async def runway_disarmed(conn: Connection) -> list[str]:
    """Accounts whose low-runway signal fired and has not re-armed (observed every pass until it does)."""
    rows = await conn.fetch(
        "SELECT account_id FROM signal_crossings WHERE signal = 'runway' AND NOT armed LIMIT 1000"
    )
    return [r["account_id"] for r in rows]
