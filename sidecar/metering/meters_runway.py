"""The 48-hour runway warning: `balance.low_runway` once when an account's available balance no longer
covers the charges its running meters make in the next 48 hours, re-armed when it does again (a
top-up). The crossing state is signals/crossings.py's ('runway'); observations are ordered by the pass's
time, so two sidecars observing the same pass, or an older pass arriving late, change nothing."""

from __future__ import annotations

from collections.abc import Iterable

from ..signals.crossings import observe
from ..signals.events import LOW_RUNWAY, Connection, Event, EventLog
from . import meters_periods as periods
from .meters_store import Meter

SIGNAL = "runway"


def cost_ahead(meters: Iterable[Meter], now_ms: int) -> int:
    """What these meters charge in the next 48 hours (RUNWAY_MS), the periods due now included: the
    warning's threshold, and the portal's banner."""
    return sum(
        m.amount
        * periods.starts_within(
            m.kind, m.started_ms, m.period, m.next_period, now_ms + periods.RUNWAY_MS, m.stopped_ms
        )
        for m in meters
    )


async def observe_runway(
    conn: Connection, events: EventLog, account: str, available: int, cost: int, now_ms: int
) -> bool:
    """One observation (in the caller's transaction); True when it fired the warning."""
    crossing = await observe(conn, account, SIGNAL, value=available, threshold=cost, position=(now_ms, 0))
    if crossing is None:
        return False
    data = {"available": available, "cost_next_48h": cost, "observed_ms": now_ms}
    event = Event(id=f"{LOW_RUNWAY}:{account}:{crossing}", type=LOW_RUNWAY, account=account, data=data)
    await events.emit(conn, event)
    return True
