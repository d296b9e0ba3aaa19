"""Accounts and their client API keys, in Redis.

Keys are random (32 bytes, URL-safe), shown once at creation and stored only as their SHA-256: with that
much entropy a fast hash is the right one, and the lookup stays one Redis round trip. A small in-process
cache (``auth_cache_seconds``) saves that round trip on the hot path; a revocation made through this
process takes effect at once, one made elsewhere within that many seconds.

A key's record also carries its expiry (``expires_ms``, "0" never; checked on every request, cached or
not) and when it was last used (``used_ms``, bumped when this process reads the record and it is a
minute old or more: at most about once a minute per key, never a Postgres write on the request path).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .caller import Caller as Caller
from .config import ACCOUNT_ID
from .errors import BadRequest
from .keys import KeySpace, as_text
from .redis_client import RedisClient

KEY_PREFIX = "cgk-"
DISPLAY_PREFIX_CHARS = 12  # the start of a key shown in listings ("cgk-" and 8 more characters)
USED_EVERY_MS = 60_000  # used_ms is bumped at most this often per key


@dataclass(frozen=True, slots=True)
class _Known:
    caller: Caller | None  # None: no such key
    expires_ms: int  # 0: never
    until: float  # cached until (monotonic)


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    api_key: str  # the secret, shown once
    account: str
    expires_ms: int = 0  # 0: never

    @property
    def display_prefix(self) -> str:
        return self.api_key[:DISPLAY_PREFIX_CHARS]


def new_key(account: str, expires_ms: int = 0) -> NewKey:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey("key_" + hash_key(api_key)[:16], api_key, account, expires_ms)


def key_record(account: str, key_id: str, expires_ms: int, created_at: int) -> Mapping[Any, Any]:
    """The Redis hash record of a key (the rebuild writes the same fields from Postgres)."""
    return {"account": account, "id": key_id, "created_at": str(created_at), "expires_ms": str(expires_ms)}


def check_account_id(account: str) -> None:
    if not ACCOUNT_ID.match(account):
        raise BadRequest("Account ids are 1-64 characters of A-Z a-z 0-9 _ . -", param="id")


class AccountDirectory:
    """The Redis copy of accounts and key hashes (Postgres holds the truth; see admin.AdminOps)."""

    def __init__(self, redis: RedisClient, keys: KeySpace, *, cache_seconds: float) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        self._cache: dict[str, _Known] = {}

    async def add_account(self, account: str) -> None:
        """Give the account a zero balance in Redis unless it has one."""
        k = self.keys.account(account)
        # Each field set only if absent: sent again after a lost reply, it changes nothing.
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(k.balance, "balance", 0)
            pipe.hsetnx(k.balance, "held", 0)
            pipe.hsetnx(k.balance, "created_at", int(time.time()))
            pipe.sadd(self.keys.accounts, account)
            await pipe.execute()

    async def exists(self, account: str) -> bool:
        return bool(await self.redis.hexists(self.keys.account(account).balance, "balance"))

    async def add_key(self, key: NewKey) -> None:
        """Store the key's hash, its id and the account's key set. Three slots (the key records are not
        an account's, so carry no partition tag): three single-key writes in one round trip, not a
        MULTI, which on a cluster cannot span slots. Each sets a value, so sending them again after a
        lost reply changes nothing; the key authenticates once its hash record exists."""
        key_hash = hash_key(key.api_key)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.api_key_id(key.key_id), key_hash)
            pipe.sadd(self.keys.account(key.account).api_keys, key.key_id)
            record = key_record(key.account, key.key_id, key.expires_ms, int(time.time()))
            pipe.hset(self.keys.api_key(key_hash), mapping=record)
            await pipe.execute()

    async def remove_key(self, key_id: str, account: str, key_hash: str) -> None:
        """Delete the key's records one key per command (they lie in different slots); the hash record,
        which authenticates, goes in the same round trip as the rest. Idempotent."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(self.keys.api_key(key_hash))
            pipe.delete(self.keys.api_key_id(key_id))
            pipe.srem(self.keys.account(account).api_keys, key_id)
            await pipe.execute()
        self._cache.pop(key_hash, None)

    async def set_key_expiry(self, key_hash: str, expires_ms: int) -> None:
        """A live key's new expiry (0: never); this process's cache forgets the key at once."""
        await self.redis.hset(self.keys.api_key(key_hash), "expires_ms", expires_ms)
        self._cache.pop(key_hash, None)

    async def last_used_ms(self, key_hashes: list[str]) -> list[int]:
        """The used_ms of each key's record (0: never used, or no record)."""
        if not key_hashes:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_hash in key_hashes:
                pipe.hget(self.keys.api_key(key_hash), "used_ms")
            found = await pipe.execute()
        return [int(v) if v is not None else 0 for v in found]

    async def account_for_key(self, api_key: str, now: float) -> str | None:
        caller = await self.caller_for_key(api_key, now)
        return caller.account if caller is not None else None

    async def caller_for_key(self, api_key: str, now: float, now_ms: int | None = None) -> Caller | None:
        """The account and key id behind a presented key; None for an unknown, revoked or expired key."""
        return await self.caller_for_hash(hash_key(api_key), now, now_ms)

    async def caller_for_hash(self, key_hash: str, now: float, now_ms: int | None = None) -> Caller | None:
        """The same by the key's SHA-256 (a portal session keeps the hash, never the key)."""
        now_ms = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        known = self._cache.get(key_hash)
        if known is None or known.until <= now:
            known = await self._look_up(key_hash, now, now_ms)
        if known.caller is None or (known.expires_ms and now_ms >= known.expires_ms):
            return None
        return known.caller

    async def _look_up(self, key_hash: str, now: float, now_ms: int) -> _Known:
        name = self.keys.api_key(key_hash)
        account, key_id, expires, used = await self.redis.hmget(
            name, ["account", "id", "expires_ms", "used_ms"]
        )
        caller, expires_ms = None, int(expires or 0)
        if account is not None and key_id is not None:
            caller = Caller(as_text(account), as_text(key_id))
            live = not expires_ms or now_ms < expires_ms
            if live and int(used or 0) + USED_EVERY_MS <= now_ms:  # about once a minute at most
                await self.redis.hset(name, "used_ms", now_ms)
        known = _Known(caller, expires_ms, now + self.cache_seconds)
        if self.cache_seconds > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key_hash] = known
        return known
