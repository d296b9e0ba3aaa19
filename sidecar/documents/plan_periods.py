"""Subscription periods: where period k of a subscription starts and ends, on the account's wall clock.

Pure: no I/O; `now` is always given. A subscription has an anchor (the instant it started) and a time
zone (the account's, fixed when it started). Period k starts at the anchor's local date and time plus k
months (or 12k for a yearly plan), its day clamped to the month's last: an anchor on Jan 31 gives
Feb 28 (29 in a leap year), Mar 31, Apr 30, ... (always from the anchor, so a short month does not move
the later ones). A local time that a DST change skips or repeats is resolved as zoneinfo does (fold 0).
"""

from __future__ import annotations

import calendar
import datetime as dt
import zoneinfo
from dataclasses import dataclass

PERIODS = ("month", "year")
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class Period:
    index: int  # 0: the first period, from the anchor
    start_ms: int
    end_ms: int  # the next period's start (exclusive)


def _zone(tz: str) -> dt.tzinfo:
    return dt.UTC if tz in ("", "UTC") else zoneinfo.ZoneInfo(tz)


def _months(period: str) -> int:
    if period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}, got {period!r}")
    return 1 if period == "month" else 12


def _local_anchor(anchor_ms: int, tz: str) -> dt.datetime:
    at = _EPOCH + dt.timedelta(milliseconds=anchor_ms)
    return at.astimezone(_zone(tz)).replace(tzinfo=None)  # its wall time


def _start_ms(local: dt.datetime, months: int, tz: str) -> int:
    total = local.year * 12 + (local.month - 1) + months
    year, month = divmod(total, 12)
    month += 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    at = local.replace(year=year, month=month, day=day).replace(tzinfo=_zone(tz))
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


def period(anchor_ms: int, tz: str, kind: str, index: int) -> Period:
    """Period `index` (≥ 0) of a subscription anchored at `anchor_ms` in zone `tz`."""
    if index < 0:
        raise ValueError("a period's index is 0 or more")
    step = _months(kind)
    local = _local_anchor(anchor_ms, tz)
    start = anchor_ms if index == 0 else _start_ms(local, index * step, tz)
    return Period(index, start, _start_ms(local, (index + 1) * step, tz))


def period_at(anchor_ms: int, tz: str, kind: str, now_ms: int) -> Period:
    """The period `now_ms` falls in (the first one before the anchor)."""
    if now_ms < anchor_ms:
        return period(anchor_ms, tz, kind, 0)
    step = _months(kind)
    local = _local_anchor(anchor_ms, tz)
    now = _local_anchor(now_ms, tz)
    guess = max(0, ((now.year - local.year) * 12 + now.month - local.month) // step - 1)
    p = period(anchor_ms, tz, kind, guess)
    while p.end_ms <= now_ms:
        p = period(anchor_ms, tz, kind, p.index + 1)
    return p


def to_dt(ms: int) -> dt.datetime:
    return _EPOCH + dt.timedelta(milliseconds=ms)


def to_ms(at: dt.datetime) -> int:
    return (at - _EPOCH) // dt.timedelta(milliseconds=1)


def iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
