"""Accounts and their client API keys, in Redis.

Keys are random (32 bytes, URL-safe), shown once at creation and stored only as their SHA-256: with that
much entropy a fast hash is the right one, and the lookup stays one Redis round trip. A small in-process
cache (``auth_cache_seconds``) saves that round trip on the hot path; a revocation made through this
process takes effect at once, one made elsewhere within that many seconds.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from .config import ACCOUNT_ID
from .errors import BadRequest
from .keys import KeySpace, as_text
from .redis_client import RedisClient

KEY_PREFIX = "cgk-"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    api_key: str  # the secret, shown once
    account: str


def new_key(account: str) -> NewKey:
    api_key = KEY_PREFIX + secrets.token_urlsafe(32)
    return NewKey("key_" + hash_key(api_key)[:16], api_key, account)


def check_account_id(account: str) -> None:
    if not ACCOUNT_ID.match(account):
        raise BadRequest("Account ids are 1-64 characters of A-Z a-z 0-9 _ . -", param="id")


class AccountDirectory:
    """The Redis copy of accounts and key hashes (Postgres holds the truth; see admin.AdminOps)."""

    def __init__(self, redis: RedisClient, keys: KeySpace, *, cache_seconds: float) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str | None, float]] = {}

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
            pipe.hset(
                self.keys.api_key(key_hash),
                mapping={"account": key.account, "id": key.key_id, "created_at": int(time.time())},
            )
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

    async def account_for_key(self, api_key: str, now: float) -> str | None:
        key_hash = hash_key(api_key)
        cached = self._cache.get(key_hash)
        if cached is not None and cached[1] > now:
            return cached[0]
        value = await self.redis.hget(self.keys.api_key(key_hash), "account")
        account = as_text(value) if value is not None else None
        if self.cache_seconds > 0:
            if len(self._cache) > 50_000:
                self._cache.clear()
            self._cache[key_hash] = (account, now + self.cache_seconds)
        return account
