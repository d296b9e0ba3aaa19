"""Spend-cap configuration (not enforcement: the reserve script enforces them) and the account's time zone.

A cap is (scope, period) -> limit in micro-credits: scope ``account``, ``key:<key id>``,
``model:<model>``, ``user:<end user>`` or ``user:*`` (every end user without a cap of their own); period
``total``, ``day`` or ``month`` (days and months in the account's time zone, UTC unless set). Postgres
(spend_caps, accounts.time_zone) is written first, then Redis' caps hash (``"<scope>|<period>"`` -> limit,
``tz`` -> zone); `restore_caps` writes Redis from Postgres again (after a rebuild, or to repair).
"""

from __future__ import annotations

import functools
import zoneinfo
from decimal import Decimal
from typing import Any

import msgspec

from .errors import BadRequest, NotFound
from .keys import KeySpace
from .money import MAX_MICRO, MICRO, format_credits
from .pipeline.admit import MAX_USER_CHARS
from .pricing import PriceTable
from .redis_client import RedisClient
from .wallet import PERIODS
from .wallet_store import CapRow, WalletStore

TZ_FIELD = "tz"


class CapBody(msgspec.Struct, forbid_unknown_fields=True):
    scope: str = ""
    period: str = ""
    limit: int | None = None
    limit_credits: str | None = None


class TimeZoneBody(msgspec.Struct, forbid_unknown_fields=True):
    time_zone: str | None


def cap_field(scope: str, period: str) -> str:
    return f"{scope}|{period}"


def cap_view(cap: CapRow) -> dict[str, Any]:
    return {
        "scope": cap.scope,
        "period": cap.period,
        "limit": cap.limit,
        "limit_credits": format_credits(cap.limit),
    }


def check_period(period: str) -> str:
    if period not in PERIODS:
        raise BadRequest(f"period must be one of {', '.join(PERIODS)}.", param="period")
    return period


def check_limit(limit: int | None, limit_credits: str | None) -> int:
    """The limit in micro-credits from exactly one of `limit` and `limit_credits` (0 allowed: nothing)."""
    if (limit is None) == (limit_credits is None):
        raise BadRequest("Give exactly one of `limit` (micro-credits) or `limit_credits`.", param="limit")
    if limit_credits is not None:
        try:
            exact = Decimal(limit_credits) * MICRO
        except ArithmeticError:
            raise BadRequest("limit_credits must be a decimal string.", param="limit_credits") from None
        if not exact.is_finite() or exact != exact.to_integral_value():
            raise BadRequest("limit_credits has more than 6 decimals.", param="limit_credits")
        limit, param = int(exact), "limit_credits"
    else:
        param = "limit"
    assert limit is not None
    if not 0 <= limit <= MAX_MICRO:
        raise BadRequest(f"The limit must be between 0 and {MAX_MICRO} micro-credits.", param=param)
    return limit


def check_scope(scope: str, prices: PriceTable) -> str:
    """The scope as stored (a model alias resolved to its model); raises BadRequest naming `scope`."""
    if scope in ("account", "user:*"):
        return scope
    kind, sep, rest = scope.partition(":")
    if sep and rest and kind == "key" and len(rest) <= 64 and rest.isascii() and rest.isprintable():
        return scope
    if sep and rest and kind == "model":
        try:
            return "model:" + prices.resolve(rest).model
        except BadRequest:
            raise BadRequest(f"No priced model {rest!r}.", param="scope") from None
    if sep and rest and kind == "user" and len(rest) <= MAX_USER_CHARS and _text(rest):
        return scope
    raise BadRequest(
        "scope must be account, key:<key id>, model:<model>, user:<end user> (at most "
        f"{MAX_USER_CHARS} characters) or user:*.",
        param="scope",
    )


def _text(value: str) -> bool:
    if "\x00" in value or "\n" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def check_time_zone(zone: str | None) -> str | None:
    """An IANA time zone name, or None for UTC ("UTC" itself is stored as None)."""
    if zone is None or zone == "UTC":
        return None
    if len(zone) > 64 or zone not in _zones():
        raise BadRequest(f"time_zone must be an IANA time zone name, got {zone!r}.", param="time_zone")
    return zone


class CapOps:
    """Caps and time zones: Postgres (the truth) first, then Redis."""

    def __init__(self, redis: RedisClient, keys: KeySpace, store: WalletStore, prices: PriceTable) -> None:
        self.redis, self.keys, self.store, self.prices = redis, keys, store, prices

    async def _key_of_account(self, account: str, scope: str) -> None:
        if scope.startswith("key:"):
            key = await self.store.key(scope.removeprefix("key:"))
            if key is None or key.account != account:
                raise NotFound(f"No API key {scope.removeprefix('key:')!r} on this account.", param="scope")

    async def set_cap(self, account: str, body: CapBody) -> dict[str, Any]:
        scope = check_scope(body.scope, self.prices)
        period = check_period(body.period)
        limit = check_limit(body.limit, body.limit_credits)
        await self._key_of_account(account, scope)
        await self._exists(account)
        await self.store.set_cap(account, scope, period, limit)
        await self.redis.hset(self.keys.account(account).caps, cap_field(scope, period), str(limit))
        return {"account": account, **cap_view(CapRow(scope, period, limit))}

    async def delete_cap(self, account: str, scope: str, period: str) -> dict[str, Any]:
        """Idempotent: a delete that stopped after Postgres is finished by its retry."""
        scope, period = check_scope(scope, self.prices), check_period(period)
        await self._exists(account)
        deleted = await self.store.delete_cap(account, scope, period)
        await self.redis.hdel(self.keys.account(account).caps, cap_field(scope, period))
        return {"account": account, "scope": scope, "period": period, "deleted": deleted}

    async def list_caps(self, account: str) -> dict[str, Any]:
        await self._exists(account)
        caps = await self.store.caps(account)
        zone = await self.store.time_zone(account)
        return {"account": account, "time_zone": zone or "UTC", "caps": [cap_view(c) for c in caps]}

    async def set_time_zone(self, account: str, zone: str | None) -> dict[str, Any]:
        zone = check_time_zone(zone)
        if not await self.store.set_time_zone(account, zone):
            raise NotFound(f"No account {account!r}.", param="account")
        caps = self.keys.account(account).caps
        await (self.redis.hset(caps, TZ_FIELD, zone) if zone else self.redis.hdel(caps, TZ_FIELD))
        return {"account": account, "time_zone": zone or "UTC"}

    async def time_zone(self, account: str) -> dict[str, Any]:
        await self._exists(account)
        return {"account": account, "time_zone": await self.store.time_zone(account) or "UTC"}

    async def _exists(self, account: str) -> None:
        if not await self.store.pool.fetchval("SELECT true FROM accounts WHERE id = $1", account):
            raise NotFound(f"No account {account!r}.", param="account")


async def restore_caps(redis: RedisClient, keys: KeySpace, store: Any, account: str | None = None) -> int:
    """Write Redis' caps hashes from Postgres: for `account`, or for every account with caps or a time
    zone (the rebuild's case). Fields Postgres no longer has are removed; the hash is never emptied on
    the way, so a reserve meanwhile sees the old caps or the new. `store`: a LedgerStore or WalletStore
    (its pool). Returns the number of accounts written."""
    configured = await WalletStore(store.pool).configured(account)
    for name, (caps, zone) in configured.items():
        key = keys.account(name).caps
        want = {cap_field(c.scope, c.period): str(c.limit) for c in caps}
        if zone:
            want[TZ_FIELD] = zone
        have = {f.decode() if isinstance(f, bytes) else f for f in await redis.hkeys(key)}
        stale = sorted(have - want.keys())
        async with redis.pipeline(transaction=False) as pipe:  # one key: one slot
            if want:
                pipe.hset(key, mapping=want)  # type: ignore[arg-type]
            if stale:
                pipe.hdel(key, *stale)
            await pipe.execute()
    return len(configured)
