"""Period arithmetic of recurring charges (pure: every function takes the times it needs, `now` included).

A meter's period 0 starts when it was created (`started_ms`); period n starts n lengths later: an hour, a
day, a number of seconds, or n calendar months in UTC (a month started on the 31st starts on the last
day of shorter months, and on the 31st again when there is one). A period is charged in advance, at its
start. A one-time meter has period 0 only. A stopped meter has no period starting at or after its stop.
"""

from __future__ import annotations

import calendar
import datetime as dt

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
RUNWAY_MS = 48 * HOUR_MS  # the look-ahead of the low-runway warning
MIN_SECONDS = 60
MAX_SECONDS = 366 * 86_400
NAMED = {"hour": HOUR_MS, "day": DAY_MS}


def period_of(value: str | int) -> str:
    """The canonical period ('hour', 'day', 'month' or '<seconds>s'); ValueError saying what is allowed."""
    if isinstance(value, bool):
        raise ValueError("period must be 'hour', 'day', 'month' or a number of seconds")
    if isinstance(value, int):
        if not MIN_SECONDS <= value <= MAX_SECONDS:
            raise ValueError(f"period in seconds must be between {MIN_SECONDS} and {MAX_SECONDS}")
        return f"{value}s"
    if value in NAMED or value == "month":
        return value
    raise ValueError("period must be 'hour', 'day', 'month' or a number of seconds")


def length_ms(period: str) -> int | None:
    """A fixed period's length; None for 'month'."""
    if period == "month":
        return None
    if period in NAMED:
        return NAMED[period]
    return int(period.removesuffix("s")) * 1000


def start_of(started_ms: int, period: str, n: int) -> int:
    """When period `n` starts (ms since epoch)."""
    fixed = length_ms(period)
    if fixed is not None:
        return started_ms + n * fixed
    base = dt.datetime.fromtimestamp(started_ms // 1000, dt.UTC)
    months = base.year * 12 + base.month - 1 + n
    year, month = divmod(months, 12)
    day = min(base.day, calendar.monthrange(year, month + 1)[1])
    moved = base.replace(year=year, month=month + 1, day=day)
    return int(moved.timestamp()) * 1000 + started_ms % 1000


def index_at(started_ms: int, period: str, at_ms: int) -> int:
    """The period running at `at_ms` (-1 before period 0 starts)."""
    if at_ms < started_ms:
        return -1
    fixed = length_ms(period)
    if fixed is not None:
        return (at_ms - started_ms) // fixed
    base = dt.datetime.fromtimestamp(started_ms // 1000, dt.UTC)
    at = dt.datetime.fromtimestamp(at_ms // 1000, dt.UTC)
    n = max(0, (at.year - base.year) * 12 + at.month - base.month)
    while n > 0 and start_of(started_ms, period, n) > at_ms:
        n -= 1
    while start_of(started_ms, period, n + 1) <= at_ms:
        n += 1
    return n


def last_period(kind: str, started_ms: int, period: str, stopped_ms: int | None) -> int | None:
    """The last period that will ever be charged (None: no end yet)."""
    if kind == "one_time":
        return 0
    if stopped_ms is None:
        return None
    return index_at(started_ms, period, stopped_ms - 1)  # a period starting at the stop is not charged


def next_due(kind: str, started_ms: int, period: str, next_period: int, stopped_ms: int | None) -> int | None:
    """When the first period not charged yet starts (it is due from then), or None when there is none."""
    last = last_period(kind, started_ms, period, stopped_ms)
    if last is not None and next_period > last:
        return None
    return start_of(started_ms, period, next_period)


def starts_within(
    kind: str, started_ms: int, period: str, next_period: int, until_ms: int, stopped_ms: int | None = None
) -> int:
    """How many periods from `next_period` on start before `until_ms` (the charges still to come, the
    due ones included), at most to the last one."""
    upto = index_at(started_ms, period, until_ms - 1)
    last = last_period(kind, started_ms, period, stopped_ms)
    if last is not None:
        upto = min(upto, last)
    return max(0, upto - next_period + 1)
