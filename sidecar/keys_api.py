"""Key management: list an account's keys (id, name, display prefix, created, last used, revoked,
expires, the key's caps), rename a key, set or clear its expiry, and the terms a new key is made with.

Postgres is written first, then the key's Redis record (its ``expires_ms``, checked on every request).
Last use is read from the Redis record (``used_ms``, bumped about once a minute by the request path) and
from Postgres (where revocation copies it, as the Redis record goes).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import msgspec

from .accounts import AccountDirectory
from .errors import BadRequest, NotFound
from .grant_terms import _instant
from .keys import KeySpace
from .redis_client import RedisClient
from .wallet_store import KeyRow, WalletStore, at_ms

MAX_NAME_CHARS = 100
MAX_EXPIRY_MS = 253_402_300_799_000  # 9999-12-31


class KeyBody(msgspec.Struct, forbid_unknown_fields=True):
    """A new key's terms, or a key's changes (a field left out is left as it is; expires_at null: never)."""

    name: str | msgspec.UnsetType | None = msgspec.UNSET
    expires_at: str | msgspec.UnsetType | None = msgspec.UNSET


def check_name(name: str | None) -> str | None:
    if name is None:
        return None
    if not 1 <= len(name) <= MAX_NAME_CHARS or "\x00" in name or not name.isprintable():
        raise BadRequest(f"name must be 1-{MAX_NAME_CHARS} printable characters.", param="name")
    return name


def check_expiry(expires_at: str | None, now_ms: int, *, future: bool) -> int:
    """expires_at (ISO 8601 with a zone offset) in epoch ms; 0 for None (never)."""
    if expires_at is None:
        return 0
    ms = _instant(expires_at, "expires_at")
    if future and ms <= now_ms:
        raise BadRequest("expires_at must be in the future.", param="expires_at")
    if not 0 < ms <= MAX_EXPIRY_MS:
        raise BadRequest("expires_at must be between 1970 and 9999.", param="expires_at")
    return ms


def new_key_terms(body: KeyBody, now_ms: int) -> tuple[str | None, int]:
    """A new key's name and expiry (ms, 0 never); its expiry must be in the future."""
    name = check_name(body.name if isinstance(body.name, str) else None)
    expires = body.expires_at if isinstance(body.expires_at, str) else None
    return name, check_expiry(expires, now_ms, future=True)


def _iso(at: dt.datetime | None) -> str | None:
    return None if at is None else at.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


class KeyOps:
    def __init__(self, accounts: AccountDirectory, store: WalletStore) -> None:
        self.accounts, self.store = accounts, store

    async def list_keys(self, account: str) -> dict[str, Any]:
        if not await self.store.pool.fetchval("SELECT true FROM accounts WHERE id = $1", account):
            raise NotFound(f"No account {account!r}.", param="account")
        rows = await self.store.keys_of(account)
        live = [r for r in rows if r.revoked_at is None]
        used = dict(
            zip(
                [r.key_id for r in live],
                await self.accounts.last_used_ms([r.key_hash for r in live]),
                strict=True,
            )
        )
        caps: dict[str, list[dict[str, Any]]] = {}
        for cap in await self.store.caps(account):
            if cap.scope.startswith("key:"):
                caps.setdefault(cap.scope.removeprefix("key:"), []).append(
                    {"period": cap.period, "limit": cap.limit}
                )
        return {
            "object": "list",
            "account": account,
            "data": [self._view(r, used.get(r.key_id, 0), caps.get(r.key_id, [])) for r in rows],
        }

    @staticmethod
    def _view(row: KeyRow, used_ms: int, caps: list[dict[str, Any]]) -> dict[str, Any]:
        last = row.last_used_at
        redis_last = at_ms(used_ms)
        if redis_last is not None and (last is None or redis_last > last):
            last = redis_last
        return {
            "id": row.key_id,
            "name": row.name,
            "prefix": row.prefix,
            "created_at": _iso(row.created_at),
            "last_used_at": _iso(last),
            "revoked": row.revoked_at is not None,
            "revoked_at": _iso(row.revoked_at),
            "expires_at": _iso(row.expires_at),
            "expired": row.expires_at is not None and row.expires_at <= dt.datetime.now(dt.UTC),
            "caps": caps,
        }

    async def update_key(self, key_id: str, body: KeyBody, *, account: str | None = None) -> dict[str, Any]:
        """Rename a key and/or set its expiry (null: never). With `account` (a client's own call), a key of
        another account is as unknown as one that does not exist."""
        changes: dict[str, Any] = {}
        if not isinstance(body.name, msgspec.UnsetType):
            changes["name"] = check_name(body.name)
        expires_ms = None
        if not isinstance(body.expires_at, msgspec.UnsetType):
            expires_ms = check_expiry(body.expires_at, time.time_ns() // 1_000_000, future=False)
            changes["expires_at"] = at_ms(expires_ms)
        row = await self.store.key(key_id) if len(key_id) <= 64 and key_id.isprintable() else None
        if row is None or (account is not None and row.account != account):
            raise NotFound(f"No API key {key_id!r}.", param="key_id")
        row = await self.store.update_key(key_id, changes)
        assert row is not None  # keys are never deleted
        if expires_ms is not None and row.revoked_at is None:  # a revoked key has no Redis record
            await self.accounts.set_key_expiry(row.key_hash, expires_ms)
        (used,) = await self.accounts.last_used_ms([row.key_hash])
        caps = [
            {"period": c.period, "limit": c.limit}
            for c in await self.store.caps(row.account)
            if c.scope == f"key:{key_id}"
        ]
        return {"account": row.account, **self._view(row, used, caps)}


async def restore_key_expiries(redis: RedisClient, keys: KeySpace, store: Any) -> int:
    """Write every live key's expiry from Postgres into its Redis record (for the rebuild, which writes
    the records without it: an expired key must stay refused after Redis was lost). `store`: anything
    with the Postgres `pool`. Returns how many keys have an expiry."""
    rows = await store.pool.fetch(
        "SELECT key_hash, expires_at FROM api_keys WHERE revoked_at IS NULL AND expires_at IS NOT NULL"
    )
    for start in range(0, len(rows), 1000):
        async with redis.pipeline(transaction=False) as pipe:
            for r in rows[start : start + 1000]:
                pipe.hset(keys.api_key(r["key_hash"]), "expires_ms", int(r["expires_at"].timestamp() * 1000))
            await pipe.execute()
    return len(rows)
