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

from redis.asyncio import Redis

from .config import ACCOUNT_ID
from .errors import BadRequest, Conflict, NotFound
from .keys import KeySpace, as_text

KEY_PREFIX = "cgk-"


def hash_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    api_key: str  # the secret, shown once
    account: str


class AccountStore:
    def __init__(self, redis: Redis, keys: KeySpace, *, cache_seconds: float) -> None:
        self.redis = redis
        self.keys = keys
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[str | None, float]] = {}

    async def create_account(self, account: str | None = None) -> str:
        account = account or f"acct_{secrets.token_hex(8)}"
        if not ACCOUNT_ID.match(account):
            raise BadRequest("Account ids are 1-64 characters of A-Z a-z 0-9 _ . -", param="id")
        k = self.keys.account(account)
        created = await self.redis.hsetnx(k.balance, "balance", 0)
        if not created:
            raise Conflict(f"Account {account!r} already exists.", param="id")
        await self.redis.hset(k.balance, mapping={"held": 0, "created_at": int(time.time())})
        await self.redis.sadd(self.keys.accounts, account)
        return account

    async def exists(self, account: str) -> bool:
        return bool(await self.redis.hexists(self.keys.account(account).balance, "balance"))

    async def require(self, account: str) -> None:
        if not await self.exists(account):
            raise NotFound(f"No account {account!r}.", param="account")

    async def create_key(self, account: str) -> NewKey:
        await self.require(account)
        api_key = KEY_PREFIX + secrets.token_urlsafe(32)
        key_hash = hash_key(api_key)
        key_id = "key_" + key_hash[:16]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.keys.api_key(key_hash),
                mapping={"account": account, "id": key_id, "created_at": int(time.time())},
            )
            pipe.set(self.keys.api_key_id(key_id), key_hash)
            pipe.sadd(self.keys.account(account).api_keys, key_id)
            await pipe.execute()
        return NewKey(key_id, api_key, account)

    async def revoke_key(self, key_id: str) -> str:
        """Revoke a key by its public id; returns the account it belonged to."""
        key_hash = await self.redis.get(self.keys.api_key_id(key_id))
        if key_hash is None:
            raise NotFound(f"No API key {key_id!r}.", param="key_id")
        key_hash = as_text(key_hash)
        value = await self.redis.hget(self.keys.api_key(key_hash), "account")
        account = as_text(value) if value is not None else ""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.api_key(key_hash), self.keys.api_key_id(key_id))
            if account:
                pipe.srem(self.keys.account(account).api_keys, key_id)
            await pipe.execute()
        self._cache.pop(key_hash, None)
        return account

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
