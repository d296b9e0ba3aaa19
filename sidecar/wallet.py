"""The wallet's rules as plain values: grant terms and their draw-down order, cap scopes and periods.

Pure: no I/O. The Redis scripts (``lua/wallet.lua``) apply the same rules atomically; `draw_order` here is
the reference the tests hold the scripts to.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import zoneinfo
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DAY_MS = 86_400_000

# Kinds of grant, and the priority each is drawn at unless the grant gives its own (lower first: free
# credits before paid ones among grants that end at the same time).
GRANT_KINDS = ("purchase", "starter", "promotion", "bonus", "subscription", "refund", "adjustment", "grant")
FREE_KINDS = frozenset({"starter", "promotion", "bonus"})
DEFAULT_PRIORITY = {
    "promotion": 10,
    "bonus": 20,
    "starter": 30,
    "subscription": 40,
    "refund": 50,
    "adjustment": 50,
    "grant": 50,
    "purchase": 60,
}
PERIODS = ("total", "day", "month")


@dataclass(frozen=True, slots=True)
class WalletPolicy:
    """What the money scripts need of the wallet's settings; `clock` gives now in ms (tests control it)."""

    idle_expiry_ms: int  # free credits expire after the account was idle this long (0: never)
    clock: Callable[[], int] = lambda: time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class GrantTerms:
    """How one grant is drawn and when it ends. `expires_ms` 0: no fixed end; `idle`: it also ends once
    the account was idle for the policy's idle expiry."""

    kind: str = "grant"
    priority: int | None = None
    expires_ms: int = 0
    idle: bool | None = None  # None: free kinds expire when idle, others never
    effective_ms: int | None = None  # its order among equals (default: when it was credited)

    @property
    def drawn_priority(self) -> int:
        return DEFAULT_PRIORITY.get(self.kind, 50) if self.priority is None else self.priority

    @property
    def idle_expiry(self) -> bool:
        if self.idle is not None:
            return self.idle
        return self.kind in FREE_KINDS and self.expires_ms == 0


@dataclass(frozen=True, slots=True)
class Grant:
    """A grant as Redis holds it: what is left of it and its terms. `ended_ms` (0: not yet): the grant
    ended then, and what is left of it is kept only for the live holds admitted against it (README
    "Expiry, once")."""

    grant_id: str
    remaining: int
    expires_ms: int
    priority: int
    order_ms: int
    idle: bool
    kind: str
    ended_ms: int = 0

    @classmethod
    def parse(cls, grant_id: str, value: str) -> Grant:
        rem, exp, pri, order, idle, kind, *ended = value.split(" ")
        end = int(ended[0]) if len(ended) == 1 else 0
        if len(ended) > 1:
            raise ValueError(f"grant {grant_id!r} is stored malformed")
        return cls(grant_id, int(rem), int(exp), int(pri), int(order), idle == "1", kind, end)

    def encode(self) -> str:
        """Its value in the grants hash, as `parse` reads it (and lua/wallet.lua's w_format writes it)."""
        terms = f"{self.expires_ms} {self.priority} {self.order_ms} {int(self.idle)} {self.kind}"
        value = f"{self.remaining} {terms}"
        return f"{value} {self.ended_ms}" if self.ended_ms else value

    def ends_ms(self, active_ms: int, idle_ms: int) -> int:
        """When it stops counting (0: never): its fixed end, or idle_ms after the last activity; once it
        ended, that instant (later activity no longer moves it)."""
        if self.ended_ms:
            return self.ended_ms
        end = self.expires_ms
        if self.idle and idle_ms > 0:
            idle_end = active_ms + idle_ms
            end = idle_end if end == 0 else min(end, idle_end)
        return end


def draw_order(grants: Sequence[Grant], active_ms: int, idle_ms: int) -> list[Grant]:
    """The order usage draws grants in: soonest ending first (never-ending last), then lower priority
    number, then the oldest, then by id."""

    def key(g: Grant) -> tuple[float, int, int, str]:
        end = g.ends_ms(active_ms, idle_ms)
        return (float("inf") if end == 0 else end, g.priority, g.order_ms, g.grant_id)

    return sorted((g for g in grants if g.remaining > 0), key=key)


def draw(grants: Sequence[Grant], charge: int, active_ms: int, idle_ms: int) -> list[tuple[str, int]]:
    """What a charge takes from each grant, in draw order (what no grant covers is not listed)."""
    taken: list[tuple[str, int]] = []
    left = charge
    for g in draw_order(grants, active_ms, idle_ms):
        if left <= 0:
            break
        take = min(g.remaining, left)
        taken.append((g.grant_id, take))
        left -= take
    return taken


def expiring(
    grants: Sequence[Grant], now_ms: int, active_ms: int, idle_ms: int, spare: int | None
) -> list[tuple[Grant, int]]:
    """The grants that ended by `now_ms`, soonest ended first (then lower priority number, the oldest, by
    id), each with the part of it that expires now: all of it while `spare` lasts (what keeps the
    account's balance - held + its credit line at 0 or above; None: no limit), the rest kept for the
    live holds. The reference for lua/wallet.lua's w_expire."""

    def key(g: Grant) -> tuple[int, int, int, str]:
        return (g.ends_ms(active_ms, idle_ms), g.priority, g.order_ms, g.grant_id)

    ended = sorted((g for g in grants if 0 < g.ends_ms(active_ms, idle_ms) <= now_ms), key=key)
    left = None if spare is None else max(spare, 0)
    parts = []
    for g in ended:
        part = g.remaining if left is None else min(g.remaining, left)
        if left is not None:
            left -= part
        parts.append((g, part))
    return parts


# ---- spend caps -------------------------------------------------------------------------------------


def cap_scopes(key_id: str | None, model: str | None, user: str | None) -> list[str]:
    """The scopes a request's spend counts in (the reserve script checks each one's caps)."""
    scopes = ["account"]
    if key_id:
        scopes.append(f"key:{key_id}")
    if model:
        scopes.append(f"model:{model}")
    if user:
        scopes.append(f"user:{user}")
    # A scope is one line in the holds' scope list: one with a newline could not be told apart.
    return [s for s in scopes if "\n" not in s]


@dataclass(frozen=True, slots=True)
class Periods:
    """The current day and month of an account's time zone, as spend-hash ids, when each ends (ms), and
    how long their spend hashes are kept (until a day after)."""

    tz: str  # "" is UTC
    day_id: str
    month_id: str
    day_ends_ms: int
    month_ends_ms: int

    @property
    def day_keep_until_ms(self) -> int:
        return self.day_ends_ms + DAY_MS

    @property
    def month_keep_until_ms(self) -> int:
        return self.month_ends_ms + DAY_MS

    def ends_ms(self, period: str) -> int | None:
        return {"day": self.day_ends_ms, "month": self.month_ends_ms}.get(period)


def periods(now_ms: int, tz: str = "") -> Periods:
    """The day and month containing `now_ms` in time zone `tz` (IANA name; "" is UTC)."""
    zone: dt.tzinfo = dt.UTC
    if tz:
        # validated where it is set; one that is not follows UTC (and still matches the script's)
        with contextlib.suppress(zoneinfo.ZoneInfoNotFoundError, ValueError):
            zone = zoneinfo.ZoneInfo(tz)
    local = dt.datetime.fromtimestamp(now_ms / 1000, zone)
    day = local.date()
    next_day = dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), zone)
    first = day.replace(day=1)
    next_month = (first + dt.timedelta(days=32)).replace(day=1)
    month_end = dt.datetime.combine(next_month, dt.time(), zone)
    return Periods(
        tz,
        f"d{day.isoformat()}",
        f"m{first.strftime('%Y-%m')}",
        int(next_day.timestamp() * 1000),
        int(month_end.timestamp() * 1000),
    )
