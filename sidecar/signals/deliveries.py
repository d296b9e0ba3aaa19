"""Deliveries of events in Postgres: the fan-out of a new event to its channels (in the emitting
transaction: a restart loses none), the worker's claim of due ones, each attempt's record (the delivery
log), replays, and the accounts' contact addresses. Times come from the clock it is given."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from .events import Connection, Event
from .schedule import Outcome
from .settings import SignalSettings

Clock = Callable[[], dt.datetime]
WEBHOOK, EMAIL = "webhook", "email"
ERROR_CHARS = 500  # a logged error is cut to this


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Claimed:
    """A due delivery the worker leased, with its event."""

    delivery_id: int
    channel: str
    target: str
    attempts: int  # before this one
    window_start: dt.datetime
    event: Event


def _wanted(types: list[str], event_type: str) -> bool:
    return not types or event_type in types


class Deliveries:
    def __init__(self, pool: asyncpg.Pool, settings: SignalSettings, clock: Clock = utcnow) -> None:
        self.pool, self.settings, self.clock = pool, settings, clock

    @property
    def channels(self) -> list[str]:
        """The channels this sidecar can send on (its settings)."""
        s = self.settings
        return [WEBHOOK] * (s.signal_webhook_url is not None) + [EMAIL] * (s.smtp_host is not None)

    async def targets(self, conn: Connection, event: Event) -> list[tuple[str, str]]:
        """(channel, target) pairs the settings deliver `event` to."""
        s, out = self.settings, []
        if s.signal_webhook_url is not None and _wanted(s.signal_webhook_events, event.type):
            out.append((WEBHOOK, s.signal_webhook_url))
        if s.smtp_host is not None and _wanted(s.signal_email_events, event.type):
            addresses = [s.alert_email_to] if s.alert_email_to else []
            if s.signal_email_contacts:
                contact = await conn.fetchval(
                    "SELECT email FROM signal_contacts WHERE account_id = $1", event.account
                )
                addresses += [contact] if contact else []
            out += [(EMAIL, a) for a in dict.fromkeys(addresses)]
        return out

    async def fan_out(self, conn: Connection, event: Event) -> None:
        """The EventLog's on_emit hook: one pending delivery per channel and target, due now."""
        now = self.clock()
        for channel, target in await self.targets(conn, event):
            await conn.execute(
                "INSERT INTO signal_deliveries (event_id, channel, target, window_start_at, next_attempt_at)"
                " VALUES ($1, $2, $3, $4, $4) ON CONFLICT DO NOTHING",
                event.id,
                channel,
                target,
                now,
            )

    async def claim(self, now: dt.datetime, lease: dt.timedelta, limit: int) -> list[Claimed]:
        """Lease up to `limit` due pending deliveries of this sidecar's channels until `now + lease`
        (a worker that dies mid-send leaves them due again then); rows another worker holds are skipped."""
        rows = await self.pool.fetch(
            "WITH due AS (SELECT delivery_id FROM signal_deliveries"
            " WHERE status = 'pending' AND next_attempt_at <= $1 AND channel = ANY($2::text[])"
            " ORDER BY next_attempt_at, delivery_id LIMIT $3 FOR UPDATE SKIP LOCKED)"
            " UPDATE signal_deliveries d SET next_attempt_at = $4 FROM due, signal_events e"
            " WHERE d.delivery_id = due.delivery_id AND e.event_id = d.event_id"
            " RETURNING d.delivery_id, d.channel, d.target, d.attempts, d.window_start_at,"
            " e.event_id, e.type, e.account_id, e.data, e.created_at",
            now,
            self.channels,
            limit,
            now + lease,
        )
        return [
            Claimed(
                r["delivery_id"],
                r["channel"],
                r["target"],
                r["attempts"],
                r["window_start_at"],
                Event(
                    id=r["event_id"],
                    type=r["type"],
                    account=r["account_id"],
                    data=json.loads(r["data"]),
                    created_at=r["created_at"],
                ),
            )
            for r in sorted(rows, key=lambda r: int(r["delivery_id"]))
        ]

    async def record(
        self,
        claimed: Claimed,
        outcome: Outcome,
        next_at: dt.datetime | None,
        *,
        at: dt.datetime,
        reply: str | None,
        error: str | None,
        duration_ms: int,
    ) -> None:
        """Log one attempt and move the delivery on: delivered, due again at `next_at`, or failed."""
        error = error[:ERROR_CHARS] if error else None
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO signal_delivery_attempts"
                " (delivery_id, attempted_at, outcome, reply, error, duration_ms)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                claimed.delivery_id,
                at,
                outcome,
                reply,
                error,
                duration_ms,
            )
            await conn.execute(
                "UPDATE signal_deliveries SET attempts = attempts + 1,"
                " status = CASE WHEN $2 = 'retry' THEN 'pending' ELSE $2 END,"
                " next_attempt_at = COALESCE($3, next_attempt_at), last_error = $4,"
                " delivered_at = CASE WHEN $2 = 'delivered' THEN $5 ELSE delivered_at END"
                " WHERE delivery_id = $1 AND status = 'pending'",
                claimed.delivery_id,
                outcome,
                next_at,
                error,
                at,
            )

    async def replay(self, event: Event) -> list[dict[str, Any]]:
        """Queue `event` again, due now, on each of its deliveries and each channel now configured; the
        retry window starts again and the log keeps every earlier attempt. Twice in a row queues once."""
        now = self.clock()
        async with self.pool.acquire() as conn, conn.transaction():
            for channel, target in await self.targets(conn, event):
                await conn.execute(
                    "INSERT INTO signal_deliveries"
                    " (event_id, channel, target, window_start_at, next_attempt_at)"
                    " VALUES ($1, $2, $3, $4, $4) ON CONFLICT DO NOTHING",
                    event.id,
                    channel,
                    target,
                    now,
                )
            await conn.execute(
                "UPDATE signal_deliveries SET status = 'pending', window_start_at = $2,"
                " next_attempt_at = $2 WHERE event_id = $1",
                event.id,
                now,
            )
            return await self.log_of(conn, event.id)

    async def log_of(self, conn: Connection, event_id: str) -> list[dict[str, Any]]:
        """The event's deliveries, each with its attempts (oldest first): the delivery log."""
        rows = await conn.fetch(
            "SELECT * FROM signal_deliveries WHERE event_id = $1 ORDER BY delivery_id", event_id
        )
        tried = await conn.fetch(
            "SELECT a.* FROM signal_delivery_attempts a JOIN signal_deliveries d USING (delivery_id)"
            " WHERE d.event_id = $1 ORDER BY a.attempt_id",
            event_id,
        )
        attempts: dict[int, list[dict[str, Any]]] = {}
        for a in tried:
            attempts.setdefault(a["delivery_id"], []).append(
                {
                    "at": a["attempted_at"].isoformat(),
                    "outcome": a["outcome"],
                    "reply": a["reply"],
                    "error": a["error"],
                    "duration_ms": a["duration_ms"],
                }
            )
        return [
            {
                "id": r["delivery_id"],
                "channel": r["channel"],
                "target": r["target"],
                "status": r["status"],
                "attempts": r["attempts"],
                "next_attempt_at": r["next_attempt_at"].isoformat() if r["status"] == "pending" else None,
                "last_error": r["last_error"],
                "delivered_at": r["delivered_at"].isoformat() if r["delivered_at"] else None,
                "log": attempts.get(r["delivery_id"], []),
            }
            for r in rows
        ]

    async def contact(self, account: str) -> str | None:
        email: str | None = await self.pool.fetchval(
            "SELECT email FROM signal_contacts WHERE account_id = $1", account
        )
        return email

    async def set_contact(self, account: str, email: str | None) -> bool:
        """Set (or, with None, remove) the account's contact address; False: no such account."""
        if email is None:
            await self.pool.execute("DELETE FROM signal_contacts WHERE account_id = $1", account)
            return bool(await self.pool.fetchval("SELECT true FROM accounts WHERE id = $1", account))
        try:
            await self.pool.execute(
                "INSERT INTO signal_contacts (account_id, email) VALUES ($1, $2) ON CONFLICT (account_id)"
                " DO UPDATE SET email = EXCLUDED.email, updated_at = now()",
                account,
                email,
            )
        except asyncpg.ForeignKeyViolationError:
            return False
        return True
