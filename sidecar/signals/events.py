"""The events the sidecar tells the operator about, written to Postgres in the caller's transaction.

An event's id is derived from its cause (a crossing's number, a reload's id, a meter's period), so the
code that emits it may run twice (a replayed flush, a retried worker pass) and the event exists once.
Delivery (webhooks, email) reads from here; emitting never waits for a receiver."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec

# Event types (the README's "Events" table lists each with its data).
BALANCE_LOW = "balance.low"  # a low-balance threshold crossed (a rule's amount or share of the last top-up)
BALANCE_DEPLETED = "balance.depleted"  # a settle took the balance to zero (or below): new work gets 402
SPEND_HIGH = "spend.high"  # spend in a day or a month crossed a cost alert's amount
METER_UNPAID = "meter.unpaid"  # a period's charge found too little available: the meter is unpaid
LOW_RUNWAY = "balance.low_runway"  # the balance no longer covers the next 48 h of recurring charges
RELOAD_REQUESTED = "reload.requested"  # auto-reload crossed its threshold: one reload started
RELOAD_SUCCEEDED = "reload.succeeded"  # its credits landed
RELOAD_FAILED = "reload.failed"  # declined, a failed payment, or the operator reported it
RELOAD_DISABLED = "reload.disabled"  # too many failures in a row: auto-reload turned off

Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy


class Event(msgspec.Struct, kw_only=True, frozen=True):
    id: str
    type: str
    account: str
    data: dict[str, Any]
    created_at: dt.datetime | None = None  # set by Postgres when written

    def body(self) -> dict[str, Any]:
        """The event as it is delivered (the webhook body, the email's facts)."""
        created = self.created_at.isoformat() if self.created_at else None
        return {
            "id": self.id,
            "type": self.type,
            "account": self.account,
            "created_at": created,
            "data": self.data,
        }


# Called in the emitting transaction, once per new event (delivery fans it out to its channels).
OnEmit = Callable[[Connection, Event], Awaitable[None]]


class EventLog:
    """Writes events; one per app, passed to whatever emits (alerts, reloads, meters)."""

    def __init__(self) -> None:
        self.on_emit: list[OnEmit] = []

    async def emit(self, conn: Connection, event: Event) -> bool:
        """Write the event (in the caller's transaction) unless one with its id exists; True when new."""
        row = await conn.fetchrow(
            "INSERT INTO signal_events (event_id, type, account_id, data) VALUES ($1, $2, $3, $4::jsonb)"
            " ON CONFLICT (event_id) DO NOTHING RETURNING created_at",
            event.id,
            event.type,
            event.account,
            json.dumps(event.data, separators=(",", ":"), sort_keys=True),
        )
        if row is None:
            return False
        written = msgspec.structs.replace(event, created_at=row["created_at"])
        for hook in self.on_emit:
            await hook(conn, written)
        return True


async def events_of(conn: Connection, account: str | None = None, limit: int = 100) -> list[Event]:
    """The newest events first (of one account, when given)."""
    rows = await conn.fetch(
        "SELECT event_id, type, account_id, data, created_at FROM signal_events"
        " WHERE $1::text IS NULL OR account_id = $1 ORDER BY created_at DESC, event_id LIMIT $2",
        account,
        limit,
    )
    return [_event(r) for r in rows]


async def event(conn: Connection, event_id: str) -> Event | None:
    row = await conn.fetchrow(
        "SELECT event_id, type, account_id, data, created_at FROM signal_events WHERE event_id = $1",
        event_id,
    )
    return _event(row) if row else None


def _event(row: asyncpg.Record) -> Event:
    return Event(
        id=row["event_id"],
        type=row["type"],
        account=row["account_id"],
        data=json.loads(row["data"]),
        created_at=row["created_at"],
    )
