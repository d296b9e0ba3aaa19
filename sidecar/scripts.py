"""The money scripts' files and what their replies mean.

A script that says ``-- include: <name>`` on a line of its own gets ``lua/<name>.lua`` spliced in there,
so the wallet's functions are written once and every script still runs as one ``EVALSHA``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from importlib.resources import files

_INCLUDE = "-- include: "


def load_lua(name: str) -> str:
    text = files("sidecar").joinpath("lua", f"{name}.lua").read_text()
    lines = []
    for line in text.splitlines():
        if line.startswith(_INCLUDE):
            lines.append(load_lua(line.removeprefix(_INCLUDE).strip()))
        else:
            lines.append(line)
    return "\n".join(lines) + "\n"


def entry_keys(cache_key: str | None, idempotency_key: str | None) -> list[str]:
    """The optional KEYS[14..] of reserve.lua and settle.lua: a cache entry, then the idempotency entry
    (KEYS[15]; KEYS[14] is that same key when there is no cache entry)."""
    if idempotency_key:
        return [cache_key or idempotency_key, idempotency_key]
    return [cache_key] if cache_key else []


class ReserveStatus(enum.IntEnum):
    HELD = 1
    INSUFFICIENT = 0
    NO_ACCOUNT = -1
    ALREADY_SETTLED = -2
    WINDOW_CLOSED = -3  # reached Redis after the request's window end: refused, nothing held
    CAPPED = -5  # a spend cap would be overshot: refused, nothing held
    CACHED = 2  # the response-cache (or idempotency) entry looked up with the hold exists; nothing held
    IN_PROGRESS = -7  # another request holds the idempotency key's claim: refused, nothing held
    BLOCKED = -8  # the account is blocked (an overdue invoice): a positive hold refused, nothing held


@dataclass(frozen=True, slots=True)
class CapRefusal:
    """The spend cap a hold would have overshot."""

    scope: str  # account, key:<id>, model:<name>, user:<end user> or user:* (the default per user)
    period: str  # total, day or month
    limit: int
    used: int  # settled in the period plus held in the scope
    resets_ms: int | None  # when the period ends (None: a total cap never resets)


@dataclass(frozen=True, slots=True)
class Reservation:
    status: ReserveStatus
    balance: int
    held: int  # the account's total active holds after this call
    cached: bytes | None = None  # the cache entry, when status is CACHED
    replay: bool = False  # `cached` is the idempotency entry, not the response cache's
    cap: CapRefusal | None = None  # the cap, when status is CAPPED
    credit: int = 0  # the account's credit limit (invoice mode), when status is INSUFFICIENT

    @property
    def available(self) -> int:
        """What the account could hold: balance - held + its credit limit (an INSUFFICIENT reply's)."""
        return self.balance - self.held + self.credit


@dataclass(frozen=True, slots=True)
class Settlement:
    first: bool  # False: settled before; nothing moved now, `charged` is the first charge
    balance: int
    released: int  # the hold this settlement released (0 when it had expired)
    charged: int
