"""Portal sessions in Redis: a random token in an HttpOnly cookie, the session under the token's SHA-256
(a copy of Redis holds no usable cookie), living `portal_session_seconds` after its last page and never
past `portal_session_max_seconds` after it was opened (by the app's clock; Redis's TTL never outlasts
that end either).

A customer's session keeps the SHA-256 of the client key it was opened with, never the key: each page
looks the key up again, so a revoked or expired key ends its sessions at once. An operator's session
(opened with the admin token) names no account: it may open any. Each session has its own CSRF token,
which every form posts back.

A key made on the keys page is shown on the page its form redirects to (Post/Redirect/Get: a reload sends
nothing again), and only there: it is kept for that one read, sealed under a key derived from the
cookie's token (which Redis never holds), and deleted by the read that shows it."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from typing import Any

import msgspec
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..keys import KeySpace, as_text
from ..redis_client import RedisClient

TOKEN_BYTES = 32
NEW_KEY_SECONDS = 300  # a made key not shown by then (its page never loaded) is gone
_NONCE_BYTES = 12


class NewKey(msgspec.Struct, frozen=True):
    """A key just made, as the page that shows it once needs it."""

    id: str
    name: str | None
    key: str

    def __repr__(self) -> str:  # never the key
        return f"NewKey(id={self.id!r})"


def _sealer(token: str) -> AESGCM:
    return AESGCM(hashlib.sha256(b"creditgate-portal/new-key/1:" + token.encode()).digest())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Session:
    token_hash: str
    account: str | None  # None: an operator's session (any account)
    key_hash: str  # the client key's SHA-256 ("" for an operator)
    csrf: str
    created_ms: int

    @property
    def operator(self) -> bool:
        return self.account is None

    def csrf_ok(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self.csrf.encode())


class SessionStore:
    def __init__(self, redis: RedisClient, keys: KeySpace, seconds: int, max_seconds: int) -> None:
        self.redis, self.keys, self.seconds, self.max_ms = redis, keys, seconds, max_seconds * 1000

    def _ttl_ms(self, created_ms: int, now_ms: int) -> int:
        """How long the session may live from now: its idle time, cut at its absolute end."""
        return min(self.seconds * 1000, created_ms + self.max_ms - now_ms)

    async def open(self, account: str | None, key_hash: str, now_ms: int) -> tuple[str, Session]:
        """A new session: (the cookie's token, the session)."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        session = Session(token_hash(token), account, key_hash, secrets.token_urlsafe(24), now_ms)
        name = self.keys.portal_session(session.token_hash)
        fields: dict[Any, Any] = {
            "account": account or "",
            "operator": "1" if account is None else "0",
            "key_hash": key_hash,
            "csrf": session.csrf,
            "created_ms": str(now_ms),
        }
        async with self.redis.pipeline(transaction=False) as pipe:  # one key: one slot
            pipe.hset(name, mapping=fields)
            pipe.pexpire(name, self._ttl_ms(now_ms, now_ms))
            await pipe.execute()
        return token, session

    async def find(self, token: str, now_ms: int) -> Session | None:
        """The session of a cookie's token (its life extended, up to its absolute end), or None:
        unknown, expired, past its absolute end (then deleted), malformed."""
        if not token or len(token) > 100 or not token.isascii():
            return None
        hashed = token_hash(token)
        name = self.keys.portal_session(hashed)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(name)
            pipe.expire(name, self.seconds)  # a missing key stays missing
            raw, _ = await pipe.execute()
        found = {as_text(k): as_text(v) for k, v in raw.items()}
        if "csrf" not in found or found.get("operator") not in ("0", "1"):
            return None
        account = None if found["operator"] == "1" else found.get("account") or None
        if account is None and found["operator"] == "0":
            return None
        created = found.get("created_ms", "")
        if not created.isdigit():
            return None
        session = Session(hashed, account, found.get("key_hash", ""), found["csrf"], int(created))
        left_ms = self._ttl_ms(session.created_ms, now_ms)
        if left_ms <= 0:
            await self.close(session)
            return None
        if left_ms < self.seconds * 1000:  # its last stretch: Redis drops it at its end, not later
            await self.redis.pexpire(name, left_ms)
        return session

    async def close(self, session: Session) -> None:
        hashed = session.token_hash
        await self.redis.delete(self.keys.portal_session(hashed), self.keys.portal_new_key(hashed))

    async def keep_new_key(self, token: str, made: NewKey) -> None:
        """`made` kept for the next read by the session of the cookie's `token` (module doc)."""
        nonce = os.urandom(_NONCE_BYTES)
        hashed = token_hash(token)
        sealed = _sealer(token).encrypt(nonce, msgspec.json.encode(made), hashed.encode())
        await self.redis.set(self.keys.portal_new_key(hashed), nonce + sealed, ex=NEW_KEY_SECONDS)

    async def take_new_key(self, token: str) -> NewKey | None:
        """The key kept for this session, once: the read deletes it (one MULTI, so of two reads at once
        only one gets it)."""
        hashed = token_hash(token)
        name = self.keys.portal_new_key(hashed)
        async with self.redis.pipeline(transaction=True) as pipe:  # one key: one slot
            pipe.get(name)
            pipe.delete(name)
            raw, _ = await pipe.execute()
        if not raw or len(raw) <= _NONCE_BYTES:
            return None
        try:
            opened = _sealer(token).decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], hashed.encode())
            return msgspec.json.decode(opened, type=NewKey)
        except (InvalidTag, msgspec.DecodeError):
            return None
