"""The charge worker: each meter's periods charged in advance, at their start, exactly once per (meter,
period), with several sidecars running the same pass and restarts anywhere in it.

A period's charge is two Postgres transactions around the Redis step, each holding the meter's row lock
(FOR UPDATE SKIP LOCKED: a meter another sidecar is charging is skipped, not waited for):
1. the pending record: a meter_charges row (meter, period) with a window end, committed BEFORE any
   money moves, so every later try of this charge uses the same window end;
2. the money: `Balances.reserve` then `Balances.settle`, request id 'meter:<meter id>:<period>', window
   end the row's, then the row marked charged and the meter moved to its next period, committed.

The window where Redis charged but Postgres has not recorded it (a crash, a lost connection between the
settle and the commit of step 2) is covered by the settled marker: it lives until the row's window end
(`meter_marker_seconds`, 7 days by default, far longer than the flusher's lag), and a retry within it
finds the marker (the reserve answers "already settled", the settle returns the first charge and moves
nothing), so the retry only records what happened. A retry after the window end is refused by Redis
(by the server's clock, so the marker's expiry can never let a second charge in); then the ledger is
the witness: the settle's outbox entry has long become the ledger row 'meter:<id>:<period>' if Redis
charged, and the period is recorded as charged; without it nothing was charged, and the charge is
tried again with a new window end. A period that cannot be paid (the reserve finds too little
available) is not charged at all: the meter becomes 'unpaid', 'meter.unpaid' is emitted once per
(meter, period), and later passes try again (a top-up lets it through and the meter runs on).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal

from ..balances import Balances, ReserveStatus
from ..errors import WindowClosed
from ..outbox import UsageEvent
from ..signals.events import METER_UNPAID, Connection, Event, EventLog
from . import meters_store as store
from .meters_runway import cost_ahead, observe_runway
from .meters_store import Meter

LEASE_MS = 300_000  # a charge's hold, released by the reaper if its settle never comes
SAFETY_MS = 60_000  # a window this close to its end is treated as ended (clock skew, a slow call)
BATCH = 100  # meters claimed per transaction
MAX_CATCH_UP = 1000  # periods one meter is charged in one pass at most (a long outage's backlog)

Outcome = Literal["charged", "unpaid", "skipped"]


def request_id_of(meter_id: str, period: int) -> str:
    return f"meter:{meter_id}:{period}"


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class MeterCharges:
    """Charges the due periods; `clock` (ms) decides what is due, Redis's clock the marker windows."""

    def __init__(
        self,
        balances: Balances,
        pool: Any,
        events: EventLog,
        *,
        marker_ms: int,
        clock: Callable[[], int] = wall_ms,
        wall: Callable[[], int] = wall_ms,
    ) -> None:
        self.balances, self.pool, self.events = balances, pool, events
        self.marker_ms, self.clock, self.wall = marker_ms, clock, wall

    async def step(self) -> None:
        """One pass at the clock's now (the supervisor's step)."""
        await self.run_pass(self.clock())

    async def run_pass(self, now_ms: int) -> dict[str, int]:
        """Charge every period due by `now_ms`, then observe the runway of the accounts involved (and of
        those whose warning has not re-armed); returns how many periods each outcome had."""
        counts = {"charged": 0, "unpaid": 0, "skipped": 0}
        touched: set[str] = set()
        blocked: set[str] = set()  # meters unpaid (or skipped) in this pass: not tried again in it
        for _ in range(MAX_CATCH_UP):
            claimed = await self._claim(now_ms, blocked)
            if not claimed:
                break
            for m in claimed:
                outcome = await self.charge(m.meter_id, m.next_period, now_ms)
                counts[outcome] += 1
                touched.add(m.account)
                if outcome != "charged":
                    blocked.add(m.meter_id)
        await self.runway(sorted(touched), now_ms)
        return counts

    async def catch_up(self, meter_id: str, now_ms: int) -> Outcome:
        """Charge one meter's due periods (on creation, before a stop); the last outcome."""
        outcome: Outcome = "skipped"
        for _ in range(MAX_CATCH_UP):
            async with self.pool.acquire() as conn, conn.transaction():
                m = await store.lock(conn, meter_id)
                if m is None or m.next_due_ms is None or m.next_due_ms > now_ms:
                    return outcome
                await store.add_pending(conn, m, self.wall() + self.marker_ms)
            outcome = await self.charge(meter_id, m.next_period, now_ms)
            if outcome != "charged":
                return outcome
        return outcome

    async def _claim(self, now_ms: int, blocked: set[str]) -> list[Meter]:
        """Step 1 for a batch of due meters: their next period's pending record, committed."""
        async with self.pool.acquire() as conn, conn.transaction():
            due = await store.lock_due(conn, now_ms, BATCH, sorted(blocked))
            for m in due:
                await store.add_pending(conn, m, self.wall() + self.marker_ms)
        return due

    async def charge(self, meter_id: str, period: int, now_ms: int) -> Outcome:
        """Step 2: move the money of the meter's pending period `period` and record it."""
        async with self.pool.acquire() as conn, conn.transaction():
            m = await store.lock(conn, meter_id)
            if m is None or m.next_period != period or m.next_due_ms is None:
                return "skipped"  # another sidecar holds it, or charged it meanwhile, or it stopped
            row = await store.charge_of(conn, meter_id, period)
            if row is None or row["state"] == "charged":
                return "skipped"
            rid = request_id_of(meter_id, period)
            window_end = int(row["window_end_ms"])
            if self.wall() >= window_end - SAFETY_MS:
                if await store.in_ledger(conn, m.account, rid):
                    await store.mark_charged(conn, m, period)
                    return "charged"
                window_end = self.wall() + self.marker_ms  # nothing was charged: a new try, a new window
                await store.renew_window(conn, meter_id, period, window_end)
            paid = await self._move(m, period, int(row["amount"]), int(row["starts_ms"]), window_end, now_ms)
            if paid is None:
                return "skipped"  # Redis refused the window (a slow call): the next pass decides
            if not paid:
                await self._unpaid(conn, m, period, int(row["amount"]))
                return "unpaid"
            await store.mark_charged(conn, m, period)
            return "charged"

    async def _move(
        self, m: Meter, period: int, amount: int, starts_ms: int, window_end: int, now_ms: int
    ) -> bool | None:
        """Reserve then settle in Redis: True charged (now or by an earlier try), False too little
        available (nothing moved), None the window ended (nothing moved now)."""
        rid = request_id_of(m.meter_id, period)
        b = self.balances
        held = await b.reserve(m.account, rid, amount, self.wall() + LEASE_MS, window_end_ms=window_end)
        if held.status in (ReserveStatus.INSUFFICIENT, ReserveStatus.BLOCKED):  # blocked: unpaid too
            return False
        if held.status == ReserveStatus.WINDOW_CLOSED:
            return None
        if held.status not in (ReserveStatus.HELD, ReserveStatus.ALREADY_SETTLED):
            raise RuntimeError(f"meter {m.meter_id}: reserve answered {held.status!r}")
        event = UsageEvent(
            route="meter",
            outcome="meter_period",
            hold=amount,
            started_ms=starts_ms,
            settled_ms=now_ms,
            tags=[f"meter={m.meter_id}", f"period={period}", f"resource={m.resource_id}"],
        )
        try:
            await b.settle(m.account, rid, amount, event, window_end_ms=window_end, scopes=("account",))
        except WindowClosed:
            return None
        return True

    async def _unpaid(self, conn: Connection, m: Meter, period: int, amount: int) -> None:
        await store.mark_unpaid(conn, m.meter_id)
        available = await self.balances.available(m.account)
        data = {"meter": m.meter_id, "resource_id": m.resource_id, "period": period, "amount": amount}
        data["available"] = available
        event = Event(
            id=f"{METER_UNPAID}:{m.meter_id}:{period}", type=METER_UNPAID, account=m.account, data=data
        )
        await self.events.emit(conn, event)

    async def runway(self, accounts: list[str], now_ms: int) -> None:
        """Observe the 48-hour runway of these accounts and of those whose warning is disarmed."""
        async with self.pool.acquire() as conn:
            wanted = sorted(set(accounts) | set(await store.runway_disarmed(conn)))
            live = await store.live_of(conn, wanted) if wanted else []
        by_account: dict[str, list[Meter]] = {a: [] for a in wanted}
        for m in live:
            by_account[m.account].append(m)
        for account, meters in by_account.items():
            cost = cost_ahead(meters, now_ms)
            available = await self.balances.available(account)
            async with self.pool.acquire() as conn, conn.transaction():
                await observe_runway(conn, self.events, account, available, cost, now_ms)
